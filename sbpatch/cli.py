"""The ``sbpatch`` command: ``status``, ``run``, ``bench``, ``verify``, ``--version``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
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
    """Enable the libraries (all installed by default) and print the table: what is patched in this process, and
    for a library not imported yet what will be patched when it is imported. Imports no attack library."""
    sbpatch.enable(*(args.libraries or []))
    report = sbpatch.status()
    print(report)
    if args.verbose:
        for name, lib in report.items():
            targets = {t.name: t for t in registry.integration(name).targets}
            print(
                f"\n{name}: patched {len(lib.patched)}, when imported {len(lib.pending)}, "
                f"excluded {len(lib.excluded)}, shims {lib.shims or '-'}"
            )
            for target in lib.patched:
                print(f"  patched  {target}")
            for target in lib.pending:
                subclasses = " (and the subclasses that define it)" if targets[target].subclasses else ""
                print(f"  when imported  {target}{subclasses}")
            for target, reason in lib.excluded.items():
                print(f"  excluded {target}: {reason}")
    return 0


def target_list(value: str) -> list[str]:
    """argparse type for ``--target mod:func[,mod:Class.method]``: exits 2 showing the form on a bad name."""
    from sbpatch import targets

    try:
        return [f"{m}:{p}" for m, p in targets.parse([value])]
    except sbpatch.ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fail(message: str) -> int:
    """One line on stderr, exit status 2 (a bad argument, as argparse does)."""
    print(f"sbpatch run: {message}", file=sys.stderr)
    return 2


def _module_error(name: str) -> str | None:
    """Why ``python -m name`` could not start (the message Python gives), or None when it can."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package that does not exist, a relative or empty name
        spec = None
    if spec is None:
        return f"No module named {name!r}"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        try:
            main = importlib.util.find_spec(f"{name}.__main__")
        except ImportError:
            main = None
        if main is None:
            return f"No module named '{name}.__main__'; {name!r} is a package and cannot be directly executed"
    return None


def _is_script(path: str) -> bool:
    """A Python file (or a directory or zip with ``__main__.py``) rather than a command on PATH."""
    if path.endswith((".py", ".pyw", ".pyz")):
        return True
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "__main__.py"))
    return os.path.isfile(path) and not os.access(path, os.X_OK)


def _python_names() -> set[str]:
    """Command names that mean "this Python" (``python3.11`` only when it is this version)."""
    v = sys.version_info
    return {"python", f"python{v.major}", f"python{v.major}.{v.minor}"}


def find_command(name: str, path: str | None = None) -> str | None:
    """The executable a command name means for ``sbpatch run``: first the directory of this interpreter (the
    venv's bin, whose ``torchrun``, ``pytest``... run with sbpatch's start-up hook even when that venv is not on PATH),
    then ``path`` (default: the PATH variable). A name with a directory part is taken as it is. None when not found."""
    if os.path.dirname(name):
        return shutil.which(name)
    here = os.path.dirname(sys.executable) if sys.executable else ""
    if here:
        found = shutil.which(name, path=here)
        if found is not None:
            return found
    return shutil.which(name, path=path)


def _run(args: argparse.Namespace) -> int:
    """Run a script, a module (-m) or a command with the libraries enabled, in the manner of ``ddtrace-run``."""
    libraries = args.libraries or []
    if not args.target:
        return _fail("give a script, -m MODULE, or a command")
    first, rest = args.target[0], args.target[1:]
    named = getattr(args, "named", None) or []
    if args.module:
        sys.path[0] = os.getcwd()  # as `python -m` does: modules in the current directory are found
        sbpatch.enable(*libraries)  # before the module's parent packages are imported (shims)
        error = _module_error(first)
        if error is not None:
            return _fail(error)
        sys.argv = [first, *rest]
        if named:
            sbpatch.enable_targets(named)
        runpy.run_module(first, run_name="__main__", alter_sys=True)
        return 0
    if _is_script(first):
        if not os.path.exists(first):
            return _fail(f"can't open file {first!r}: No such file or directory")
        sbpatch.enable(*libraries)
        sys.argv = [first, *rest]
        sys.path[0] = os.path.dirname(os.path.abspath(first))  # as `python script.py` does
        if named:
            sbpatch.enable_targets(named)
        runpy.run_path(first, run_name="__main__")
        return 0
    # Any other command (python, pytest, ...): the start-up hook installed with sbpatch reads SBPATCH.
    if first in _python_names() and sys.executable:
        # `python` means the interpreter sbpatch is installed in (the one whose start-up hook reads SBPATCH), not
        # whichever `python` comes first on PATH (an unactivated venv).
        executable = argv0 = sys.executable
    else:
        executable, argv0 = find_command(first), first
        if executable is None:
            return _fail(f"{first!r} is neither a Python file nor a command on PATH (nor next to {sys.executable})")
    os.environ[config.ENV_VAR] = ",".join(libraries) if libraries else "all"
    if named:
        os.environ["SBPATCH_TARGETS"] = ",".join(named)
    os.execv(executable, [argv0, *rest])
    return 0  # not reached


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default: appended unless its help already names it; flags read "default: off"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        if action.nargs == 0:  # store_true and the like
            return f"{text} (default: off)" if action.default is False else text
        return f"{text} (default: %(default)s)"


def plain(text: str) -> str:
    """Help text from a docstring: reStructuredText roles and literals (``x``, :func:`x`) as plain text."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def build_parser() -> argparse.ArgumentParser:
    valid = ", ".join(registry.INTEGRATIONS)
    parser = argparse.ArgumentParser(
        prog="sbpatch",
        description="Freeze the victim model's parameters during adversarial attacks of existing libraries "
        "(semi-backward propagation): identical adversarial examples, less work.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sbpatch {sbpatch.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("status", help="show what sbpatch patches in this environment", formatter_class=HelpFormatter)
    p.add_argument("--libraries", type=library_list, default=None, help=f"comma list of: {valid} (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every patched and excluded target")
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "run",
        help="run a Python script, module or command with sbpatch enabled",
        description="sbpatch run [--libraries L,...] script.py args... | -m module args... | command args... "
        "A script or module runs in this interpreter with the libraries enabled; any other command runs with "
        "SBPATCH set (python/python3 means this interpreter; a command is looked up next to this interpreter first, "
        "then on PATH). A missing script, module or command exits 2.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--libraries", type=library_list, default=None, help=f"comma list of: {valid} (default: all)")
    p.add_argument("-m", dest="module", action="store_true",
                   help="run a module as a script, like python -m (the current directory is searched first)")
    p.add_argument("--target", dest="named", type=target_list, action="extend", default=None, metavar="MOD:FUNC",
                   help="also freeze around this function or method of any code: 'package.module:function' or "
                   "'package.module:Class.method' (repeatable, or comma-separated; as SBPATCH_TARGETS)")
    p.add_argument("target", nargs=argparse.REMAINDER, help="script.py [args...], module [args...] or a command")
    p.set_defaults(func=_run)

    for name, module in (("bench", "sbpatch.bench.cli"), ("verify", "sbpatch.verify")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # an optional part not present in this installation
            if exc.name != module:
                raise
            continue
        description = plain(getattr(mod, "DESCRIPTION", None) or mod.__doc__ or name)
        p = sub.add_parser(name, help=description.strip().split(". ")[0].splitlines()[0], description=description,
                           formatter_class=HelpFormatter)
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
