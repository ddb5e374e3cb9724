"""``sbpatch bench``: time library attacks as shipped, with the manual one-liner freeze, with sbpatch, and the limit.

The lead's ``sbpatch/cli.py`` calls :func:`add_arguments` on the ``bench`` sub-parser and :func:`run` with the parsed
namespace. This module imports neither torch nor any attack library until :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from sbpatch.bench.text import TEXT_MODELS
from sbpatch.bench.workloads import LIBRARIES, MODELS

DEVICES = ("cpu", "cuda")
METRICS = ("auto", "wall", "cpu")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
DEFAULTS: dict[str, Any] = {
    "model": "resnet18",
    "batch_size": 8,
    "image_size": 32,
    "steps": 10,
    "repeats": 5,
    "warmup": 1,
    "device": "cpu",
    "metric": "auto",
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (valid: an integer >= 1)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid (valid: an integer >= 1)")
    return value


def choice_list(valid: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type: comma-separated names, each one of ``valid``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"invalid choice {', '.join(map(repr, bad)) or repr(text)} (choose from {', '.join(valid)})"
            )
        return names

    parse.__name__ = "names"
    return parse


def name_list(text: str) -> list[str]:
    """argparse type: comma-separated names (attack names are checked once the libraries' cases are known)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more attack names")
    return names


def plot_path(text: str) -> str:
    if not text.lower().endswith(PLOT_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{text!r}: the plot file must end in one of {', '.join(PLOT_SUFFIXES)}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` options."""
    d = DEFAULTS
    parser.description = (
        "Time attacks in the installed libraries: as shipped / manual one-liner freeze / sbpatch / limit "
        "(a hand-written PGD with frozen parameters and torch.autograd.grad), interleaved, medians of wall and CPU "
        f"time. Default: random-init ResNet18, PGD-{d['steps']} in every library plus torchattacks CW and DeepFool."
    )
    lib = ", ".join(LIBRARIES)
    parser.add_argument("--libraries", type=choice_list(LIBRARIES), action="extend", metavar="LIB[,LIB]",
                        help=f"libraries to run (default: every installed one; choose from {lib})")
    parser.add_argument("--attacks", type=name_list, action="extend", metavar="NAME[,NAME]",
                        help="attacks: PGD (mapped per library) or a library's attack name, e.g. CW, DeepFool, "
                        "AutoAttack (default: PGD everywhere plus torchattacks CW and DeepFool)")
    parser.add_argument("--model", choices=MODELS + TEXT_MODELS, default=d["model"],
                        help=f"victim model (default {d['model']}); bert, lstm: a text classifier trained offline, "
                        "for the text libraries (openattack, textattack)")
    parser.add_argument("--batch-size", type=positive_int, default=d["batch_size"],
                        help="images per attack call; default %(default)s")
    parser.add_argument("--image-size", type=positive_int, default=d["image_size"], help="pixels; default %(default)s")
    parser.add_argument("--steps", type=positive_int, default=d["steps"], help="attack iterations; default %(default)s")
    parser.add_argument("--repeats", type=positive_int, default=d["repeats"], help="timed rounds; default %(default)s")
    parser.add_argument("--warmup", type=int, choices=range(0, 10), default=d["warmup"], metavar="N",
                        help="untimed rounds first (0-9); default %(default)s")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--device", choices=DEVICES, default=d["device"], help="default %(default)s")
    parser.add_argument("--metric", choices=METRICS, default=d["metric"],
                        help="time the ratios and targets use; auto: CPU time on cpu (robust on a shared machine), "
                        "wall time on cuda (default %(default)s)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak memory per column (CUDA: allocator peak; CPU: bytes saved for "
                        "backward + .grad buffers)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON (default: none)")
    parser.add_argument("--markdown", metavar="FILE", help="write the results as a markdown table (default: none)")
    parser.add_argument("--plot", metavar="FILE.png", type=plot_path,
                        help="write a chart of the speed-ups (default: none)")
    parser.add_argument("--exit-zero", action="store_true",
                        help="exit 0 even when a check fails (by default: exit 1 when an output differs from as "
                        "shipped, a column raises, or a speed target is missed beyond the run's own noise)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress (a bar on a terminal, else a line per row on stderr)")


def _error(message: str) -> int:
    print(f"sbpatch bench: error: {message}", file=sys.stderr)
    return 2


def config_of(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    return {
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": threads,
        "device": args.device,
        "metric": args.metric,
        "memory": bool(args.memory),
    }


def unwritable(paths: dict[str, str | None]) -> str | None:
    """Why one of the output files cannot be written (checked before running anything), or None."""
    import os

    for option, path in paths.items():
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            return f"{option} {path}: the folder {folder} does not exist"
        if os.path.isdir(path):
            return f"{option} {path}: is a folder, give a file name"
        if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            return f"{option} {path}: not writable"
    return None


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; 0 when every check passes (or ``--exit-zero``), 1 when one fails
    (an output differs, a column raises, a speed target missed beyond noise), 2 on a bad option value."""
    for name, default in {**DEFAULTS, "libraries": None, "attacks": None, "threads": None, "memory": False,
                          "json": None, "markdown": None, "plot": None, "quiet": False, "exit_zero": False}.items():
        if not hasattr(args, name):  # a namespace built by hand may omit options
            setattr(args, name, default)
    problem = unwritable({"--json": args.json, "--markdown": args.markdown, "--plot": args.plot})
    if problem:
        return _error(problem)
    if args.model == "vit_b_16" and args.image_size % 16:
        return _error(f"--image-size {args.image_size}: vit_b_16 needs a multiple of 16 (e.g. 32, 64, 224)")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: CUDA is not available here (valid choices on this machine: cpu)")
    if args.device == "cuda":  # deterministic cuBLAS for the identity round (read when cuBLAS starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.metric == "auto":
        args.metric = "cpu" if args.device == "cpu" else "wall"

    import sbpatch
    from sbpatch.bench import models, report, runner, text, workloads

    only_text = bool(args.libraries) and all(workloads.modality(lib) == "text" for lib in args.libraries)
    if args.model in TEXT_MODELS or only_text:
        return text.bench(args)  # text libraries: a text victim, no hand-written limit
    libraries = list(dict.fromkeys(args.libraries or workloads.image_libraries()))
    text_libraries = [lib for lib in libraries if workloads.modality(lib) == "text"]
    if text_libraries:
        print(f"sbpatch bench: {', '.join(text_libraries)}: text libraries run with --model bert or lstm; skipped",
              file=sys.stderr)
        libraries = [lib for lib in libraries if lib not in text_libraries]
    cases: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    for lib in libraries:
        try:
            sbpatch.enable(lib)  # shims first: some libraries import only with them
        except sbpatch.SbpatchError as exc:
            notes[lib] = str(exc)
            if args.libraries:
                continue
        cases[lib], notes_lib = workloads.library_cases(lib)
        if notes_lib:
            notes[lib] = notes_lib
    if args.attacks:
        valid = workloads.attack_choices(cases)
        bad = [a for a in args.attacks if a not in valid]
        if bad:
            return _error(f"argument --attacks: invalid choice {', '.join(map(repr, bad))} "
                          f"(choose from {', '.join(valid)})")
    if not args.libraries:  # by default, only the libraries that are installed and import
        libraries = [lib for lib in libraries if cases.get(lib) or "cases()" in notes.get(lib, "")]
    rows = workloads.resolve_rows(libraries, list(dict.fromkeys(args.attacks)) if args.attacks else None, cases)
    for row in rows:
        if row.case is None and row.library in notes:
            row.note = notes[row.library]

    model = models.build_model(args.model, args.image_size).to(args.device)
    x, y = models.make_data(args.batch_size, args.image_size, args.device)
    limit = models.limit_attack(model, x, y, args.steps)
    settings = runner.Settings(args.steps, args.repeats, args.warmup, bool(args.memory), args.device, args.metric)
    config = config_of(args, threads)
    meta = report.machine(args.device, threads)

    from rich.console import Console

    console = Console(stderr=True)
    results = []
    todo = [r for r in rows if r.case is not None]
    with _Progress(console, args.quiet, len(todo) * runner.calls_per_row(settings)) as progress:
        for row in rows:
            if row.case is None:
                results.append(runner.RowResult(row.library, row.attack, None, row.note))
                continue
            progress.start(f"{row.library} {row.attack}")
            result = runner.run_row(row, model, x, y, cases[row.library][row.case], limit, settings, progress.tick)
            results.append(result)
            progress.done(result, len(todo), args.metric)
    out = Console() if sys.stdout.isatty() else Console(width=160)
    report.print_table(out, meta, config, results)
    data = report.to_json(meta, results, args.metric)
    data["config"] = config
    if args.json:
        report.write_json(args.json, data)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.to_markdown(meta, config, results))
    if args.plot:
        report.plot(args.plot, meta, config, results)
    return verdict(report.failures(results, args.metric), args.exit_zero)


def verdict(failed: list[str], exit_zero: bool) -> int:
    """The exit status: 1 when a check failed (each named on stderr), unless ``--exit-zero``."""
    if not failed:
        return 0
    print(f"sbpatch bench: {len(failed)} check(s) failed" + (" (--exit-zero: exit status 0)" if exit_zero else ""),
          file=sys.stderr)
    for line in failed:
        print(f"  {line}", file=sys.stderr)
    return 0 if exit_zero else 1


class _Progress:
    """A rich progress bar on a terminal; otherwise (CI logs, a pipe) one line per row on stderr as it finishes."""

    def __init__(self, console: Any, quiet: bool, total_calls: int) -> None:
        self.console, self.quiet, self.total_calls = console, quiet, total_calls
        self.bar: Any = None
        self.rows_done = 0
        self.started = time.perf_counter()

    def __enter__(self) -> _Progress:
        if not self.quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=self.console, transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("bench", total=self.total_calls)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=label)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def done(self, result: Any, rows: int, metric: str) -> None:
        self.rows_done += 1
        if self.quiet or self.bar is not None:
            return
        if result.measured:
            s, o = result.ratio("sbpatch", metric), result.ratio("oneliner", metric)
            same = "identical" if result.identical else "DIFFERENT"
            what = f"sbpatch {s:.2f}x, one-liner {o:.2f}x as shipped ({metric} time), output {same}"
        else:
            what = f"not measured: {result.note}"
        elapsed = time.perf_counter() - self.started
        print(f"[{self.rows_done}/{rows} {elapsed:.0f} s] {result.library} {result.attack}: {what}",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m sbpatch.bench``), the same options as ``sbpatch bench``."""
    from sbpatch.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="sbpatch bench", formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
