"""The model zoo: per model, identity and speed of the one-liner and of sbpatch over the library as shipped.

Every model of ``sbpatch/bench/zoo.py`` (33 tiny architectures: torchvision families, timm, torch.nn sequence models,
HF BERT) at the zoo's image sizes, with a batch per model sized for calls of about 0.1 s, and three attacks:
torchattacks PGD (``autograd.grad``), foolbox L2 PGD (``backward()``) and torchattacks SPSA (query-only). Each row
runs ``sbpatch bench``'s four columns interleaved (warm-up, then rounds in rotated order, medians of CPU and wall
time): as shipped, the one-liner, sbpatch, and the limit (a hand-written PGD with ``sbpatch.frozen`` and
``autograd.grad``). Identity: sbpatch's and the one-liner's outputs against as shipped with the same seeds, bitwise,
at the timed batch and at the zoo tests' batch of 2. Targets: sbpatch >= as shipped and >= the one-liner, each within
the row's measured spread (half the relative range of the two columns' rounds, added).

Run: ``python benchmarks/zoo.py [--models a,b] [--attacks "torchattacks PGD,..."] [--steps N] [--batch-size N]``;
writes ``results/zoo.json`` and ``results/zoo.md`` (``--from-json results/zoo.json`` rewrites the table only).
"""

from __future__ import annotations

import os
import time
from typing import Any

import _common

DEFAULT_ATTACKS = ("torchattacks PGD", "foolbox L2PGD", "torchattacks SPSA")


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def measure(name: str, attack: str, batch: int, args: Any, settings: Any) -> dict[str, Any]:
    """One row: ``sbpatch bench``'s interleaved columns on a zoo model, plus the one-liner's identity."""
    from sbpatch.bench import report, zoo
    from sbpatch.bench.models import limit_attack
    from sbpatch.bench.runner import column_calls, run_row
    from sbpatch.bench.workloads import Row

    spec = zoo.ATTACKS[attack]
    model = zoo.build(name).to(args.device)
    x, y = (t.to(args.device) for t in zoo.inputs(name, batch))

    def builder(m: Any, xs: Any, ys: Any, steps: int) -> Any:
        return spec.build(m, xs, ys, False, steps)

    limit = limit_attack(model, x, y, args.steps)
    kept_before = set(_kept_live())
    result = run_row(Row(spec.library, attack, attack), model, x, y, builder, limit, settings)
    row = report.row_dict(result, settings.metric)
    if result.measured:
        # identity at the timed batch (run_row checked sbpatch; the one-liner here) and at the zoo tests' batch of 2,
        # where the kernel traps show (a fold difference is shape-dependent)
        calls = column_calls(model, builder(model, x, y, args.steps), limit)
        same = {"sbpatch": bool(result.identical), "oneliner": _same(model, calls, "oneliner")}
        x2, y2 = (t.to(args.device) for t in zoo.inputs(name, 2))
        calls2 = column_calls(model, builder(model, x2, y2, args.steps), limit)
        for column in ("sbpatch", "oneliner"):
            same[column] = same[column] and _same(model, calls2, column)
        row["identical"], row["oneliner_identical"] = same["sbpatch"], same["oneliner"]
        spreads = {c: report.spread(result, c, settings.metric) for c in ("shipped", "oneliner", "sbpatch")}
        sb, one = result.ratio("sbpatch", settings.metric), result.ratio("oneliner", settings.metric)
        row["spread"] = spreads
        row["targets"] = {
            "sbpatch_vs_shipped": sb >= 1 - (spreads["sbpatch"] + spreads["shipped"]),
            "sbpatch_vs_oneliner": sb / one >= 1 - (spreads["sbpatch"] + spreads["oneliner"]),
        }
    entry = zoo.ZOO[name]
    row.update(model=name, family=entry.family, trap=entry.trap, gradient=spec.gradient, batch=batch,
               parameters=sum(p.numel() for p in model.parameters()), image=list(entry.shape),
               kept_live=sorted(set(_kept_live()) - kept_before))
    return row


def pick_batch(model: Any, name: str, steps: int, target_s: float, device: str) -> int:
    """The power of two in [4, 256] that makes ``steps`` forward+backward passes take about ``target_s``: tiny models
    get large batches, so that every call lasts long enough to time on a shared machine. The cost per example is
    the slope between batches of 8 and 32 (a tiny model's fixed per-pass cost would otherwise dominate)."""
    import math
    import statistics

    from sbpatch.bench import zoo

    def seconds(batch: int) -> float:
        x = zoo.inputs(name, batch)[0].to(device)
        times = []
        for _ in range(4):
            xg = x.clone().requires_grad_(True)
            t0 = time.process_time()
            model(xg).sum().backward()
            times.append(time.process_time() - t0)
        model.zero_grad(set_to_none=True)
        return statistics.median(times[1:])

    small, large = seconds(8), seconds(32)
    per_example = max((large - small) / 24, large / 64, 1e-7)
    wanted = target_s / (steps * per_example)
    return int(min(256, max(4, 2 ** round(math.log2(wanted)))))


def _same(model: Any, calls: dict[str, Any], column: str) -> bool:
    """``column``'s output bitwise equal to as shipped's, both from the same seeds and with no ``.grad``."""
    from sbpatch.verify import identical, seed_all

    outs = []
    for name in ("shipped", column):
        for p in model.parameters():
            p.grad = None
        seed_all()
        outs.append(calls[name]())
    for p in model.parameters():
        p.grad = None
    return identical(*outs)


def _kept_live() -> dict[str, str]:
    from sbpatch import freeze

    kept = getattr(freeze, "kept_live", None)  # the run-time rules' log of parameters kept live (newer cores)
    return kept() if kept else {}


def paired(r: dict[str, Any], metric: str, other: str) -> tuple[float, float, float]:
    """Per round, ``other``'s time over sbpatch's (the two ran next to each other): first quartile, median, third."""
    import statistics

    ratios = [a / b for a, b in zip(r["columns"][other][f"{metric}_s"], r["columns"]["sbpatch"][f"{metric}_s"])]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return q1, q2, q3


def _pgd(r: dict[str, Any]) -> bool:
    """Whether the row's attack is a PGD: the hand-written PGD limit is its lower bound; on any other attack (SPSA)
    it would time a different attack, so that cell stays empty."""
    return "PGD" in r["attack"]


def _yes(value: Any) -> str:
    return {True: "yes", False: "**NO**", None: "-"}[value]


def markdown(data: dict[str, Any]) -> str:
    """The zoo table: per model and attack, identity and CPU/wall speed-ups with the spread, and the misses."""
    meta, cfg = data["meta"], data["config"]
    lines = [
        "# Model zoo: identity and speed, as shipped vs the one-liner vs sbpatch",
        "",
        f"`python benchmarks/zoo.py`: {len(cfg['models'])} models x {len(cfg['attacks'])} attacks, "
        + (f"batch {cfg['batch_size']}" if cfg["batch_size"] else
           f"batch per model (B: the power of two in [4, 256] giving calls of about {cfg['target_s']} s)")
        + f", {cfg['steps']} steps, {cfg['repeats']} interleaved rounds after a warm-up; torch "
        f"{meta['torch']}, {meta['device']} ({meta['device_name']}), {meta['threads']} thread(s), "
        f"{data['elapsed_s']:.0f} s in all; sbpatch {meta.get('sbpatch_source', '?')}. Ratios are as shipped / "
        f"column ({cfg['metric']} time; wall in brackets); > 1 is faster. *identical*: bitwise equal to as shipped "
        "with the same seeds, at the timed batch and at batch 2. *per round*: sbpatch's speed over the one-liner's "
        "in each round (paired: both in the same round), median [quartiles]. *spread*: half the relative range of "
        "the rounds of as shipped, one-liner and sbpatch (the largest). *met*: sbpatch >= as shipped and >= the "
        "one-liner, each within the sum of the two columns' spreads. *limit*: the hand-written PGD, given on PGD rows "
        "only (on another attack it would time a different attack).",
        "",
        "| model | B | attack | identical: sbpatch / one-liner | one-liner | sbpatch | limit | sbpatch / one-liner "
        "per round | spread | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    metric = cfg["metric"]
    other = "wall" if metric == "cpu" else "cpu"
    for r in data["rows"]:
        label = f"{r['model']}" + (" (trap)" if r["trap"] else "")
        attack = f"{r['attack']} ({r['gradient']})"
        if "columns" not in r:
            lines.append(f"| {label} | {r['batch']} | {attack} | {r['note'][:80]} | | | | | | |")
            continue
        rm, ro = r[f"ratio_{metric}"], r[f"ratio_{other}"]

        def cell(col: str, rm: dict = rm, ro: dict = ro) -> str:
            return f"{rm[col]:.2f} ({ro[col]:.2f})"

        spread = max(r["spread"].values())
        met = all(r["targets"].values())
        q1, q2, q3 = paired(r, metric, "oneliner")
        limit = cell("limit") if _pgd(r) else ""
        lines.append(
            f"| {label} | {r['batch']} | {attack} | {_yes(r['identical'])} / {_yes(r['oneliner_identical'])} | "
            f"{cell('oneliner')} | {cell('sbpatch')} | {limit} | {q2:.2f} [{q1:.2f}-{q3:.2f}] | "
            f"+-{spread:.0%} | {_yes(met)} |"
        )
    lines += ["", "## Summary", ""] + [f"- {s}" for s in data["summary"]]
    traps = {r["model"]: r["trap"] for r in data["rows"] if r["trap"]}
    if traps:
        lines += ["", "Models marked (trap): a kernel choice depends on `requires_grad` there:", ""]
        lines += [f"- {m}: {t}" for m, t in traps.items()]
    kept = {r["model"]: r["kept_live"] for r in data["rows"] if r.get("kept_live")}
    if kept:
        lines += ["", "Parameters sbpatch kept live (run-time rules), first seen on:", ""]
        lines += [f"- {m}: {', '.join(f'`{k}`' for k in ks)}" for m, ks in kept.items()]
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict[str, Any]], metric: str) -> list[str]:
    """The summary lines: identity, the two targets (misses listed), and the paired per-round ratios overall."""
    import statistics

    measured = [r for r in rows if "columns" in r]
    out = [f"{len(measured)} of {len(rows)} rows measured"]
    for r in rows:
        if "columns" not in r:
            out.append(f"{r['model']} {r['attack']}: not measured ({r['note']})")
    differ = [f"{r['model']} {r['attack']}" for r in measured if r["identical"] is False]
    out.append("sbpatch identical to as shipped on every row" if not differ
               else f"sbpatch DIFFERENT from as shipped: {', '.join(differ)}")
    one = [f"{r['model']} {r['attack']}" for r in measured if r["oneliner_identical"] is False]
    out.append(f"one-liner different from as shipped on {len(one)} rows: {', '.join(one) or '-'}")
    for key, what in (("sbpatch_vs_shipped", "as shipped"), ("sbpatch_vs_oneliner", "the one-liner")):
        missed = [r for r in measured if not r["targets"][key]]
        ratio = (lambda r: r[f"ratio_{metric}"]["sbpatch"]) if key == "sbpatch_vs_shipped" else (
            lambda r: r["sbpatch_over_oneliner"])
        if not missed:
            out.append(f"sbpatch >= {what} within the spread: met on every row")
        for r in missed:
            spread = r["spread"]["sbpatch"] + r["spread"]["shipped" if key == "sbpatch_vs_shipped" else "oneliner"]
            out.append(f"sbpatch >= {what} MISSED on {r['model']} {r['attack']}: {ratio(r):.2f} "
                       f"(spread +-{spread:.0%})")
    for other, what in (("shipped", "as shipped"), ("oneliner", "the one-liner")):
        per_row = [paired(r, metric, other) for r in measured]
        if not per_row:
            continue
        below = [f"{r['model']} {r['attack']}" for r, q in zip(measured, per_row) if q[2] < 1]
        middle = statistics.median(q[1] for q in per_row)
        out.append(f"sbpatch's speed over {what}, per round: median over rows {middle:.3f}; "
                   f"rows whose upper quartile is below 1: {len(below)} ({', '.join(below) or '-'})")
    return out


def rewrite(path: str) -> int:
    """Recompute the summary of a zoo.json and write it back with zoo.md beside it (no measuring)."""
    import json

    with open(path) as f:
        data = json.load(f)
    data["summary"] = summarise(data["rows"], data["config"]["metric"])
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    with open(os.path.join(os.path.dirname(path), "zoo.md"), "w") as f:
        f.write(markdown(data))
    print("\n".join(data["summary"]))
    return 0


def source(path: str) -> str:
    """Where the measured sbpatch comes from: its git commit (``+changes`` if its files differ), or its path."""
    import subprocess

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", "-C", path, *cmd], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return path
    return commit + ("+changes" if git("status", "--porcelain", "--", ".") else "")


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--models", help="comma list of zoo names (default: all)")
    p.add_argument("--attacks", help=f"comma list of zoo attacks (default: {', '.join(DEFAULT_ATTACKS)})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="one batch size for every model (default: per model, see --target-s)")
    p.add_argument("--target-s", type=float, default=0.1,
                   help="default batch: the power of two in [4, 256] giving calls of about this many CPU seconds")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="also the peak memory per column")
    p.add_argument("--from-json", metavar="FILE", help="only rewrite the summary and zoo.md from a zoo.json")
    args = p.parse_args()
    if args.from_json:
        return rewrite(args.from_json)
    meta = _common.setup(args)

    import sbpatch

    meta["sbpatch_source"] = source(os.path.dirname(sbpatch.__file__))
    sbpatch.enable()  # advertorch's shims must be in place before it is imported
    from sbpatch.bench import zoo
    from sbpatch.bench.runner import Settings

    models = _split(args.models) or [n for n in zoo.ZOO if zoo.available(n)]
    attacks = _split(args.attacks) or list(DEFAULT_ATTACKS)
    for bad, valid in ((set(models) - set(zoo.ZOO), zoo.ZOO), (set(attacks) - set(zoo.ATTACKS), zoo.ATTACKS)):
        if bad:
            p.error(f"unknown {', '.join(sorted(bad))} (valid: {', '.join(valid)})")
    metric = "wall" if args.device == "cuda" else "cpu"
    settings = Settings(steps=args.steps, repeats=args.repeats or 5, memory=args.memory, device=args.device,
                        metric=metric)
    start = time.perf_counter()
    rows = []
    for name in models:
        batch = args.batch_size or pick_batch(zoo.build(name).to(args.device), name, args.steps, args.target_s,
                                              args.device)
        for attack in attacks:
            t0 = time.perf_counter()
            row = measure(name, attack, batch, args, settings)
            rows.append(row)
            if "columns" in row:
                r = row[f"ratio_{metric}"]
                print(f"{name:20s} B={batch:<3d} {attack:18s} identical {row['identical']!s:5s} one-liner identical "
                      f"{row['oneliner_identical']!s:5s}  one-liner {r['oneliner']:.2f}x  sbpatch {r['sbpatch']:.2f}x  "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
            else:
                print(f"{name:20s} {attack:18s} not measured: {row['note']}", flush=True)
    config = {"models": models, "attacks": attacks, "batch_size": args.batch_size, "target_s": args.target_s,
              "steps": args.steps,
              "repeats": settings.repeats, "metric": metric}
    data = {"meta": meta, "experiment": "zoo", "config": config, "elapsed_s": time.perf_counter() - start,
            "rows": rows, "summary": summarise(rows, metric)}
    for line in data["summary"]:
        print(line)
    _common.write(args, "zoo", data)
    path = os.path.join(args.out, "zoo.md")
    with open(path, "w") as f:
        f.write(markdown(data))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
