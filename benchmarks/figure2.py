"""Figure 2: adversarial-training epoch time with K-step PGD, as shipped / one-liner / sbpatch, against theory.

Madry-style training on ResNet18 with CIFAR-sized random data: for each batch the library's PGD-K (its contrib
``cases()`` builder, advertorch by default) makes the adversarial batch with the model in eval mode, then one SGD
step in train mode. The epoch time ratio as shipped / sbpatch is compared with the theoretical (6+6K)/(6+4K)
(a forward pass costs 2 units, each backward half 2: a training step 6, an attack step 6 live or 4 frozen).
Target (issue 5): measured speed-up >= 95% of the theoretical ratio. Epochs are interleaved per column, the model
and optimizer reset at each epoch. CPU default: K = 1, 3, 7, 4 batches of 16 per epoch, 32 px, 2 repeats.
``--full`` (a GPU): K = 1, 2, 3, 5, 7, 10, 391 batches of 128 (one CIFAR-10 epoch). Run:
``python benchmarks/figure2.py``.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any

import _common


def theoretical(k: int) -> float:
    return (6 + 6 * k) / (6 + 4 * k)


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--library", default="advertorch", choices=("advertorch", "art", "foolbox", "cleverhans",
                                                               "deeprobust", "torchattacks"))
    p.add_argument("--ks", default=None, help="comma-separated K values")
    p.add_argument("--batches", type=int, default=None, help="batches per epoch")
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args()
    meta = _common.setup(args)
    ks = [1, 2, 3, 5, 7, 10] if args.full else [1, 3, 7]
    if args.ks:
        ks = [int(k) for k in args.ks.split(",")]
    n_batches = args.batches or (391 if args.full else 4)
    batch_size = args.batch_size or (128 if args.full else 16)
    repeats = args.repeats or (3 if args.full else 2)

    import numpy as np
    import torch
    import torch.nn.functional as F

    import sbpatch
    from sbpatch import registry
    from sbpatch.bench import runner, workloads
    from sbpatch.bench.models import build_model

    sbpatch.enable(args.library)
    cases, note = workloads.library_cases(args.library)
    case = next((n for n in workloads.PGD_NAMES[args.library] if n in cases), None)
    if case is None:
        raise SystemExit(f"{args.library} has no PGD case: {note}")
    builder = cases[case]
    device = args.device
    model = build_model("resnet18", 32).to(device)
    initial = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(batch_size, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (batch_size,), generator=g).to(device)) for _ in range(n_batches)]
    params = list(model.parameters())
    counters = registry.counters(args.library)

    def attack(column: str, x: Any, y: Any, k: int) -> Any:
        call = builder(model, x, y, k)
        if column == "sbpatch":
            return call()
        with sbpatch.paused():
            if column == "shipped":
                return call()
            [q.requires_grad_(False) for q in params]
            try:
                return call()
            finally:
                [q.requires_grad_(True) for q in params]

    def epoch(column: str, k: int) -> tuple[float, float]:
        model.load_state_dict(initial)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runner.seed_all()
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        for x, y in data:
            model.eval()
            x_adv = attack(column, x, y, k)
            x_adv = torch.as_tensor(np.asarray(x_adv) if not isinstance(x_adv, torch.Tensor) else x_adv).to(device)
            model.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_adv), y).backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - w0, time.process_time() - c0

    columns = ("shipped", "oneliner", "sbpatch")
    results = []
    for k in ks:
        times: dict[str, dict[str, list[float]]] = {c: {"wall": [], "cpu": []} for c in columns}
        calls0 = counters.calls
        for i in range(repeats + 1):  # the first round warms up
            for c in columns:
                w, cpu = epoch(c, k)
                if i:
                    times[c]["wall"].append(w)
                    times[c]["cpu"].append(cpu)
        med = {c: {m: statistics.median(v) for m, v in t.items()} for c, t in times.items()}
        row = {"K": k, "theoretical": theoretical(k), "median_s": med, "engaged": counters.calls > calls0}
        for m in ("wall", "cpu"):
            row[f"speedup_{m}"] = med["shipped"][m] / med["sbpatch"][m]
            row[f"oneliner_speedup_{m}"] = med["shipped"][m] / med["oneliner"][m]
            row[f"efficiency_{m}"] = row[f"speedup_{m}"] / theoretical(k)
        results.append(row)
        print(f"K={k}: theory {theoretical(k):.3f}x; sbpatch {row['speedup_cpu']:.3f}x cpu "
              f"({row['efficiency_cpu']:.0%} of theory), {row['speedup_wall']:.3f}x wall; one-liner "
              f"{row['oneliner_speedup_cpu']:.3f}x cpu")
    metric = "wall" if device.startswith("cuda") else "cpu"
    data_out = {"meta": meta, "experiment": "figure2", "full": args.full, "library": args.library, "case": case,
                "batches_per_epoch": n_batches, "batch_size": batch_size, "repeats": repeats, "metric": metric,
                "results": results, "target": ">= 0.95 of theoretical",
                "met": all(r[f"efficiency_{metric}"] >= 0.95 for r in results)}
    name = "figure2_full" if args.full else "figure2"
    _common.write(args, name, data_out)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    kk = [r["K"] for r in results]
    ax.plot(kk, [theoretical(k) for k in kk], "k--", label="theory (6+6K)/(6+4K)")
    ax.plot(kk, [r[f"speedup_{metric}"] for r in results], "o-", color="#e65100", label="sbpatch")
    ax.plot(kk, [r[f"oneliner_speedup_{metric}"] for r in results], "s:", color="#64b5f6", label="one-liner")
    ax.axhline(1.0, color="gray", linewidth=0.6)
    ax.set_xlabel("K (PGD steps per training batch)")
    ax.set_ylabel(f"epoch speed-up over as shipped ({metric})")
    ax.set_title(f"Figure 2: adversarial training, ResNet18, {args.library} PGD-K\n"
                 f"{n_batches}x{batch_size} per epoch; torch {meta['torch']}, {device}, {meta['threads']} thread(s)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out, f"{name}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
