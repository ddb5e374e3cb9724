"""The wrapper's own cost per call (locate, freeze, restore) on ResNet50 (161 parameter tensors).

Three measurements, each the median over batches of calls (CPU time), interleaved with its baseline:

* ``wrapper``: sbpatch's real wrapt wrapper (``patching.make_wrapper``) around a function that does nothing with
  the model, versus the bare function: locate + freeze 161 parameters + call + restore;
* ``frozen``: ``with sbpatch.frozen(model): pass`` (the public context manager);
* ``torchattacks``: a real library entry point, ``torchattacks.VANILA(model)(x, y)`` (it never runs the model),
  enabled versus inside ``sbpatch.paused()``.

Target (issue 5): under 50 microseconds per call. Run: ``python benchmarks/overhead.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import _common


def per_call(fn: Callable[[], Any], n: int) -> float:
    """CPU seconds per call (process_time: robust on a shared machine; one thread does the work)."""
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


def interleaved(a: Callable[[], Any], b: Callable[[], Any], n: int, rounds: int) -> tuple[float, float, float]:
    """Median per-call seconds of ``a``, of ``b``, and of their difference per round."""
    per_call(a, n)
    per_call(b, n)
    ta, tb, diff = [], [], []
    for _ in range(rounds):
        x, y = per_call(a, n), per_call(b, n)
        ta.append(x)
        tb.append(y)
        diff.append(y - x)
    return statistics.median(ta), statistics.median(tb), statistics.median(diff)


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--calls", type=int, default=2000, help="calls per batch")
    p.add_argument("--rounds", type=int, default=15, help="batches per measurement")
    args = p.parse_args()
    meta = _common.setup(args)

    import torch

    import sbpatch
    from sbpatch import freeze, patching
    from sbpatch.bench.models import build_model

    model = build_model(args.model, 32).to(args.device)
    n_params = len(list(model.parameters()))
    x = torch.rand(2, 3, 32, 32, device=args.device)
    y = torch.zeros(2, dtype=torch.long, device=args.device)

    def target_fn(m: Any) -> None:
        return None

    counters = patching.Counters()
    counters.enabled = True
    target = patching.Target("bench", "target_fn", lambda w, i, a, k: [a[0]])
    wrapped = patching.SbpatchWrapper(target_fn, patching.make_wrapper(target, counters))
    frozen_cm = sbpatch.frozen(model)

    def bare() -> None:
        target_fn(model)

    def patched() -> None:
        wrapped(model)

    def with_frozen() -> None:
        with frozen_cm:
            pass

    results: dict[str, Any] = {}
    # cold: the first freeze of a model walks its modules (cached afterwards until a module or parameter is added)
    freeze._param_cache.clear()
    t0 = time.perf_counter()
    patched()
    results["first_call_us"] = (time.perf_counter() - t0) * 1e6
    assert freeze.held_count() == 0 and all(p.requires_grad for p in model.parameters())

    for name, (a, b) in {"wrapper": (bare, patched), "frozen": (bare, with_frozen)}.items():
        base, full, diff = interleaved(a, b, args.calls, args.rounds)
        results[name] = {"baseline_us": base * 1e6, "with_sbpatch_us": full * 1e6, "overhead_us": diff * 1e6}

    import torchattacks

    sbpatch.enable("torchattacks")
    attack = torchattacks.VANILA(model)
    calls0 = sbpatch.registry.counters("torchattacks").calls

    def ta_paused() -> None:
        with sbpatch.paused():
            attack(x, y)

    def ta_patched() -> None:
        attack(x, y)

    base, full, diff = interleaved(ta_paused, ta_patched, max(args.calls // 4, 50), args.rounds)
    results["torchattacks"] = {"baseline_us": base * 1e6, "with_sbpatch_us": full * 1e6, "overhead_us": diff * 1e6}
    assert sbpatch.registry.counters("torchattacks").calls > calls0, "torchattacks calls were not frozen"

    worst = max(results[k]["overhead_us"] for k in ("wrapper", "frozen", "torchattacks"))
    data = {
        "meta": meta,
        "model": args.model,
        "parameter_tensors": n_params,
        "calls_per_round": args.calls,
        "rounds": args.rounds,
        "results": results,
        "target_us": 50,
        "met": worst < 50,
    }
    print(f"{args.model}: {n_params} parameter tensors; torch {meta['torch']}, {meta['threads']} thread(s)")
    print(f"  first call (cold cache): {results['first_call_us']:.1f} us")
    for k in ("wrapper", "frozen", "torchattacks"):
        r = results[k]
        print(f"  {k:13s} overhead {r['overhead_us']:6.1f} us/call  "
              f"(baseline {r['baseline_us']:.1f} us, with sbpatch {r['with_sbpatch_us']:.1f} us)")
    print(f"target < 50 us: {'met' if data['met'] else 'MISSED'} (worst {worst:.1f} us)")
    _common.write(args, "overhead", data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
