"""What the kernel-preserving rules and the cache check cost: per forward, and per frozen call.

* ``forward``: one attack step (forward, then the input gradient with ``torch.autograd.grad``) inside
  ``sbpatch.frozen(model)`` versus the same step with the same ``requires_grad`` flags set by hand (so both run the
  same kernels: what sbpatch keeps live is kept live by hand too). The difference is what sbpatch adds to a step:
  the operand mode's ``__torch_function__`` on every torch call the forward makes from Python, the fast-path hooks,
  and the call's freeze/restore. Also the number of torch calls the mode sees per forward, and their cost alone
  (measured on ``Tensor.dim``).
* ``call``: what a patched library's wrapper runs around an attack (``freeze.call_frozen`` on a no-op attack, once
  the first call learned that the signature needs no operand mode), ``with sbpatch.frozen(model): pass`` (always
  runs the mode), and their parts: the cache's tree check, the call signature, pushing and popping the mode.

ViT-B/16 and ResNet50 at 224 px (the issue's figures), random weights, batch 1, CPU time (``time.process_time``) of
one torch thread, rounds interleaved, medians. The ``call`` rows run in subprocesses (``--processes`` of them);
``--baseline DIR`` also measures them with the sbpatch source tree in DIR (e.g. a ``git worktree`` of an earlier
commit), its processes alternated with this tree's, for a side-by-side figure.

Run: ``python benchmarks/rules_cost.py [--rounds N] [--px 224] [--baseline DIR]``; writes
``results/rules_cost.json`` and ``results/rules_cost.md``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import _common

MODELS = ("vit_b_16", "resnet50")


def _cpu(fn: Callable[[], Any], n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


def _interleaved(a: Callable[[], Any], b: Callable[[], Any], n: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of ``a`` and ``b`` and of their paired difference, rounds interleaved."""
    _cpu(a, 1)
    _cpu(b, 1)
    ta, tb, diff = [], [], []
    for i in range(rounds):
        if i % 2:
            y, x = _cpu(b, n), _cpu(a, n)
        else:
            x, y = _cpu(a, n), _cpu(b, n)
        ta.append(x)
        tb.append(y)
        diff.append(y - x)
    return {"a": statistics.median(ta), "b": statistics.median(tb), "diff": statistics.median(diff),
            "diff_q1": statistics.quantiles(diff, n=4)[0] if len(diff) > 1 else diff[0],
            "diff_q3": statistics.quantiles(diff, n=4)[2] if len(diff) > 1 else diff[0]}


def build(name: str, px: int) -> Any:
    import torchvision

    kw = {"image_size": px} if name.startswith("vit") else {}
    return getattr(torchvision.models, name)(num_classes=10, **kw).eval()


def count_calls(model: Any, x: Any) -> int:
    """Torch calls the operand mode sees in one forward of ``model`` (a counting mode pushed the same way)."""
    import torch
    from torch.overrides import TorchFunctionMode

    seen = [0]

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen[0] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(x)
    return seen[0]


def per_call_of_the_mode(rounds: int) -> float:
    """Seconds one ``__torch_function__`` round trip through sbpatch's operand mode adds (on ``Tensor.dim``)."""
    import torch

    from sbpatch import operands

    t = torch.zeros(4)

    def plain() -> None:
        for _ in range(1000):
            t.dim()

    def moded() -> None:
        operands.enter()
        try:
            for _ in range(1000):
                t.dim()
        finally:
            operands.leave()

    return _interleaved(plain, moded, 20, rounds)["diff"] / 1000


def forward_row(name: str, px: int, rounds: int) -> dict[str, Any]:
    import torch

    import sbpatch
    from sbpatch import freeze

    model = build(name, px)
    x = torch.rand(1, 3, px, px)
    with sbpatch.frozen(model):  # what sbpatch keeps live: kept live by hand in the baseline too
        live = [p for p in model.parameters() if p.requires_grad]
    frozen_by_hand = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in live)]

    def step() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xg).logsumexp(1).sum(), xg)

    def by_hand() -> None:
        for p in frozen_by_hand:
            p.requires_grad_(False)
        try:
            step()
        finally:
            for p in frozen_by_hand:
                p.requires_grad_(True)

    def with_sbpatch() -> None:
        with sbpatch.frozen(model):
            step()

    m = _interleaved(by_hand, with_sbpatch, 1, rounds)
    return {
        "model": name, "px": px, "parameters": sum(1 for _ in model.parameters()),
        "kept_live": len(live), "step_ms": m["a"] * 1e3, "sbpatch_step_ms": m["b"] * 1e3,
        "added_us": m["diff"] * 1e6, "added_q1_us": m["diff_q1"] * 1e6, "added_q3_us": m["diff_q3"] * 1e6,
        "added_pct": 100 * m["diff"] / m["a"], "torch_calls_per_forward": count_calls(model, x),
        "kept": sorted(freeze.kept_in(model)),
    }


def call_row(name: str, rounds: int, n: int) -> dict[str, Any]:
    import torch

    import sbpatch
    from sbpatch import freeze

    model = build(name, 32 if name.startswith("vit") else 224)

    def frozen_call() -> None:
        with sbpatch.frozen(model):
            pass

    x = torch.rand(1, 3, 32, 32)

    def attack(images: Any) -> None:
        return None

    def patched_call() -> None:  # what a patched library's wrapper runs around the attack
        freeze.call_frozen([model], (), attack, (x,), {})

    params = list(model.parameters())

    def flags_by_hand() -> None:  # the floor: read each flag, set the live ones False, then True again
        owned = [p for p in params if p.requires_grad]
        for p in owned:
            p.requires_grad = False
        for p in owned:
            p.requires_grad = True

    patched_call()  # the first call runs the operand mode and learns that this signature needs none
    row = {"model": name, "source": os.path.dirname(os.path.dirname(sbpatch.__file__)),
           "frozen_call_us": _interleaved(lambda: None, frozen_call, n, rounds)["diff"] * 1e6,
           "patched_call_us": _interleaved(lambda: None, patched_call, n, rounds)["diff"] * 1e6,
           "flags_by_hand_us": _interleaved(lambda: None, flags_by_hand, n, rounds)["diff"] * 1e6}
    row["over_floor_us"] = row["patched_call_us"] - row["flags_by_hand_us"]
    group = freeze._module_group(model)
    if hasattr(freeze, "_unchanged"):
        check = _interleaved(lambda: None, lambda: freeze._unchanged(group), n, rounds)
        row["tree_check_us"] = check["diff"] * 1e6
    try:
        from sbpatch import operands
    except ImportError:  # a baseline from before the operand mode
        return row

    def mode() -> None:
        operands.enter()
        operands.leave()

    row["mode_push_pop_us"] = _interleaved(lambda: None, mode, n, rounds)["diff"] * 1e6
    if hasattr(operands, "signature"):
        sig = _interleaved(lambda: None, lambda: operands.signature(attack, (x,), {}, [model]), n, rounds)
        row["signature_us"] = sig["diff"] * 1e6
    return row



def call_rows(rounds: int, n: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    return [call_row(name, rounds, n) for name in MODELS]


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--px", type=int, default=224)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=500, help="calls per round for the per-call rows")
    p.add_argument("--baseline", help="an sbpatch source tree to measure the per-call rows with too (a worktree)")
    p.add_argument("--calls-only", action="store_true", help="only the per-call rows, as JSON on stdout")
    p.add_argument("--processes", type=int, default=3,
                   help="processes per tree for the per-call rows, alternated with the baseline's (default 3)")
    p.add_argument("--from-json", metavar="FILE", help="only rewrite rules_cost.md from a rules_cost.json")
    args = p.parse_args()
    machine = _common.setup(args)
    if args.from_json:
        with open(args.from_json) as f:
            text = render(json.load(f))
        with open(os.path.join(args.out, "rules_cost.md"), "w") as f:
            f.write(text)
        print(text)
        return 0
    if args.calls_only:
        print(json.dumps(call_rows(args.rounds, args.calls)))
        return 0
    import torch

    torch.set_num_threads(1)
    started = time.time()
    result: dict[str, Any] = {"meta": machine, "rounds": args.rounds}
    result["mode_call_us"] = per_call_of_the_mode(args.rounds) * 1e6
    result["forward"] = [forward_row(name, args.px, args.rounds) for name in MODELS]
    trees = {"call": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    if args.baseline:
        trees["call_baseline"] = os.path.abspath(args.baseline)
        result["baseline"] = _describe(args.baseline)
    runs: dict[str, list[list[dict[str, Any]]]] = {key: [] for key in trees}
    for _ in range(args.processes):  # each tree in its own processes, alternated: a shared machine drifts
        for key, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, __file__, "--calls-only", "--rounds", str(args.rounds), "--calls",
                                  str(args.calls)], env=env, capture_output=True, text=True, check=True).stdout
            runs[key].append(json.loads(out.strip().splitlines()[-1]))
    for key, per_run in runs.items():
        result[key] = [_median_row(rows) for rows in zip(*per_run)]
    result["processes"] = args.processes
    result["elapsed_s"] = time.time() - started
    _common.write(args, "rules_cost", result)
    with open(os.path.join(args.out, "rules_cost.md"), "w") as f:
        f.write(render(result))
    print(render(result))
    return 0


def _median_row(rows: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """One model's per-call row: the median of each figure over the processes."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in rows)
    return out


def _describe(tree: str) -> str:
    """The baseline tree's commit, when it is a git checkout."""
    try:
        return subprocess.run(["git", "-C", tree, "log", "-1", "--format=commit %h, %cs"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return tree


def render(r: dict[str, Any]) -> str:
    m = r["meta"]
    lines = [
        "# What the kernel rules and the cache check cost",
        "",
        f"`python benchmarks/rules_cost.py`: torch {m['torch']}, {m['device']} ({m.get('device_name', '')}), "
        f"1 torch thread, CPU time, {r['rounds']} interleaved rounds, medians; {r['elapsed_s']:.0f} s.",
        "",
        "## Per attack step (forward + input gradient), batch 1",
        "",
        "sbpatch vs the same `requires_grad` flags set by hand (same kernels): what sbpatch adds to a step (the "
        "operand mode on each torch call of the forward, the fast-path hooks, freeze and restore). "
        "The mode's round trip "
        f"alone: {r['mode_call_us']:.2f} us per torch call.",
        "",
        "*mode per forward*: torch calls per forward x the round trip (the robust figure); *measured*: the paired "
        "difference of whole steps (its quartiles show how much a shared machine's noise hides at this size).",
        "",
        "| model | px | step | torch calls per forward | mode per forward | share of the step | measured (quartiles) "
        "| kept live |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["forward"]:
        mode_us = row["torch_calls_per_forward"] * r["mode_call_us"]
        lines.append(
            f"| {row['model']} | {row['px']} | {row['step_ms']:.1f} ms | {row['torch_calls_per_forward']} | "
            f"{mode_us:.0f} us | {100 * mode_us / (row['step_ms'] * 1e3):.3f}% | {row['added_us']:.0f} us "
            f"({row['added_q1_us']:.0f} to {row['added_q3_us']:.0f}) | {row['kept_live']} of {row['parameters']} |"
        )
    lines += ["", "## Per call: what sbpatch adds around an attack", "",
              "*patched call*: what a patched library's wrapper runs around the attack (`freeze.call_frozen` on a "
              "no-op attack, after the first call learned that its signature needs no operand mode); *with block*: "
              "`with sbpatch.frozen(model): pass`, which always runs the mode; then the parts: the cache's tree check, "
              "the call signature, pushing and popping the mode; *flags by hand*: the floor any freezing wrapper "
              "pays, a loop that reads every parameter's flag, sets the live ones False and then True again. ViT-B/16 "
              "at 32 px (the parameter count is what matters), ResNet50; medians of "
              f"{r.get('processes', 1)} processes per tree, alternated with the baseline's.",
              "",
              "| model | source | patched call | with block | flags by hand | patched call over the floor | tree check "
              "| signature | mode push + pop |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {row["model"]: row for row in r.get("call_baseline", [])}

    def us(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.1f} us" if key in row else "-"

    for label, rows in (("this tree", r["call"]), ("baseline", r.get("call_baseline", []))):
        for row in rows:
            lines.append(f"| {row['model']} | {label} | {us(row, 'patched_call_us')} | {us(row, 'frozen_call_us')} | "
                         f"{us(row, 'flags_by_hand_us')} | {us(row, 'over_floor_us')} | {us(row, 'tree_check_us')} | "
                         f"{us(row, 'signature_us')} | {us(row, 'mode_push_pop_us')} |")
    if base:
        for key, what in (("patched_call_us", "patched call"), ("frozen_call_us", "with block"),
                          ("over_floor_us", "patched call over the floor")):
            ratios = ", ".join(f"{row['model']} {row[key] / base[row['model']][key]:.2f}x"
                               for row in r["call"] if row["model"] in base and key in base[row["model"]])
            lines += ["", f"This tree's {what} over the baseline's: {ratios} (baseline: {r.get('baseline', '')})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
