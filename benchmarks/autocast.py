"""Autocast (bfloat16 on CPU): what freezing costs or saves when attacks run under ``torch.autocast``.

Autocast caches the low-precision cast of a weight only for leaves that require grad (``cached_cast`` in
aten/src/ATen/autocast_mode.cpp): as shipped, every weight is cast once per autocast region; frozen, a weight is
re-cast at every use. The values are the same (the attacks stay bit-identical, tests/test_torch_integration.py);
this script measures the time. Columns, interleaved per round (CPU-time medians): as shipped and sbpatch, in fp32
and with the whole attack inside ``torch.autocast("cpu", dtype=torch.bfloat16)``, plus the number of ``aten::_to_copy``
calls (casts) per attack call seen by the profiler. Rows: cleverhans PGD (``loss.backward()``), torchattacks PGD
(``autograd.grad``), torchattacks SPSA (forward passes only), on ResNet18 and a small ViT, 32 px, batch 8, 5 steps.
``--full``: 224 px, batch 32, 10 steps (ResNet50, ViT-B/16). Run: ``python benchmarks/autocast.py``; writes
``benchmarks/results/autocast.json`` and ``autocast.md``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import _common

ATTACKS = (("cleverhans", "projected_gradient_descent"), ("torchattacks", "PGD"), ("torchattacks", "SPSA"))
COLUMNS = ("fp32 shipped", "fp32 sbpatch", "bf16 shipped", "bf16 sbpatch")


def build(name: str, image_size: int) -> Any:
    import torch
    import torchvision

    from sbpatch.bench.models import build_model

    if name != "vit":
        return build_model(name, image_size)
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256, num_classes=10
    )
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
    return model.eval()


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated (default resnet18,vit; --full resnet50,vit_b_16)")
    args = p.parse_args()
    meta = _common.setup(args)
    models = (args.models or ("resnet50,vit_b_16" if args.full else "resnet18,vit")).split(",")
    size, bs, steps = (224, 32, 10) if args.full else (32, 8, 5)
    rounds = args.repeats or 3

    import torch
    from torch.profiler import ProfilerActivity, profile

    import sbpatch
    from sbpatch.bench import runner, workloads
    from sbpatch.bench.models import make_data
    from sbpatch.verify import identical

    sbpatch.enable("cleverhans", "torchattacks")
    cases = {lib: workloads.library_cases(lib)[0] for lib in {lib for lib, _ in ATTACKS}}
    x, y = make_data(bs, size, args.device)
    rows = []
    for model_name in models:
        model = build(model_name, size).to(args.device)
        for library, attack in ATTACKS:
            call = cases[library][attack](model, x, y, steps)

            def run(column: str, call: Any = call, model: Any = model) -> Any:
                for q in model.parameters():
                    q.grad = None
                runner.seed_all()
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=column.startswith("bf16")):
                    if column.endswith("sbpatch"):
                        return call()
                    with sbpatch.paused():
                        return call()

            times: dict[str, list[float]] = {c: [] for c in COLUMNS}
            outputs: dict[str, Any] = {}
            for r in range(rounds + 1):  # round 0 warms up
                order = COLUMNS[r % len(COLUMNS):] + COLUMNS[: r % len(COLUMNS)]
                for column in order:
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    c0, w0 = time.process_time(), time.perf_counter()
                    outputs[column] = run(column)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    if r:
                        times[column].append(time.perf_counter() - w0 if args.device == "cuda" else
                                             time.process_time() - c0)
            casts = {}
            for column in ("bf16 shipped", "bf16 sbpatch"):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    run(column)
                casts[column] = sum(1 for e in prof.events() if e.name == "aten::_to_copy")
            med = {c: statistics.median(v) for c, v in times.items()}
            row = {
                "model": model_name, "library": library, "attack": attack, "median_s": med,
                "speedup_fp32": med["fp32 shipped"] / med["fp32 sbpatch"],
                "speedup_bf16": med["bf16 shipped"] / med["bf16 sbpatch"],
                "casts_per_call": casts,
                "identical_bf16": identical(outputs["bf16 shipped"], outputs["bf16 sbpatch"]),
            }
            rows.append(row)
            print(f"{model_name} {library} {attack}: fp32 {row['speedup_fp32']:.2f}x, bf16 {row['speedup_bf16']:.2f}x, "
                  f"casts {casts['bf16 shipped']} -> {casts['bf16 sbpatch']}, identical {row['identical_bf16']}",
                  flush=True)
    metric = "wall" if args.device == "cuda" else "cpu"
    data = {"meta": meta, "experiment": "autocast", "full": args.full, "image_size": size, "batch_size": bs,
            "steps": steps, "rounds": rounds, "metric": metric, "results": rows}
    name = "autocast_full" if args.full else "autocast"
    _common.write(args, name, data)
    lines = [
        f"Attacks under torch.autocast({args.device!r}, bfloat16) vs fp32, {size} px, batch {bs}, {steps} steps, "
        f"{metric} time medians of {rounds} interleaved rounds, {meta.get('threads')} thread(s), torch "
        f"{meta.get('torch')}. Speed-up = as shipped / sbpatch; casts = aten::_to_copy calls per attack call.",
        "",
        "| model | attack | fp32 shipped -> sbpatch | speed-up fp32 | bf16 shipped -> sbpatch | speed-up bf16 | "
        "casts shipped -> sbpatch | bf16 identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        m = r["median_s"]
        lines.append(
            f"| {r['model']} | {r['library']} {r['attack']} | {m['fp32 shipped']:.3f} -> {m['fp32 sbpatch']:.3f} s | "
            f"{r['speedup_fp32']:.2f}x | {m['bf16 shipped']:.3f} -> {m['bf16 sbpatch']:.3f} s | "
            f"{r['speedup_bf16']:.2f}x | {r['casts_per_call']['bf16 shipped']} -> "
            f"{r['casts_per_call']['bf16 sbpatch']} | {r['identical_bf16']} |"
        )
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
