"""The wrapper's own cost per call (locate, freeze, restore) on ResNet50 (161 parameter tensors).

Three measurements, each the median over batches of calls (CPU time), interleaved with its baseline:

* ``wrapper``: sbpatch's real wrapt wrapper (``patching.make_wrapper``) around a function that does nothing with
  the model, versus the bare function: locate + freeze 161 parameters + call + restore;
* ``frozen``: ``with sbpatch.frozen(model): pass`` (the public context manager);
* ``torchattacks``: a real library entry point, ``torchattacks.VANILA(model)(x, y)`` (it never runs the model),
  enabled versus inside ``sbpatch.paused()``.

The same three on a transformer (``--transformer``, default ViT-B/16 at 32 px: 152 parameter tensors, 12
``nn.MultiheadAttention``), plus ``forward``: one forward pass inside ``sbpatch.frozen`` (its run-time kernel rules
watch every Linear's input) versus the same ``requires_grad`` flags set by hand, so both run the same kernels. The
forward row uses ViT-B/16's layout (12 layers, 152 tensors) at width 64, whose ~3 ms forward lets a cost of the order
of 100 us show; ViT-B/16's own 60 ms forward at 32 px would hide it in the noise.

And the start-up cost of the ``SBPATCH`` hook (issue 9): wall time and peak RSS of a fresh ``python -c pass`` with
``SBPATCH`` unset, ``SBPATCH=0`` and ``SBPATCH=all``, interleaved, medians (``SBPATCH=all`` now imports only
sbpatch's start-up modules and waits for an attack library's import); for reference, what ``SBPATCH=all`` cost when
start-up imported sbpatch and enabled it (wrapt, packaging), and the same interpreter applying the compatibility shims
eagerly (what ``enable()`` did before they moved into an import hook).

Target (issue 5): under 50 microseconds per call. Run: ``python benchmarks/overhead.py`` (``--startup-only``: just
the start-up rows, merged into an existing results file).
"""

from __future__ import annotations

import ast
import json
import os
import resource
import statistics
import subprocess
import sys
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


EAGER_SHIMS = "from sbpatch import compat; [shim() for shim in compat.SHIMS.values()]"
STARTUP_CASES: dict[str, tuple[str | None, str]] = {
    "unset": (None, "pass"),
    "SBPATCH=0": ("0", "pass"),
    "SBPATCH=all": ("all", "pass"),
    "sbpatch imported and enabled (before)": (None, "import sbpatch; sbpatch.enable()"),
    "shims applied eagerly (before)": (None, EAGER_SHIMS),
}


HWM = "\nprint(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))"


def run_child(value: str | None, code: str) -> tuple[float, float, int]:
    """Wall and CPU seconds and peak RSS (bytes) of one fresh interpreter running ``code`` with ``SBPATCH=value``.

    CPU time (user + system, from the children's rusage) is what to compare on a loaded machine. The peak is the
    child's own VmHWM (kB): getrusage's ru_maxrss would include the parent's pages at fork.
    """
    env = {k: v for k, v in os.environ.items() if k != "SBPATCH"}
    if value is not None:
        env["SBPATCH"] = value
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + HWM], env=env, cwd="/", capture_output=True, text=True)
    wall = time.perf_counter() - t0  # the copy of sbpatch on PYTHONPATH, or the installed one
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if out.returncode != 0 or out.stderr:
        raise SystemExit(f"python -c {code!r} with SBPATCH={value!r}: exit {out.returncode}, {out.stderr.strip()}")
    return wall, cpu, int(out.stdout.split()[-1]) * 1024


def startup(rounds: int) -> dict[str, object]:
    """Each case once per round, interleaved, after one warm-up round; medians."""
    watched = ("sbpatch", "wrapt", "packaging", "torch", "numpy", "scipy")
    check = f"import sys; print(sorted(m for m in {watched!r} if m in sys.modules))"
    env = dict(os.environ)
    imported = {}
    for name, (value, _) in list(STARTUP_CASES.items())[:3]:
        case_env = {**env, "SBPATCH": value} if value is not None else {k: v for k, v in env.items() if k != "SBPATCH"}
        out = subprocess.run([sys.executable, "-c", check], env=case_env, cwd="/", capture_output=True, text=True)
        imported[name] = ast.literal_eval(out.stdout.strip())
    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in STARTUP_CASES}
    for r in range(rounds + 1):
        for name, (value, code) in STARTUP_CASES.items():
            sample = run_child(value, code)
            if r:
                samples[name].append(sample)
    return {
        "rounds": rounds,
        "cases": {
            name: {
                "wall_ms": statistics.median(w for w, _, _ in s) * 1e3,
                "cpu_ms": statistics.median(c for _, c, _ in s) * 1e3,
                "peak_rss_mib": statistics.median(m for _, _, m in s) / 2**20,
                "modules_at_start": imported.get(name),
            }
            for name, s in samples.items()
        },
    }


def print_startup(result: dict[str, object]) -> None:
    print(f"start-up of python -c pass (medians of {result['rounds']} interleaved runs):")
    for name, c in result["cases"].items():  # type: ignore[union-attr]
        loaded = "" if c["modules_at_start"] is None else f"  imports {c['modules_at_start']}"
        print(
            f"  {name:38s} wall {c['wall_ms']:7.1f} ms  cpu {c['cpu_ms']:7.1f} ms  {c['peak_rss_mib']:6.1f} MiB{loaded}"
        )


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--calls", type=int, default=2000, help="calls per batch")
    p.add_argument("--rounds", type=int, default=15, help="batches per measurement")
    p.add_argument("--startup-rounds", type=int, default=15,
                   help="interpreter starts per start-up case (0: keep the start-up rows already in --out's file)")
    p.add_argument("--startup-only", action="store_true", help="only the start-up rows, merged into --out's file")
    p.add_argument("--transformer", default="vit_b_16", help="second model for the per-call rows ('' to skip)")
    args = p.parse_args()
    meta = _common.setup(args)
    if args.startup_rounds:
        startup_result = startup(args.startup_rounds)
        startup_result["date"] = meta["date"]
        print_startup(startup_result)
    else:
        with open(os.path.join(args.out, "overhead.json")) as f:
            startup_result = json.load(f).get("startup")
    if args.startup_only:
        path = os.path.join(args.out, "overhead.json")
        data = {"meta": meta}
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        data["startup"] = startup_result
        _common.write(args, "overhead", data)
        return 0

    import torch
    import torchvision

    from sbpatch.bench.models import build_model

    model = build_model(args.model, 32).to(args.device)
    n_params = len(list(model.parameters()))
    x = torch.rand(2, 3, 32, 32, device=args.device)
    y = torch.zeros(2, dtype=torch.long, device=args.device)
    results = call_costs(model, x, y, args, cold=True)
    transformer = None
    if args.transformer:
        t_model = build_model(args.transformer, 32).to(args.device)
        transformer = {"model": args.transformer, "image_size": 32,
                       "parameter_tensors": len(list(t_model.parameters()))}
        transformer["results"] = call_costs(t_model, x, y, args, cold=False)
        torch.manual_seed(0)
        narrow = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=12, num_heads=4,
                                                      hidden_dim=64, mlp_dim=256, num_classes=10).eval()
        transformer["results"]["forward"] = forward_cost(narrow.to(args.device), x, args)
        transformer["results"]["forward"]["model"] = "ViT-B/16 layout at width 64 (12 layers, 152 tensors), 32 px"

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
        "startup": startup_result,
        "transformer": transformer,
    }
    print(f"{args.model}: {n_params} parameter tensors; torch {meta['torch']}, {meta['threads']} thread(s)")
    print(f"  first call (cold cache): {results['first_call_us']:.1f} us")
    print_costs(results)
    print(f"target < 50 us: {'met' if data['met'] else 'MISSED'} (worst {worst:.1f} us)")
    if transformer:
        print(f"{args.transformer} at 32 px: {transformer['parameter_tensors']} parameter tensors")
        print_costs(transformer["results"])
    _common.write(args, "overhead", data)
    return 0


def print_costs(results: dict[str, Any]) -> None:
    for k in ("wrapper", "frozen", "torchattacks", "forward"):
        if k in results:
            r = results[k]
            print(f"  {k:13s} overhead {r['overhead_us']:6.1f} us/call  "
                  f"(baseline {r['baseline_us']:.1f} us, with sbpatch {r['with_sbpatch_us']:.1f} us)")


def call_costs(model: Any, x: Any, y: Any, args: Any, cold: bool) -> dict[str, Any]:
    """The wrapper, ``frozen()`` and torchattacks per-call overheads on ``model`` (``cold``: also the first call)."""
    import sbpatch
    from sbpatch import freeze, patching

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
    if cold:  # the first freeze of a model walks its modules (cached afterwards until a module or parameter is added)
        freeze._param_cache.clear()
        t0 = time.perf_counter()
        patched()
        results["first_call_us"] = (time.perf_counter() - t0) * 1e6
        assert freeze.held_count() == 0 and all(p.requires_grad for p in model.parameters())
    else:  # steady state: a real frozen forward first, so the run-time rules have learned what to keep
        with frozen_cm:
            model(x)

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
    return results


def forward_cost(model: Any, x: Any, args: Any) -> dict[str, Any]:
    """One forward pass (a query: grad mode on, input without grad) inside ``sbpatch.frozen(model)`` versus with the
    same ``requires_grad`` flags set by hand: same kernels, so the difference is sbpatch's bookkeeping and hooks."""
    import torch

    import sbpatch

    params = list(model.parameters())
    frozen_cm = sbpatch.frozen(model)
    inside: list[bool] = []
    hook = model.register_forward_pre_hook(lambda m, i: inside.extend(p.requires_grad for p in params))
    with frozen_cm:
        model(x)
        model(x)  # the second call sees what the first one learned
    hook.remove()
    flags = inside[len(params):]

    def by_hand() -> Any:
        saved = [p.requires_grad for p in params]
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        try:
            return model(x)
        finally:
            for p, f in zip(params, saved):
                p.requires_grad_(f)

    def with_sbpatch() -> Any:
        with frozen_cm:
            return model(x)

    assert torch.equal(by_hand(), with_sbpatch()), "frozen() and the same flags by hand gave different logits"
    calls = max(args.calls // 40, 5)
    base, full, diff = interleaved(by_hand, with_sbpatch, calls, args.rounds)
    return {"baseline_us": base * 1e6, "with_sbpatch_us": full * 1e6, "overhead_us": diff * 1e6,
            "kept_live": sum(flags), "calls_per_round": calls}


if __name__ == "__main__":
    raise SystemExit(main())
