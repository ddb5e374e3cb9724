"""Helpers shared by the benchmark scripts: the machine header, result files, argument defaults."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parser(description: str) -> argparse.ArgumentParser:
    """The options every script shares: --full (the paper's size, for a GPU), --device, --threads, --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--full", action="store_true", help="the paper's full size (meant for a GPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable CPU times)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: the script's)")
    p.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG results (default benchmarks/results)")
    return p


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Set threads, check the device; the machine header for the results."""
    import torch

    from sbpatch.bench import report

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here (valid choices on this machine: cpu)")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    return report.machine(args.device, torch.get_num_threads())


def write(args: argparse.Namespace, name: str, data: dict[str, Any]) -> str:
    from sbpatch.bench import report

    path = os.path.join(args.out, f"{name}.json")
    report.write_json(path, data)
    print(f"wrote {path}")
    return path


def bench(argv: list[str]) -> dict[str, Any]:
    """Run ``sbpatch bench`` with ``argv`` (plus a temporary --json) in this process; its JSON result."""
    import json
    import tempfile

    from sbpatch.bench import cli

    p = argparse.ArgumentParser(prog="sbpatch bench")
    cli.add_arguments(p)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        code = cli.run(p.parse_args([*argv, "--json", path]))
        if code != 0:
            sys.exit(f"sbpatch bench {' '.join(argv)} failed with exit code {code}")
        with open(path) as f:
            return json.load(f)


def plot_ratios(path: str, groups: list[tuple[str, dict[str, Any]]], title: str, metric: str) -> None:
    """A grouped bar chart of the speed-ups over as shipped, one group per (label, row) pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sbpatch.bench.runner import COLUMNS, LABELS

    groups = [(label, row) for label, row in groups if "ratio" in row]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.2))
    width = 0.2
    colors = {"shipped": "#9e9e9e", "oneliner": "#64b5f6", "sbpatch": "#e65100", "limit": "#2e7d32"}
    for i, col in enumerate(COLUMNS):
        xs = [j + (i - 1.5) * width for j in range(len(groups))]
        ax.bar(xs, [row["ratio"][col] for _, row in groups], width, label=LABELS[col], color=colors[col])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([label for label, _ in groups], fontsize=7)
    ax.set_ylabel(f"speed-up over as shipped ({metric} time)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path}")


def summary(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The few numbers worth keeping per row (the JSON stays small)."""
    out = []
    for r in rows:
        item = {k: r.get(k) for k in ("library", "attack", "case", "note")}
        if "columns" in r:
            cols = r["columns"]
            item["median_s"] = {k: {"wall": c["wall_median_s"], "cpu": c["cpu_median_s"]} for k, c in cols.items()}
            item["memory_bytes"] = {k: c["memory_bytes"] for k, c in cols.items()}
            item["ratio"] = r[f"ratio_{metric}"]
            item["sbpatch_over_oneliner"] = r["sbpatch_over_oneliner"]
            item.update({k: r.get(k) for k in ("identical", "engaged", "leaves_grad", "checks")})
        out.append(item)
    return out
