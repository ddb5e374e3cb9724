"""Table 1: PGD in every installed library, as shipped / one-liner / sbpatch / limit, on ResNet18 and ResNet50.

CPU default (a few minutes on 2 cores): 32 px, batch 8, PGD-5, 3 repeats, with the CPU memory figure.
``--full``: the paper's size for a GPU (224 px, batch 32, PGD-10, 5 repeats). Run: ``python benchmarks/table1.py``.
"""

from __future__ import annotations

import os

import _common


def plot(data: dict, path: str) -> None:
    """The bar chart of one table1 JSON result."""
    runs, meta, cfg = data["runs"], data["meta"], data["runs"][0]["config"]
    groups = [(f"{run['model']}\n{r['library']}", r) for run in runs for r in run["rows"]]
    title = (f"Table 1: PGD-{cfg['steps']}, B={cfg['batch_size']}, {cfg['image_size']}px; torch {meta['torch']}, "
             f"{meta['device']}, {meta['threads']} thread(s)")
    _common.plot_ratios(path, groups, title, data["metric"])


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    args = p.parse_args()
    meta = _common.setup(args)
    size, batch, steps, repeats = (224, 32, 10, 5) if args.full else (32, 8, 5, 3)
    repeats = args.repeats or repeats
    runs = []
    for model in args.models.split(","):
        argv = ["--model", model, "--image-size", str(size), "--batch-size", str(batch), "--steps", str(steps),
                "--repeats", str(repeats), "--attacks", "PGD", "--device", args.device, "--memory",
                "--threads", str(args.threads)]
        result = _common.bench(argv)
        metric = result["config"]["metric"]
        runs.append({"model": model, "config": result["config"], "rows": _common.summary(result["rows"], metric),
                     "misses": result["misses"]})
    data = {"meta": meta, "experiment": "table1", "full": args.full, "metric": metric, "runs": runs}
    name = "table1_full" if args.full else "table1"
    _common.write(args, name, data)
    plot(data, os.path.join(args.out, f"{name}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
