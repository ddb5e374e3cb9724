"""On a CUDA device: is an attack's input gradient bit-identical as shipped, with the one-liner freeze and with sbpatch?

Per model (random init, eval mode, 224 px, batch 8): the gradient of the cross-entropy with respect to the input,
through ``loss.backward()`` as attacks compute it, four ways: as shipped twice (does the model differ from itself
here: atomics-based kernels), the one-liner (every parameter frozen: is this model's backward kernel-sensitive to
freezing on this GPU), and ``sbpatch.frozen(model)``. Under the default kernels and under deterministic ones
(``cudnn.deterministic``, ``use_deterministic_algorithms(warn_only=True)``). The parameters sbpatch kept live are
listed. Run: ``python benchmarks/gpu_exactness.py`` (about a minute on one GPU); writes
``benchmarks/results/gpu_exactness.json`` and ``.md`` (``--out`` elsewhere).
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, read when cuBLAS starts

import time
from typing import Any

import _common

MODELS = ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t")


def gradient(model: Any, x: Any, y: Any, mode: str) -> Any:
    import torch

    import sbpatch

    xa = x.clone().requires_grad_(True)

    def run() -> Any:
        torch.nn.functional.cross_entropy(model(xa), y).backward()
        return xa.grad.detach().clone()

    if mode == "sbpatch":
        with sbpatch.frozen(model):
            g = run()
    elif mode == "one-liner":
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            g = run()
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
    else:
        g = run()
    for p in model.parameters():
        p.grad = None
    if g.is_cuda:
        torch.cuda.synchronize()
    return g


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    meta = _common.setup(args)
    import torch
    import torchvision

    from sbpatch import freeze
    from sbpatch.bench.runner import deterministic_kernels  # what sbpatch bench --device cuda judges identity with

    device = args.device
    start = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10).to(device).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
        y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
        for setting in ("default", "deterministic"):
            deterministic_kernels(setting == "deterministic")
            try:
                ref = gradient(model, x, y, "shipped")
                row = {
                    "model": name,
                    "kernels": setting,
                    "shipped_vs_itself": torch.equal(ref, gradient(model, x, y, "shipped")),
                    "oneliner": torch.equal(ref, gradient(model, x, y, "one-liner")),
                    "sbpatch": torch.equal(ref, gradient(model, x, y, "sbpatch")),
                }
                diff = (gradient(model, x, y, "sbpatch") - ref).abs().max().item()
                row["sbpatch_max_abs_diff"] = diff
                row["kept_live"] = sorted(freeze.kept_in(model))
            except Exception as exc:
                row = {"model": name, "kernels": setting, "error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                deterministic_kernels(False)
            rows.append(row)
            print(row, flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    data = {"machine": meta, "image_size": args.image_size, "batch_size": args.batch_size,
            "elapsed_s": time.perf_counter() - start, "rows": rows}
    _common.write(args, "gpu_exactness", data)
    md = os.path.join(args.out, "gpu_exactness.md")
    with open(md, "w") as f:
        f.write(markdown(data))
    print(f"wrote {md}")
    return 0 if all(r.get("sbpatch") or (not r.get("shipped_vs_itself", True)) for r in rows) else 1


def markdown(data: dict[str, Any]) -> str:
    meta = data["machine"]
    yn = {True: "yes", False: "NO", None: "-"}
    lines = [
        "# Input gradient on CUDA: as shipped vs one-liner vs sbpatch",
        "",
        f"`python benchmarks/gpu_exactness.py` ({data['elapsed_s']:.0f} s): torch {meta['torch']}, "
        f"{meta['device_name']}; random-init torchvision models in eval mode, {data['image_size']} px, batch "
        f"{data['batch_size']}, gradient of the cross-entropy w.r.t. the input through `loss.backward()`. "
        "Each column: bit-identical (`torch.equal`) to the first as-shipped gradient.",
        "",
        "| model | kernels | as shipped, again | one-liner | sbpatch | sbpatch max abs diff | kept live by sbpatch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['kernels']} | error: {r['error']} | | | | |")
            continue
        kept = ", ".join(r["kept_live"][:4]) + (f" (+{len(r['kept_live']) - 4})" if len(r["kept_live"]) > 4 else "")
        lines.append(f"| {r['model']} | {r['kernels']} | {yn[r['shipped_vs_itself']]} | {yn[r['oneliner']]} | "
                     f"{yn[r['sbpatch']]} | {r['sbpatch_max_abs_diff']:.2e} | {kept or '-'} |")
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    raise SystemExit(main())
