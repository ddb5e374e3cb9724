"""GCG gradient steps on random Llama models: as shipped vs sbpatch, time and memory, float32 and bfloat16.

Two ways research code computes GCG's token gradient (the gradient of the target loss with respect to the one-hot
suffix), one step each:

* ``llm-attacks``: ``examples/gcg_utils.token_gradients`` (llm-attacks' ``token_gradients``: ``loss.backward()`` with
  every weight live, so PyTorch also computes every weight gradient and leaves it in ``param.grad``); sbpatch via
  ``SBPATCH_TARGETS``-style named target ``gcg_utils:token_gradients``.
* ``nanoGCG``: nanoGCG 0.3.0's own ``GCG.compute_token_gradient`` (``torch.autograd.grad(loss, one_hot)``: PyTorch
  already prunes the weight gradients); sbpatch via ``sbpatch.enable("nanogcg")``. The ``GCG`` object is set up as
  ``GCG.run`` sets it up (embeddings of the fixed prompt, target, no prefix cache), without a tokenizer.

Per configuration (model size x dtype x method x mode), a fresh subprocess so that peaks never mix: build the model
(random init, in that dtype), one warm-up step, ``--repeats`` timed steps (medians of wall and CPU time), then one
step under ``SavedTensorMeter`` (peak bytes saved for backward, parameters excluded) and the ``.grad`` bytes the step
left. Peak RSS is ``ru_maxrss`` of the subprocess; "step RSS" is its growth over the RSS high-water mark reached after
building the model (what the gradient steps themselves added). Gradients are checked bit-identical between modes.
Sequence: 24 prompt tokens, 20 suffix tokens, 4 tokens after, 16 target tokens (64 in all), vocabulary 32000.
One torch thread by default. Run: ``python benchmarks/llm.py`` (about 9 minutes on 2 cores); writes
``benchmarks/results/llm.json``, ``llm.md`` and ``llm.png``. On a GPU: ``--full --device cuda --dtypes bfloat16``
(1.26B, TinyLlama's shape, and 6.7B, Llama-2-7B's, the model llm-attacks PR 77 measured; ``benchmarks/gpu_run.sh``
runs it with ``--sizes 1.26B,6.7B``), whose table adds the CUDA allocator's peaks.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import _common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# name -> (hidden, layers, intermediate, heads); vocabulary 32000 (Llama-2's), key/value heads = heads
SIZES: dict[str, tuple[int, int, int, int]] = {
    "20M": (256, 4, 704, 4),
    "58M": (512, 8, 1408, 8),
    "134M": (768, 12, 2048, 12),
    "271M": (1024, 16, 2816, 16),
    "478M": (1280, 20, 3456, 20),
}
FULL_SIZES = ("478M", "1.26B", "6.7B")
SIZES["1.26B"] = (2048, 22, 5632, 32)  # --full (GPU): TinyLlama-1.1B's shape, all heads key/value
SIZES["6.7B"] = (4096, 32, 11008, 32)  # --full (GPU): Llama-2-7B's shape (llm-attacks PR 77 measured that model)
VOCAB = 32000
BEFORE, SUFFIX, AFTER, TARGET = 24, 20, 4, 16
METHODS = ("llm-attacks", "nanoGCG")
MODES = ("shipped", "sbpatch")
DTYPES = ("float32", "bfloat16")


# --- the worker: one configuration in a fresh process ---------------------------------------------------------------

def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    dtype = getattr(torch, spec["dtype"])
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import sbpatch
    from sbpatch import registry
    from sbpatch.bench.runner import SavedTensorMeter

    patched = spec["mode"] == "sbpatch"
    if patched:
        if spec["method"] == "nanoGCG":
            sbpatch.enable("nanogcg")
        else:
            sbpatch.enable_targets("gcg_utils:token_gradients")
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads = SIZES[spec["size"]]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy inflating the bfloat16 peak
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (BEFORE + SUFFIX + AFTER + TARGET,), generator=g).to(device)
    control = slice(BEFORE, BEFORE + SUFFIX)
    target = slice(BEFORE + SUFFIX + AFTER, len(input_ids))
    loss_slice = slice(target.start - 1, target.stop - 1)

    if spec["method"] == "nanoGCG":
        from nanogcg import GCGConfig
        from nanogcg.gcg import GCG

        gcg = GCG.__new__(GCG)  # what GCG.run sets up before its steps, without a tokenizer
        gcg.model, gcg.config, gcg.prefix_cache = model, GCGConfig(use_prefix_cache=False), None
        gcg.embedding_layer = model.get_input_embeddings()
        ids = input_ids.unsqueeze(0)
        # as in GCG.run: embedded with grad enabled and live weights, outside the gradient step
        gcg.before_embeds, gcg.after_embeds, gcg.target_embeds = (
            gcg.embedding_layer(ids[:, : control.start]),
            gcg.embedding_layer(ids[:, control.stop : target.start]),
            gcg.embedding_layer(ids[:, target]),
        )
        gcg.target_ids = ids[:, target]
        optim_ids = ids[:, control]

        def step() -> torch.Tensor:
            return gcg.compute_token_gradient(optim_ids)

        counters = registry.counters("nanogcg")
    else:
        import gcg_utils

        def step() -> torch.Tensor:
            return gcg_utils.token_gradients(model, input_ids, control, target, loss_slice)

        counters = None

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def reset() -> None:
        for p in model.parameters():
            p.grad = None

    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset()
    grad = step()  # warm-up
    wall, cpu = [], []
    for _ in range(spec["repeats"]):
        reset()
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    reset()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    meter = SavedTensorMeter(list(model.parameters()) + list(model.buffers()))
    with meter.measuring():
        step()
    sync()
    cuda_peak = torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else None
    cuda_total = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    grad_bytes = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if patched:
        calls = counters.calls if counters is not None else sbpatch.status()["targets"].calls
        engaged = calls > 0
    else:
        engaged = None
    torch.save(grad.detach().cpu(), spec["grad_path"])
    return {
        "params": n_params,
        "wall_s": statistics.median(wall),
        "cpu_s": statistics.median(cpu),
        "wall_all": wall,
        "saved_bytes": meter.peak,
        "grad_bytes": grad_bytes,
        "rss_peak": rss_peak,
        "rss_built": rss_built,
        "rss_step": rss_peak - rss_built,
        "cuda_peak": cuda_peak,
        "cuda_total": cuda_total,
        "engaged": engaged,
    }


# --- the driver -----------------------------------------------------------------------------------------------------

def run_one(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("SBPATCH", "SBPATCH_TARGETS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, HERE, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    env["TRANSFORMERS_VERBOSITY"] = "error"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def markdown(data: dict[str, Any]) -> str:
    meta = data["machine"]
    if meta["device"] == "cuda":
        return markdown_cuda(data)
    lines = [
        "# GCG gradient step on random Llama models: as shipped vs sbpatch",
        "",
        f"`python benchmarks/llm.py` ({data['elapsed_s']:.0f} s): torch {meta['torch']}, {meta['device']} "
        f"({meta['device_name']}), {meta['threads']} thread(s), {data['repeats']} timed steps per configuration "
        "(medians), each configuration in a fresh process. Sequence 64 tokens (20-token suffix, 16-token target), "
        f"vocabulary 32000. nanogcg {data['nanogcg']}, transformers {data['transformers']}.",
        "",
        "Memory columns: **saved** = peak bytes autograd saved for backward during the step (parameters excluded); "
        "**.grad** = weight-gradient buffers the step left; **step RSS** = growth of the process's peak RSS during "
        "the steps over its peak after building the model; **peak RSS** = the process's peak. "
        "shipped -> sbpatch; ratio = shipped / sbpatch.",
        "",
        "| method | dtype | params | CPU time shipped -> sbpatch | speed-up (CPU / wall) | saved MiB | .grad MiB | "
        "step RSS MiB | peak RSS MiB | identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        s, p = r["shipped"], r["sbpatch"]
        if "error" in s or "error" in p:
            lines.append(f"| {r['method']} | {r['dtype']} | {r['size']} | error: {s.get('error') or p.get('error')} "
                         "| | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['dtype']} | {s['params'] / 1e6:.0f}M | {s['cpu_s']:.3f} s -> {p['cpu_s']:.3f} s "
            f"| {s['cpu_s'] / p['cpu_s']:.2f}x / {s['wall_s'] / p['wall_s']:.2f}x "
            f"| {mib(s['saved_bytes'])} -> {mib(p['saved_bytes'])} "
            f"| {mib(s['grad_bytes'])} -> {mib(p['grad_bytes'])} | {mib(s['rss_step'])} -> {mib(p['rss_step'])} "
            f"| {mib(s['rss_peak'])} -> {mib(p['rss_peak'])} | {'yes' if r['identical'] else 'NO'} |"
        )
    lines += ["", "![memory vs parameters](llm.png)", "", *summary(data), ""]
    return "\n".join(lines)


def markdown_cuda(data: dict[str, Any]) -> str:
    """The GPU table: wall time and the CUDA allocator's peaks (the figures llm-attacks PR 77 reports)."""
    meta = data["machine"]
    lines = [
        "# GCG gradient step on random Llama models, GPU: as shipped vs sbpatch",
        "",
        f"`python benchmarks/llm.py --full --device cuda --dtypes bfloat16` ({data['elapsed_s']:.0f} s): "
        f"torch {meta['torch']}, {meta.get('device_name', 'cuda')}, {data['repeats']} timed steps per configuration "
        "(medians of wall time, synchronised), each configuration in a fresh process. Sequence 64 tokens (20-token "
        f"suffix, 16-token target), vocabulary 32000. nanogcg {data['nanogcg']}, transformers {data['transformers']}.",
        "",
        "**peak** = `torch.cuda.max_memory_allocated()` during one step, weights included (what PR 77 of llm-attacks "
        "reports: Llama-2-7B, fp16, 32.1 GB as shipped -> 19.8 GB frozen); **step peak** = the same minus what was "
        "allocated before the step (the weights); **saved** = bytes autograd saved for backward (parameters "
        "excluded); **.grad** = weight-gradient buffers the step left. shipped -> sbpatch.",
        "",
        "| method | dtype | params | wall time shipped -> sbpatch | speed-up | peak GiB | step peak GiB | saved MiB | "
        ".grad GiB | identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        s, p = r["shipped"], r["sbpatch"]
        if "error" in s or "error" in p:
            lines.append(f"| {r['method']} | {r['dtype']} | {r['size']} | error: {s.get('error') or p.get('error')} "
                         "| | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['dtype']} | {s['params'] / 1e9:.2f}B | {s['wall_s'] * 1e3:.1f} ms -> "
            f"{p['wall_s'] * 1e3:.1f} ms | {s['wall_s'] / p['wall_s']:.2f}x "
            f"| {gib(s['cuda_total'])} -> {gib(p['cuda_total'])} | {gib(s['cuda_peak'])} -> {gib(p['cuda_peak'])} "
            f"| {mib(s['saved_bytes'])} -> {mib(p['saved_bytes'])} | {gib(s['grad_bytes'])} -> {gib(p['grad_bytes'])} "
            f"| {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join([*lines, ""])


def summary(data: dict[str, Any]) -> list[str]:
    """The ranges the table shows, per method (over sizes and dtypes)."""
    out = ["What it shows (ranges over sizes and dtypes; CPU-time ratios on a shared machine are noisy):", ""]
    for method in METHODS:
        rows = [r for r in data["rows"] if r["method"] == method and "error" not in r["shipped"]
                and "error" not in r["sbpatch"]]
        if not rows:
            continue

        def span(f: Any, rows: list[dict[str, Any]] = rows) -> str:
            values = [f(r["shipped"], r["sbpatch"]) for r in rows]
            return f"{min(values):.2f}-{max(values):.2f}x"

        grads = [r["shipped"]["grad_bytes"] for r in rows]

        def total(c: dict[str, Any]) -> float:
            return c["saved_bytes"] + c["grad_bytes"]

        out.append(
            f"- {method}: bytes saved for backward {span(lambda s, p: s['saved_bytes'] / p['saved_bytes'])} lower; "
            f"saved + .grad {span(lambda s, p: total(s) / total(p))} "
            f"lower; step RSS {span(lambda s, p: s['rss_step'] / p['rss_step'])} lower; CPU time "
            f"{span(lambda s, p: s['cpu_s'] / p['cpu_s'])}; .grad left as shipped: "
            + ("none" if not any(grads) else f"{mib(min(grads))}-{mib(max(grads))} MiB (one model's worth)")
            + f"; with sbpatch: none; gradients identical in {sum(r['identical'] for r in rows)} of {len(rows)}."
        )
    return out


def plot(path: str, data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex=True)
    colors = {"llm-attacks": "#1565c0", "nanoGCG": "#e65100"}
    metrics = (("saved + .grad (MiB)", lambda c: (c["saved_bytes"] + c["grad_bytes"]) / 2**20),
               ("step RSS growth (MiB)", lambda c: max(c["rss_step"], 2**20) / 2**20))
    for col, dtype in enumerate(DTYPES):
        for row, (label, value) in enumerate(metrics):
            ax = axes[row][col]
            for method in METHODS:
                rows = [r for r in data["rows"] if r["method"] == method and r["dtype"] == dtype
                        and "error" not in r["shipped"] and "error" not in r["sbpatch"]]
                xs = [r["shipped"]["params"] / 1e6 for r in rows]
                for mode, style, marker in (("shipped", "--", "x"), ("sbpatch", "-", "o")):
                    ax.plot(xs, [value(r[mode]) for r in rows], style, marker=marker, color=colors[method],
                            label=f"{method} {'as shipped' if mode == 'shipped' else 'sbpatch'}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ticks = sorted({r["shipped"]["params"] / 1e6 for r in data["rows"] if "params" in r["shipped"]})
            ax.set_xticks(ticks, [f"{t:.0f}M" for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{dtype}: {label}", fontsize=10)
            if row == 1:
                ax.set_xlabel("parameters (millions)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("GCG gradient step, random Llama, CPU: memory as shipped vs sbpatch", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return 0
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help=f"comma-separated, of {','.join(SIZES)} (default 20M..478M)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    p.add_argument("--replot", action="store_true", help="rewrite llm.md and llm.png from llm.json, measure nothing")
    args = p.parse_args()
    if args.replot:
        with open(os.path.join(args.out, "llm.json")) as f:
            return report_files(args, json.load(f))
    meta = _common.setup(args)
    sizes = (args.sizes or (",".join(FULL_SIZES) if args.full else "20M,58M,134M,271M,478M")).split(",")
    repeats = args.repeats or 5
    import torch

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for dtype in args.dtypes.split(","):
                for method in METHODS:
                    row: dict[str, Any] = {"size": size, "dtype": dtype, "method": method}
                    for mode in MODES:
                        spec = {"size": size, "dtype": dtype, "method": method, "mode": mode, "repeats": repeats,
                                "threads": args.threads, "device": args.device,
                                "grad_path": os.path.join(tmp, f"{mode}.pt")}
                        try:
                            row[mode] = run_one(spec, args.timeout)
                        except subprocess.TimeoutExpired:
                            row[mode] = {"error": f"ran past {args.timeout:.0f} s"}
                    ok = "error" not in row["shipped"] and "error" not in row["sbpatch"]
                    row["identical"] = ok and torch.equal(torch.load(os.path.join(tmp, "shipped.pt")),
                                                          torch.load(os.path.join(tmp, "sbpatch.pt")))
                    if ok and not row["sbpatch"]["engaged"]:
                        row["sbpatch"]["error"] = "sbpatch did not freeze the step"
                    rows.append(row)
                    s, q = row["shipped"], row["sbpatch"]
                    print(f"{size:>5} {dtype:>8} {method:>11}: "
                          + (f"{s['wall_s']:.3f}s -> {q['wall_s']:.3f}s, saved {mib(s['saved_bytes'])} -> "
                             f"{mib(q['saved_bytes'])} MiB, .grad {mib(s['grad_bytes'])} -> {mib(q['grad_bytes'])} "
                             f"MiB, step RSS {mib(s['rss_step'])} -> {mib(q['rss_step'])} MiB, "
                             f"identical {row['identical']}" if ok else f"error {s.get('error') or q.get('error')}"),
                          flush=True)
    from importlib.metadata import version

    data = {"machine": meta, "nanogcg": version("nanogcg"), "transformers": version("transformers"),
            "repeats": repeats, "sizes": {s: SIZES[s] for s in sizes}, "elapsed_s": time.perf_counter() - start,
            "rows": rows}
    _common.write(args, "llm", data)
    return report_files(args, data)


def report_files(args: Any, data: dict[str, Any]) -> int:
    """Write llm.md and llm.png from ``data``; 1 if any row failed or differed."""
    rows = data["rows"]
    md = os.path.join(args.out, "llm.md")
    with open(md, "w") as f:
        f.write(markdown(data))
    print(f"wrote {md}")
    if data["machine"]["device"] != "cuda":
        png = os.path.join(args.out, "llm.png")
        plot(png, data)
        print(f"wrote {png}")
    failed = [r for r in rows if not r["identical"] or "error" in r["shipped"] or "error" in r["sbpatch"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
