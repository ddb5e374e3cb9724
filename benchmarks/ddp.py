"""DDP adversarial training: what sbpatch saves in communication, time and memory per training step.

Two gloo ranks on 127.0.0.1 (``torch.multiprocessing`` spawn, one thread each by default) train a
``DistributedDataParallel`` model (DDP's defaults: no ``find_unused_parameters``) Madry-style: each step makes the
adversarial batch with the library's PGD-K (its contrib ``cases()`` builder, advertorch by default, which calls
``loss.backward()``) in eval mode, then one SGD step in train mode. Columns, interleaved per round: the library
**as shipped** (``sbpatch.paused()``) and **sbpatch**. Per step and rank: wall and CPU time (medians), gradient
all-reduces (calls and bytes, counted by a DDP comm hook), every gloo collective (the profiler's ``gloo:*``
events, one extra untimed step), and the attack's peak memory (CPU: bytes saved for backward plus the ``.grad``
buffers it leaves; CUDA: the allocator's peak). As shipped, every attack step's backward all-reduces the whole
model and every forward broadcasts the batch-norm buffers; with sbpatch only the training step communicates.

Models: ResNet18 (batch norm: DDP broadcasts buffers) and a small torchvision ViT (``nn.MultiheadAttention``:
its in-projections stay live under sbpatch, so without ``no_sync`` DDP would all-reduce them). CPU default:
K = 1, 3, 7, 2 steps of batch 8 per rank and round, 32 px, 2 rounds after a warm-up. ``--full``: batch 64,
4 steps, 3 rounds (with ``--device cuda`` the ranks share the visible GPUs; still gloo). Run:
``python benchmarks/ddp.py``; writes ``benchmarks/results/ddp.json``, ``ddp.md`` and ``ddp.png``.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import statistics
import sys
import time
from typing import Any

import _common

MODELS = ("resnet18", "vit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(name: str, image_size: int) -> Any:
    import torch
    import torchvision

    from sbpatch.bench.models import build_model

    if name != "vit":
        return build_model(name, image_size)
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    with torch.no_grad():  # torchvision zero-initialises the head
        model.heads.head.weight.normal_(0, 0.02)
    return model.eval()


class Trainer:
    """One rank's DDP model, its comm-hook counts, and the adversarial-training step."""

    def __init__(self, model: Any, builder: Any, device: str) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.model, self.builder, self.device = model, builder, device
        self.initial = {k: v.clone() for k, v in model.state_dict().items()}
        self.ddp = DDP(model)  # DDP's defaults: no find_unused_parameters, broadcast_buffers=True
        self.counts = {"calls": 0, "bytes": 0}
        self.ddp.register_comm_hook(None, self._hook)
        self.opt: Any = None
        self.torch = torch

    def _hook(self, state: Any, bucket):  # DDP checks the name and annotation of `bucket` and of the return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buf = bucket.buffer()
        self.counts["calls"] += 1
        self.counts["bytes"] += buf.numel() * buf.element_size()
        return default_hooks.allreduce_hook(None, bucket)

    def reset(self) -> None:
        from sbpatch.bench import runner

        self.model.load_state_dict(self.initial)
        self.opt = self.torch.optim.SGD(self.ddp.parameters(), lr=0.01, momentum=0.9)
        runner.seed_all()

    def attack(self, column: str, x: Any, y: Any, k: int) -> Any:
        import numpy as np

        import sbpatch

        call = self.builder(self.ddp, x, y, k)
        if column == "sbpatch":
            out = call()
        else:
            with sbpatch.paused():
                out = call()
        return self.torch.as_tensor(out if isinstance(out, self.torch.Tensor) else np.asarray(out)).to(self.device)

    def step(self, column: str, x: Any, y: Any, k: int) -> dict[str, int]:
        import torch.nn.functional as F

        counts, c0 = self.counts, dict(self.counts)
        self.model.eval()
        x_adv = self.attack(column, x, y, k)
        attack_calls, attack_bytes = counts["calls"] - c0["calls"], counts["bytes"] - c0["bytes"]
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.ddp(x_adv), y).backward()
        self.opt.step()
        return {"attack_allreduce_calls": attack_calls, "attack_allreduce_bytes": attack_bytes,
                "step_allreduce_calls": counts["calls"] - c0["calls"],
                "step_allreduce_bytes": counts["bytes"] - c0["bytes"]}


def measure(trainer: Trainer, data: list[Any], k: int, rounds: int, rank: int) -> dict[str, Any]:
    """One (model, K) row for this rank: interleaved timed rounds, then one profiled step and the attack's memory."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from sbpatch.bench import runner

    cuda = trainer.device.startswith("cuda")
    times: dict[str, dict[str, list[float]]] = {c: {"wall": [], "cpu": []} for c in ("shipped", "sbpatch")}
    comm: dict[str, dict[str, int]] = {}
    for r in range(rounds + 1):  # round 0 warms up
        for column in (("shipped", "sbpatch") if r % 2 == 0 else ("sbpatch", "shipped")):
            trainer.reset()
            for x, y in data:
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                w0, c0 = time.perf_counter(), time.process_time()
                stats = trainer.step(column, x, y, k)
                if cuda:
                    torch.cuda.synchronize()
                if r:
                    times[column]["wall"].append(time.perf_counter() - w0)
                    times[column]["cpu"].append(time.process_time() - c0)
                comm[column] = stats
    collectives: dict[str, dict[str, int]] = {}
    memory: dict[str, int] = {}
    x, y = data[0]
    for column in ("shipped", "sbpatch"):
        trainer.reset()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.step(column, x, y, k)
        names: dict[str, int] = {}
        for e in prof.events():
            if e.name.startswith("gloo:"):
                names[e.name] = names.get(e.name, 0) + 1
        collectives[column] = names
        trainer.model.eval()
        memory[column] = runner.measure_memory(
            trainer.model, functools.partial(trainer.attack, column, x, y, k), trainer.device
        )
    med = {c: {m: statistics.median(v) for m, v in t.items()} for c, t in times.items()}
    return {"K": k, "rank": rank, "median_s": med, "comm": comm, "collectives": collectives,
            "attack_peak_bytes": memory}


def worker(rank: int, port: int, cfg: dict[str, Any], out: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=cfg["timeout"]))
    torch.set_num_threads(cfg["threads"])
    import sbpatch
    from sbpatch.bench import workloads

    library = cfg["library"]
    sbpatch.enable(library)
    cases, note = workloads.library_cases(library)
    case = next((n for n in workloads.PGD_NAMES[library] if n in cases), None)
    if case is None:
        raise SystemExit(f"{library} has no PGD case: {note}")
    device = cfg["device"]
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    size, bs = cfg["image_size"], cfg["batch_size"]
    data = [
        (torch.rand(bs, 3, size, size, generator=g).to(device), torch.randint(0, 10, (bs,), generator=g).to(device))
        for _ in range(cfg["steps"])
    ]
    rows = []
    for model_name in cfg["models"]:
        trainer = Trainer(build(model_name, size).to(device), cases[case], device)
        for k in cfg["ks"]:
            row = {"model": model_name, **measure(trainer, data, k, cfg["rounds"], rank)}
            rows.append(row)
            if rank == 0:
                med, comm = row["median_s"], row["comm"]
                print(f"{model_name} K={k}: wall {med['shipped']['wall']:.3f} -> {med['sbpatch']['wall']:.3f} s, "
                      f"attack all-reduces per step {comm['shipped']['attack_allreduce_calls']} -> "
                      f"{comm['sbpatch']['attack_allreduce_calls']}", flush=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rows": rows, "case": case}, f)
    dist.barrier()
    dist.destroy_process_group()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"DDP adversarial training, 2 gloo ranks, {data['library']} {data['case']}, batch {data['batch_size']} "
        f"per rank, {data['image_size']} px, {data['meta'].get('threads')} thread(s) per rank, torch "
        f"{data['meta'].get('torch')}, {data['meta'].get('device')}. Per training step and rank (attack + SGD "
        "step); times are medians over ranks' steps; ratio = as shipped / sbpatch.",
        "",
        "| model | K | wall shipped -> sbpatch | ratio wall / cpu | gradient all-reduces in the attack | "
        "bytes all-reduced per step | other collectives per step | attack peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["results"]:
        sh, sb = r["comm"]["shipped"], r["comm"]["sbpatch"]
        other = {c: sum(n for name, n in r["collectives"][c].items() if name != "gloo:all_reduce")
                 for c in ("shipped", "sbpatch")}
        lines.append(
            f"| {r['model']} | {r['K']} | {r['median_s']['shipped']['wall']:.3f} s -> "
            f"{r['median_s']['sbpatch']['wall']:.3f} s | {r['speedup_wall']:.2f}x / {r['speedup_cpu']:.2f}x | "
            f"{sh['attack_allreduce_calls']} -> {sb['attack_allreduce_calls']} | "
            f"{fmt_bytes(sh['step_allreduce_bytes'])} -> {fmt_bytes(sb['step_allreduce_bytes'])} | "
            f"{other['shipped']} -> {other['sbpatch']} | "
            f"{fmt_bytes(r['attack_peak_bytes']['shipped'])} -> {fmt_bytes(r['attack_peak_bytes']['sbpatch'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(path: str, data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in data["results"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model in models:
        rows = [r for r in data["results"] if r["model"] == model]
        ks = [r["K"] for r in rows]
        axes[0].plot(ks, [r["speedup_wall"] for r in rows], "o-", label=f"{model} wall")
        axes[0].plot(ks, [r["speedup_cpu"] for r in rows], "s--", label=f"{model} cpu")
        for column, style in (("shipped", "o-"), ("sbpatch", "s-")):
            axes[1].plot(ks, [r["comm"][column]["step_allreduce_bytes"] / 2**20 for r in rows], style,
                         label=f"{model} {'as shipped' if column == 'shipped' else 'sbpatch'}")
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].set(xlabel="PGD steps K", ylabel="as shipped / sbpatch", title="training-step speed-up")
    axes[1].set(xlabel="PGD steps K", ylabel="MiB all-reduced per step and rank", title="gradient communication")
    for ax in axes:
        ax.set_xticks(sorted({r["K"] for r in data["results"]}))
        ax.legend(fontsize=8)
    fig.suptitle(f"DDP adversarial training, 2 gloo ranks, {data['library']} PGD-K")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--library", default="advertorch",
                   choices=("advertorch", "art", "foolbox", "cleverhans", "deeprobust", "torchattacks"))
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--ks", default="1,3,7", help="comma-separated K values")
    p.add_argument("--steps", type=int, default=None, help="training steps per round and column")
    p.add_argument("--batch-size", type=int, default=None, help="per rank")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--timeout", type=int, default=600, help="seconds for any collective before a rank gives up")
    args = p.parse_args()
    meta = _common.setup(args)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS and m != "resnet50"]
    if bad:
        sys.exit(f"--models: unknown {bad}; valid: {', '.join(MODELS)}, resnet50")
    cfg = {
        "library": args.library, "models": models, "ks": [int(k) for k in args.ks.split(",")],
        "steps": args.steps or (4 if args.full else 2), "batch_size": args.batch_size or (64 if args.full else 8),
        "image_size": args.image_size, "rounds": args.repeats or (3 if args.full else 2), "threads": args.threads,
        "device": args.device, "timeout": args.timeout,
    }

    import json
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(free_port(), cfg, tmp), nprocs=2)  # a failing rank terminates the other
        per_rank = []
        for r in range(2):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    results = []
    for r0, r1 in zip(per_rank[0]["rows"], per_rank[1]["rows"]):
        row = dict(r0)
        row.pop("rank")
        med = {c: {m: statistics.median([r0["median_s"][c][m], r1["median_s"][c][m]]) for m in ("wall", "cpu")}
               for c in ("shipped", "sbpatch")}
        row["median_s"] = med
        row["speedup_wall"] = med["shipped"]["wall"] / med["sbpatch"]["wall"]
        row["speedup_cpu"] = med["shipped"]["cpu"] / med["sbpatch"]["cpu"]
        row["attack_peak_bytes"] = {c: max(r0["attack_peak_bytes"][c], r1["attack_peak_bytes"][c])
                                    for c in ("shipped", "sbpatch")}
        row["per_rank"] = [r0, r1]
        results.append(row)
    data = {"meta": meta, "experiment": "ddp", "full": args.full, "library": args.library,
            "case": per_rank[0]["case"], "world_size": 2, "backend": "gloo", **cfg, "results": results}
    name = "ddp_full" if args.full else "ddp"
    _common.write(args, name, data)
    md = markdown(data)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(md)
    plot(os.path.join(args.out, f"{name}.png"), data)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
