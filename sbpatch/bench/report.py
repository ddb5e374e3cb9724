"""The benchmark's outputs: machine header, rich table, JSON, markdown and a bar chart of the ratios."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

import torch

import sbpatch
from sbpatch import registry
from sbpatch.bench.runner import COLUMNS, LABELS, THRESHOLD, RowResult


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str, threads: int) -> dict[str, Any]:
    """The header every result carries: versions, device, threads, CPU."""
    versions = {}
    for name in registry.INTEGRATIONS:
        integ = registry._state(name).integration
        versions[name] = registry.installed_version(integ)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sbpatch": sbpatch.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "libraries": versions,
    }


def row_dict(r: RowResult, metric: str) -> dict[str, Any]:
    """One row as plain data (seconds, bytes, speed-ups over as shipped)."""
    out: dict[str, Any] = {"library": r.library, "attack": r.attack, "case": r.case, "note": r.note}
    if not r.measured:
        return out
    out["columns"] = {
        k: {
            "wall_median_s": c.wall_median,
            "cpu_median_s": c.cpu_median,
            "wall_s": c.wall,
            "cpu_s": c.cpu,
            "memory_bytes": c.memory,
        }
        for k, c in r.columns.items()
    }
    out["ratio_wall"] = {k: r.ratio(k, "wall") for k in COLUMNS}
    out["ratio_cpu"] = {k: r.ratio(k, "cpu") for k in COLUMNS}
    out["sbpatch_over_oneliner"] = r.ratio("sbpatch", metric) / r.ratio("oneliner", metric)
    out.update(identical=r.identical, deterministic=r.deterministic, leaves_grad=r.leaves_grad, engaged=r.engaged,
               checks=r.checks(metric))
    return out


def misses(rows: Sequence[RowResult], metric: str) -> list[str]:
    """One line per missed target, with the measured figures (the report never hides a miss)."""
    return [line for line, _ in _checked(rows, metric)]


def failures(rows: Sequence[RowResult], metric: str) -> list[str]:
    """The misses that fail the run (``sbpatch bench`` exits 1): an output that differs from as shipped, a column
    other than as shipped that raised, and a speed target missed beyond this run's own noise."""
    return [line for line, failing in _checked(rows, metric) if failing]


def _checked(rows: Sequence[RowResult], metric: str) -> list[tuple[str, bool]]:
    lines: list[tuple[str, bool]] = []
    for r in rows:
        name = f"{r.library} {r.attack}"
        if not r.measured:
            lines.append((f"{name}: not measured ({r.note})", "column failed" in r.note))
            continue
        checks = r.checks(metric)
        s, o = r.ratio("sbpatch", metric), r.ratio("oneliner", metric)
        if checks.get("sbpatch_vs_shipped") is False:
            text, beyond = _noise(r, metric, "shipped", s)
            lines.append((f"{name}: sbpatch {s:.2f}x as shipped (< {THRESHOLD}){text}", beyond))
        if checks.get("sbpatch_vs_oneliner") is False:
            text, beyond = _noise(r, metric, "oneliner", s / o)
            lines.append((f"{name}: sbpatch {s:.2f}x vs one-liner {o:.2f}x (< {THRESHOLD} of it){text}", beyond))
        if checks.get("identical") is False:
            lines.append((f"{name}: sbpatch output differs from as shipped", True))
        if checks.get("memory_lower") is False:
            m = {k: r.columns[k].memory for k in ("shipped", "sbpatch")}
            lines.append(
                (f"{name}: peak memory not lower ({fmt_bytes(m['sbpatch'])} vs {fmt_bytes(m['shipped'])})", True)
            )
    return lines


def spread(r: RowResult, column: str, metric: str) -> float:
    """Half the relative range of a column's timed runs: the run's own noise (0 with one run)."""
    values = getattr(r.columns[column], metric)
    median = r.columns[column].median(metric)
    return (max(values) - min(values)) / (2 * median) if len(values) > 1 and median > 0 else 0.0


def _noise(r: RowResult, metric: str, other: str, ratio: float) -> tuple[str, bool]:
    """The noise note of a missed ratio, and whether the miss is beyond this run's noise. With a single timed round
    there is no spread to judge by: a miss then counts only when it exceeds 10%."""
    noise = spread(r, "sbpatch", metric) + spread(r, other, metric)
    if len(getattr(r.columns["sbpatch"], metric)) < 2:
        noise = max(noise, 0.10)
    if ratio >= THRESHOLD - noise:
        return f"; within this run's noise (spread +-{noise:.0%})", False
    return f"; beyond this run's noise (spread +-{noise:.0%})", True


def to_json(meta: dict[str, Any], rows: Sequence[RowResult], metric: str) -> dict[str, Any]:
    return {"meta": meta, "rows": [row_dict(r, metric) for r in rows], "misses": misses(rows, metric)}


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=_jsonable)
        f.write("\n")


def _jsonable(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    return f"{s * 1e3:.0f} ms" if s >= 0.01 else f"{s * 1e3:.2f} ms"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def header_lines(meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
    cfg = ", ".join(f"{k}={v}" for k, v in config.items())
    return [
        f"sbpatch {meta['sbpatch']}, torch {meta['torch']}, device {meta['device']} ({meta['device_name']}), "
        f"{meta['threads']} thread(s) of {meta['cpu_count']} CPUs, Python {meta['python']}",
        f"config: {cfg}",
        "times: medians of wall (perf_counter) and CPU (process_time) per attack call, columns interleaved; "
        "ratio = as shipped / column (> 1 is faster)",
    ]


def fmt_ratio(r: RowResult, col: str, metric: str) -> str:
    """``2.41x``; the limit of a non-PGD row is marked as the PGD reference it is, not that attack's limit."""
    text = f"{r.ratio(col, metric):.2f}x"
    return f"({text} PGD ref.)" if col == "limit" and not is_pgd(r) else text


def cell(r: RowResult, col: str, memory: bool) -> str:
    c = r.columns[col]
    text = f"{fmt_time(c.wall_median)} {fmt_ratio(r, col, 'wall')}"
    text += f"\ncpu {fmt_time(c.cpu_median)} {fmt_ratio(r, col, 'cpu')}"
    if memory:
        text += f"\nmem {fmt_bytes(c.memory)}"
    return text


def memory_note(device: str) -> str:
    if device.startswith("cuda"):
        return "memory: CUDA allocator peak above the start of the call"
    return "memory (CPU): peak bytes saved for backward (saved_tensors_hooks, parameters excluded) + .grad buffers"


def print_table(console: Any, meta: dict[str, Any], config: dict[str, Any], rows: Sequence[RowResult]) -> None:
    """The rich table at the end of a run."""
    from rich.table import Table

    memory = bool(config.get("memory"))
    metric = config.get("metric", "wall")
    table = Table(title="sbpatch bench", caption="\n".join(header_lines(meta, config)), caption_justify="left")
    table.add_column("library")
    table.add_column("attack")
    for col in COLUMNS:
        table.add_column(LABELS[col], justify="right")
    table.add_column("same output")
    for r in rows:
        if not r.measured:
            table.add_row(r.library, r.attack, *(["-"] * len(COLUMNS)), r.note[:60])
            continue
        ok = r.checks(metric)
        flag = same_output(r)
        if not r.engaged:
            flag += " (not frozen)"
        table.add_row(
            r.library,
            r.attack,
            *(cell(r, c, memory) for c in COLUMNS),
            flag,
            style=None if all(v is not False for v in ok.values()) else "red",
        )
    console.print(table)
    if memory:
        console.print(memory_note(meta["device"]))
    for r in rows:
        if r.measured and r.note:
            console.print(f"note: {r.library} {r.attack}: {r.note}")
    lines = misses(rows, metric)
    console.print(f"targets ({metric} time): " + ("all met" if not lines else f"{len(lines)} missed"))
    for line in lines:
        console.print(f"  miss: {line}")


def same_output(r: RowResult) -> str:
    """The "same output" cell: yes / NO, with the thread count when as shipped was not deterministic at the run's."""
    if r.identical is None:
        return "n/a (not deterministic)"
    flag = "yes" if r.identical else "NO"
    return flag if r.deterministic is not False else f"{flag} (1 thread)"


def to_markdown(meta: dict[str, Any], config: dict[str, Any], rows: Sequence[RowResult]) -> str:
    memory = bool(config.get("memory"))
    metric = config.get("metric", "wall")
    lines = ["# sbpatch bench", ""] + [f"- {h}" for h in header_lines(meta, config)]
    if memory:
        lines.append(f"- {memory_note(meta['device'])}")
    lines.append("")
    head = ["library", "attack"]
    for c in COLUMNS:
        head += [f"{LABELS[c]} wall", f"{LABELS[c]} cpu", f"{LABELS[c]} ratio"]
        if memory:
            head.append(f"{LABELS[c]} memory")
    head += ["same output", "note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.library, r.attack]
        if not r.measured:
            cells += ["-"] * (len(head) - 4) + ["-", r.note]
        else:
            for c in COLUMNS:
                col = r.columns[c]
                cells += [fmt_time(col.wall_median), fmt_time(col.cpu_median), fmt_ratio(r, c, metric)]
                if memory:
                    cells.append(fmt_bytes(col.memory))
            cells += [same_output(r), r.note]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Ratios: as shipped / column, {metric} time (> 1 is faster). The limit is a hand-written PGD: on "
                 "other attacks' rows it is only a PGD reference (marked).")
    miss = misses(rows, metric)
    lines.append("")
    lines.append("Targets: all met." if not miss else "Targets missed:")
    lines += [f"- {m}" for m in miss]
    return "\n".join(lines) + "\n"


def is_pgd(r: RowResult) -> bool:
    """Whether the row's attack is a PGD, so that the hand-written PGD "limit" is that row's own lower bound.

    On any other row (CW, DeepFool, ...) the limit column is only a PGD reference of the same step count.
    """
    from sbpatch.bench.workloads import PGD_NAMES

    return r.attack == "PGD" or r.case in PGD_NAMES.get(r.library, ())


def round_ratios(r: RowResult, column: str, metric: str) -> list[float]:
    """Speed-up of ``column`` over as shipped in each timed round (the rounds are interleaved: paired by round)."""
    shipped = getattr(r.columns["shipped"], metric)
    other = getattr(r.columns[column], metric)
    return [a / b for a, b in zip(shipped, other) if b > 0]


PLOT_COLUMNS: tuple[str, ...] = ("oneliner", "sbpatch", "limit")
PLOT_COLORS: dict[str, str] = {"oneliner": "#64b5f6", "sbpatch": "#e65100", "limit": "#2e7d32"}


def plot(path: str, meta: dict[str, Any], config: dict[str, Any], rows: Sequence[RowResult], title: str = "") -> None:
    """Write :func:`figure` to ``path`` (.png, .svg or .pdf)."""
    import matplotlib.pyplot as plt

    fig = figure(meta, config, rows, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(meta: dict[str, Any], config: dict[str, Any], rows: Sequence[RowResult], title: str = "") -> Any:
    """A grouped bar chart of the speed-ups over as shipped, on a log scale (one group per row): a matplotlib Figure.

    Bars: the ratio of medians; error bars: the lowest and highest per-round ratio (interleaved rounds, paired);
    as shipped is the line at 1. A non-PGD row has no limit bar: the hand-written limit is a PGD, a reference only.
    The log scale keeps 0.9x, 1.1x and an outlier at 10x all readable on one chart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    metric = config.get("metric", "wall")
    measured = [r for r in rows if r.measured]
    names = [f"{r.library}\n{r.attack}" for r in measured]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.0 * len(measured) + 2.5), 4.6))
    width = 0.26
    values: list[float] = [1.0]
    for i, col in enumerate(PLOT_COLUMNS):
        xs, heights, low, high = [], [], [], []
        for j, r in enumerate(measured):
            if col == "limit" and not is_pgd(r):
                ax.text(j + (i - 1) * width, 1.02, "limit n/a (PGD only)", rotation=90, ha="center", va="bottom",
                        fontsize=7, color="#2e7d32", style="italic")
                continue
            ratio = r.ratio(col, metric)
            per_round = round_ratios(r, col, metric) or [ratio]
            xs.append(j + (i - 1) * width)
            heights.append(ratio)
            low.append(max(0.0, ratio - min(per_round)))
            high.append(max(0.0, max(per_round) - ratio))
            values += [min(per_round), max(per_round), ratio]
        # log scale: a bar is drawn from 1 (as shipped) up or down to its ratio
        ax.bar(xs, [h - 1 for h in heights], width, bottom=1.0, label=LABELS[col], color=PLOT_COLORS[col],
               yerr=[low, high], error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"})
        if col == "sbpatch":
            for x, h, lo_, hi_ in zip(xs, heights, low, high):
                up = h >= 1
                ax.text(x, (h + hi_) * 1.01 if up else (h - lo_) / 1.01, f"{h:.2f}x", ha="center",
                        va="bottom" if up else "top", fontsize=7, color="#8a3000", fontweight="bold")
    ax.axhline(1.0, color="black", linewidth=1.0, label="as shipped (= 1)")
    ax.set_yscale("log")
    lo, hi = min(values), max(values)
    ax.set_ylim(min(0.8, lo / 1.2), max(1.25, hi * 1.35))
    ticks = [t for t in (0.25, 0.33, 0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
             if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels([f"{t:g}x" for t in ticks])
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_xticks(range(len(measured)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_xlim(-0.6, len(measured) - 0.4)
    rounds = max((len(getattr(r.columns["shipped"], metric)) for r in measured), default=0)
    ax.set_ylabel(f"speed-up over as shipped ({metric} time, log scale)")
    sub = f"{config.get('model')} B={config.get('batch_size')} {config.get('image_size')}px"
    sub += f", {config.get('steps')} steps"
    machine_line = f"torch {meta['torch']}, {meta['device']}, {meta['threads']} thread(s)"
    ax.set_title(title or f"sbpatch bench: {sub}\n{machine_line}", fontsize=9)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    fig.text(0.01, 0.01, f"bar: ratio of medians; whiskers: lowest-highest of the {rounds} interleaved rounds' ratios; "
             "> 1 is faster; the limit (hand-written PGD) is drawn on PGD rows only", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def rows_from_json(data: dict[str, Any]) -> list[RowResult]:
    """The rows of a ``sbpatch bench --json`` file, to redraw its plot without running anything."""
    from sbpatch.bench.runner import Column

    out = []
    for d in data["rows"]:
        r = RowResult(d["library"], d["attack"], d.get("case"), d.get("note", ""))
        for name, c in (d.get("columns") or {}).items():
            r.columns[name] = Column(list(c.get("wall_s") or []), list(c.get("cpu_s") or []), c.get("memory_bytes"))
        r.identical, r.leaves_grad, r.engaged = d.get("identical"), d.get("leaves_grad"), d.get("engaged")
        r.deterministic = d.get("deterministic")
        out.append(r)
    return out


def replot(json_path: str, png_path: str) -> None:
    """Redraw the chart of a ``sbpatch bench --json`` result."""
    with open(json_path) as f:
        data = json.load(f)
    plot(png_path, data["meta"], data["config"], rows_from_json(data))
