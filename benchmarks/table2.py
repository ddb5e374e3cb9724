"""Table 2: scaling. PGD batch sizes on ResNet50, then ResNet18-152 and ViT-B/16 at one batch size.

The library is ART by default (its PGD calls ``loss.backward()``); ViT-B/16 also runs torchattacks' PGD
(``torch.autograd.grad``), where the one-liner's kernel change shows alone. CPU default (a few minutes on 2 cores):
ResNets at 32 px, PGD-2, batch sizes 4/8/16 then batch 16; ViT-B/16 at 224 px, batch 2, one PGD step.
``--full`` (a GPU): 224 px, PGD-10, batch sizes 4..128, batch 16 for the models. Run: ``python benchmarks/table2.py``.
"""

from __future__ import annotations

import os

import _common


def plot(data: dict, path: str) -> None:
    """The bar chart of one table2 JSON result."""
    groups = []
    for run in data["runs"]:
        for r in run["rows"]:
            tag = f"B={run['batch_size']}" if run["part"] == "batch" else run["model"].replace("resnet", "rn")
            groups.append((f"{tag}\n{r['library']}", r))
    meta, cfg = data["meta"], data["runs"][0]["config"]
    title = (f"Table 2: PGD scaling (ResNets {cfg['image_size']}px PGD-{cfg['steps']}); torch {meta['torch']}, "
             f"{meta['device']}, {meta['threads']} thread(s)")
    _common.plot_ratios(path, groups, title, data["metric"])


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--library", default="art", help="library for the ResNet rows (default art)")
    args = p.parse_args()
    meta = _common.setup(args)
    if args.full:
        size, steps, repeats, batches = 224, 10, 5, [4, 8, 16, 32, 64, 128]
        vit = {"size": 224, "batch": 16, "steps": 10}
    else:
        size, steps, repeats, batches = 32, 2, 3, [4, 8, 16]
        vit = {"size": 224, "batch": 2, "steps": 1}
    repeats = args.repeats or repeats
    models = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    common = ["--device", args.device, "--threads", str(args.threads), "--attacks", "PGD", "--memory"]
    runs = []

    def one(part: str, model: str, batch: int, img: int, k: int, libraries: str, reps: int) -> None:
        argv = ["--model", model, "--batch-size", str(batch), "--image-size", str(img), "--steps", str(k),
                "--repeats", str(reps), "--libraries", libraries, *common]
        result = _common.bench(argv)
        metric = result["config"]["metric"]
        runs.append({"part": part, "model": model, "batch_size": batch, "image_size": img, "steps": k,
                     "config": result["config"], "rows": _common.summary(result["rows"], metric),
                     "misses": result["misses"]})

    for batch in batches:
        one("batch", "resnet50", batch, size, steps, args.library, repeats)
    for model in models:
        if model != "resnet50" or 16 not in batches:
            one("model", model, 16, size, steps, args.library, repeats)
    one("model", "vit_b_16", vit["batch"], vit["size"], vit["steps"], f"{args.library},torchattacks",
        max(2, repeats - 1))
    metric = runs[0]["config"]["metric"]
    data = {"meta": meta, "experiment": "table2", "full": args.full, "metric": metric, "runs": runs}
    name = "table2_full" if args.full else "table2"
    _common.write(args, name, data)
    plot(data, os.path.join(args.out, f"{name}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
