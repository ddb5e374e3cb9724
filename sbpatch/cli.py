"""The ``sbpatch`` command: ``status``, ``run``, ``bench``, ``verify``, ``--version``."""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import shutil
import sys
from collections.abc import Sequence

import sbpatch
from sbpatch import config, registry


def library_list(value: str) -> list[str]:
    """argparse type for ``--libraries a,b``: exits 2 naming the valid choices on a bad name."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names or names == ["all"]:
        return []
    try:
        return registry.check_names(names)
    except sbpatch.ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _status(args: argparse.Namespace) -> int:
    """Enable the libraries (all installed by default), import their patch targets, print what was patched."""
    sbpatch.enable(*(args.libraries or []))
    for name, lib in sbpatch.status().items():
        if not lib.enabled:
            continue
        for target in registry.integration(name).targets:
            try:
                importlib.import_module(target.module)
            except Exception as exc:  # the library itself does not import on this stack: show it, carry on
                print(f"{name}: importing {target.module} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(sbpatch.status())
    if args.verbose:
        for name, lib in sbpatch.status().items():
            print(f"\n{name}: patched {len(lib.patched)}, excluded {len(lib.excluded)}, shims {lib.shims or '-'}")
            for target in lib.patched:
                print(f"  patched  {target}")
            for target, reason in lib.excluded.items():
                print(f"  excluded {target}: {reason}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """Run a script, a module (-m) or a command with the libraries enabled, in the manner of ``ddtrace-run``."""
    libraries = args.libraries or []
    if not args.target:
        print("sbpatch run: give a script, -m MODULE, or a command", file=sys.stderr)
        return 2
    first, rest = args.target[0], args.target[1:]
    is_script = first.endswith(".py") or (os.path.isfile(first) and not os.access(first, os.X_OK))
    if args.module or is_script:
        sbpatch.enable(*libraries)
        if args.module:
            sys.argv = [first, *rest]
            runpy.run_module(first, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [first, *rest]
            sys.path.insert(0, os.path.dirname(os.path.abspath(first)))
            runpy.run_path(first, run_name="__main__")
        return 0
    # Any other command (python, pytest, ...): the start-up hook installed with sbpatch reads SBPATCH.
    executable = shutil.which(first)
    if executable is None:
        print(f"sbpatch run: {first!r} is neither a Python file nor a command on PATH", file=sys.stderr)
        return 2
    os.environ[config.ENV_VAR] = ",".join(libraries) if libraries else "all"
    os.execv(executable, [first, *rest])
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    valid = ", ".join(registry.INTEGRATIONS)
    parser = argparse.ArgumentParser(
        prog="sbpatch",
        description="Freeze the victim model's parameters during adversarial attacks of existing libraries "
        "(semi-backward propagation): identical adversarial examples, less work.",
    )
    parser.add_argument("--version", action="version", version=f"sbpatch {sbpatch.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("status", help="show what sbpatch patches in this environment")
    p.add_argument("--libraries", type=library_list, default=None, help=f"comma list of: {valid} (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every patched and excluded target")
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "run",
        help="run a Python script, module or command with sbpatch enabled",
        description="sbpatch run [--libraries L,...] script.py args... | -m module args... | command args...",
    )
    p.add_argument("--libraries", type=library_list, default=None, help=f"comma list of: {valid} (default: all)")
    p.add_argument("-m", dest="module", action="store_true", help="run a module as a script, like python -m")
    p.add_argument("target", nargs=argparse.REMAINDER, help="script.py [args...], module [args...] or a command")
    p.set_defaults(func=_run)

    for name, module in (("bench", "sbpatch.bench.cli"), ("verify", "sbpatch.verify")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # an optional part not present in this installation
            if exc.name != module:
                raise
            continue
        help_text = (mod.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=help_text, description=mod.__doc__)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sbpatch`` command and ``python -m sbpatch``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except sbpatch.DidNotEnable as exc:  # a library named with --libraries is missing or unsupported
        parser.exit(2, f"sbpatch: {exc}\n")


if __name__ == "__main__":
    raise SystemExit(main())
