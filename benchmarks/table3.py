"""Table 3: attack variety. ART PGD, AutoAttack, BIM, Square, FGSM; torchattacks APGD, CW, MIFGSM, SINIFGSM, VMIFGSM.

Each attack uses the builder of its library's contrib ``cases()`` (tiny restarts and queries), so the figures show
how much of each attack's time is parameter-gradient work. CPU default: ResNet18, 32 px, batch 8, 5 steps.
``--full`` (a GPU): 224 px, batch 32, 10 steps. Run: ``python benchmarks/table3.py``.
"""

from __future__ import annotations

import os

import _common

ATTACKS = {
    "art": ["PGD", "AutoAttack", "BasicIterativeMethod", "SquareAttack", "FastGradientMethod"],
    "torchattacks": ["APGD", "CW", "MIFGSM", "SINIFGSM", "VMIFGSM"],
}


def plot(data: dict, path: str) -> None:
    """The bar chart of one table3 JSON result."""
    groups = [(f"{r['library']}\n{r['case']}", r) for run in data["runs"] for r in run["rows"]]
    meta, cfg = data["meta"], data["runs"][0]["config"]
    title = (f"Table 3: {cfg['model']} B={cfg['batch_size']} {cfg['image_size']}px, {cfg['steps']} steps; "
             f"torch {meta['torch']}, {meta['device']}, {meta['threads']} thread(s)")
    _common.plot_ratios(path, groups, title, data["metric"])


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    args = p.parse_args()
    meta = _common.setup(args)
    size, batch, steps, repeats = (224, 32, 10, 5) if args.full else (32, 8, 5, 3)
    repeats = args.repeats or repeats
    runs = []
    for library, attacks in ATTACKS.items():
        argv = ["--model", args.model, "--image-size", str(size), "--batch-size", str(batch), "--steps", str(steps),
                "--repeats", str(repeats), "--libraries", library, "--attacks", ",".join(attacks),
                "--device", args.device, "--threads", str(args.threads), "--memory"]
        result = _common.bench(argv)
        metric = result["config"]["metric"]
        runs.append({"library": library, "config": result["config"], "rows": _common.summary(result["rows"], metric),
                     "misses": result["misses"]})
    metric = runs[0]["config"]["metric"]
    data = {"meta": meta, "experiment": "table3", "full": args.full, "metric": metric, "runs": runs}
    name = "table3_full" if args.full else "table3"
    _common.write(args, name, data)
    plot(data, os.path.join(args.out, f"{name}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
