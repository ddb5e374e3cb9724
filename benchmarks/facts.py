"""Re-measure the facts of docs/facts.md on this machine (the README quotes the results).

1. Hand-written PGD-5 on ResNet18 (B=8, 64 px): `loss.backward()` and `torch.autograd.grad`, parameters live vs
   frozen.
2. Forward only (a black-box query) on ResNet18 (B=16, 64 px): live vs frozen vs no_grad.
3. ViT-B/16 (B=2, 224 px), one PGD step: live / all frozen (the paper's one-liner) / sbpatch's frozen() (attention
   in-projections kept live), with `autograd.grad` and with `backward()`; and whether the input gradient and the
   black-box logits are bit-identical to live.

Interleaved repeats, medians of CPU time (`time.process_time`) and wall time; thread count in the output.
Run: python benchmarks/facts.py [--threads 1] [--repeats 5] [--json benchmarks/results/facts.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import sbpatch
from sbpatch.verify import identical


def freeze_all(model: torch.nn.Module) -> Callable[[], None]:
    live = [p for p in model.parameters() if p.requires_grad]
    for p in live:
        p.requires_grad_(False)

    def undo() -> None:
        for p in live:
            p.requires_grad_(True)

    return undo


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, use_backward: bool) -> torch.Tensor:
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        if use_backward:
            loss.backward()
            grad = x_adv.grad
        else:
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = (x_adv.detach() + 2 / 255 * grad.sign()).clamp(x - 8 / 255, x + 8 / 255).clamp(0, 1)
    model.zero_grad(set_to_none=True)
    return x_adv


def modes(model: torch.nn.Module) -> dict[str, Callable[[Callable[[], object]], object]]:
    def live(fn: Callable[[], object]) -> object:
        return fn()

    def one_liner(fn: Callable[[], object]) -> object:
        undo = freeze_all(model)
        try:
            return fn()
        finally:
            undo()

    def sbpatch_frozen(fn: Callable[[], object]) -> object:
        with sbpatch.frozen(model):
            return fn()

    return {"live": live, "all frozen": one_liner, "sbpatch": sbpatch_frozen}


def measure(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    for fn in runs.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():  # interleaved
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {k: {"wall_s": statistics.median(wall[k]), "cpu_s": statistics.median(cpu[k])} for k in runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    x, y = torch.rand(8, 3, 64, 64), torch.randint(0, 10, (8,))
    m = modes(resnet)
    for use_backward in (True, False):
        key = "resnet18 PGD-5 " + ("backward()" if use_backward else "autograd.grad")
        runs = {k: (lambda w=w, b=use_backward: w(lambda: pgd(resnet, x, y, 5, b))) for k, w in m.items()}
        results[key] = measure(runs, args.repeats)
    xq = torch.rand(16, 3, 64, 64)

    def no_grad_query() -> object:
        with torch.no_grad():
            return resnet(xq)

    results["resnet18 forward B=16"] = measure(
        {
            "live": lambda: resnet(xq),
            "all frozen": lambda: m["all frozen"](lambda: resnet(xq)),
            "no_grad": no_grad_query,
        },
        args.repeats,
    )

    torch.manual_seed(0)
    vit = torchvision.models.vit_b_16(num_classes=10).eval()
    with torch.no_grad():  # torchvision zero-initialises the head: give it weights so gradients are not all zero
        vit.heads.head.weight.normal_(0, 0.02)
    xv, yv = torch.rand(2, 3, 224, 224), torch.randint(0, 10, (2,))
    mv = modes(vit)
    for use_backward in (False, True):
        key = "vit_b_16 PGD-1 " + ("backward()" if use_backward else "autograd.grad")
        runs = {k: (lambda w=w, b=use_backward: w(lambda: pgd(vit, xv, yv, 1, b))) for k, w in mv.items()}
        results[key] = measure(runs, max(2, args.repeats // 2))

    def input_grad() -> torch.Tensor:
        xg = xv.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(vit(xg), yv), xg)
        return g

    ref_grad, ref_logits = input_grad(), vit(xv).detach()
    results["vit_b_16 bit-identical to live"] = {
        name: {
            "input gradient": identical(ref_grad, wrap(input_grad)),
            "black-box logits": identical(ref_logits, wrap(lambda: vit(xv).detach())),
        }
        for name, wrap in mv.items()
        if name != "live"
    }
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
