"""The sbpatch command: status, run, --version, --help (plain text, every default shown), and exit code 2 with one
line naming the valid choices on bad arguments (a missing script or module too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sbpatch
from sbpatch import cli


def run_cli(*args: str, cwd: str | Path | None = None, path: str | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("sbpatch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sbpatch"]
    env = {k: v for k, v in os.environ.items() if k != "SBPATCH"}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_console_script_installed():
    assert Path(sys.executable).with_name("sbpatch").exists() or shutil.which("sbpatch")


def test_version_and_help():
    out = run_cli("--version")
    assert out.stdout.strip() == f"sbpatch {sbpatch.__version__}"
    out = run_cli("--help")
    assert out.returncode == 0 and "status" in out.stdout and "run" in out.stdout


def test_status_lists_what_will_be_patched_when_imported():
    out = run_cli("status", "-v", "--libraries", "torchattacks,cleverhans")
    assert out.returncode == 0, out.stderr
    assert "  when imported  torchattacks.attack.Attack.__call__" in out.stdout
    assert "  excluded torchattacks.LGV: trains copies" in out.stdout
    assert (
        "  when imported  cleverhans.torch.attacks.projected_gradient_descent.projected_gradient_descent" in out.stdout
    )
    row = next(line for line in out.stdout.splitlines() if line.startswith("cleverhans"))
    assert row.split()[3:6] == ["yes", "when", "imported"]
    row = next(line for line in out.stdout.splitlines() if line.startswith("art"))
    assert row.split()[3:5] == ["no", "0"]  # not enabled: nothing patched, nothing pending


def test_status_lists_patched_targets_once_imported():
    code = (
        "import torchattacks, cleverhans.torch.attacks.fast_gradient_method\n"
        "from sbpatch import cli\n"
        "cli.main(['status', '-v', '--libraries', 'torchattacks,cleverhans'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "SBPATCH"})
    assert out.returncode == 0, out.stderr
    assert "  patched  torchattacks.attack.Attack.__call__" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("torchattacks"))
    assert row.split()[3:5] == ["yes", "1"]
    row = next(line for line in out.stdout.splitlines() if line.startswith("cleverhans"))
    assert "yes      1, rest when imported" in row
    assert "  patched  cleverhans.torch.attacks.fast_gradient_method.fast_gradient_method" in out.stdout
    assert "  when imported  cleverhans.torch.attacks.spsa.spsa" in out.stdout


ATTACK_MODULES = ("torchattacks", "art", "foolbox", "advertorch", "deeprobust", "cleverhans", "OpenAttack",
                  "textattack", "nltk", "transformers", "torch")


def test_status_is_instant_and_imports_no_library():
    """`sbpatch status` reads versions from package metadata and imports no attack library (nor torch): TextAttack
    alone takes tens of seconds to import offline."""
    code = (
        "import sys\n"
        "from sbpatch import cli\n"
        "rc = cli.main(['status'])\n"
        "rc |= cli.main(['status', '-v'])\n"
        f"print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in {ATTACK_MODULES!r}))\n"
        "raise SystemExit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "SBPATCH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "IMPORTED []"
    assert out.stderr == ""
    start = time.perf_counter()
    out = run_cli("status")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "when imported" in out.stdout
    assert elapsed < 5, f"sbpatch status took {elapsed:.1f} s"


def test_status_shows_parameters_held_now():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    assert "held now" not in str(sbpatch.status())
    with sbpatch.frozen(model):
        report = sbpatch.status()
    assert report.held == 4
    assert "held now: 4 parameters" in str(report) and "sbpatch.release_all()" in str(report)
    assert sbpatch.status().held == 0


def test_status_table():
    out = run_cli("status", "--libraries", "torchattacks")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["library", "installed", "supported", "enabled"]
    row = next(line for line in lines if line.startswith("torchattacks"))
    assert "3.5.1" in row and " yes " in row
    assert "MultiheadAttention" in out.stdout  # the kernel-preserving rules are listed


@pytest.mark.parametrize(
    "args, expected",
    [
        (["status", "--libraries", "nope"], "torchattacks, art, foolbox, advertorch, deeprobust"),
        (["run", "--libraries", "torch_attacks", "x.py"], "valid names"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_naming_choices(args: list[str], expected: str):
    out = run_cli(*args)
    assert out.returncode == 2
    assert expected in out.stderr


def test_run_needs_a_target(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["run"]) == 2
    assert "give a script" in capsys.readouterr().err


def test_status_in_process_prints_table(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["status"]) == 0
    assert "torchattacks" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "missing.py"], "sbpatch run: can't open file 'missing.py': No such file or directory"),
        (["run", "-m", "nosuch"], "sbpatch run: No module named 'nosuch'"),
        (["run", "-m", "nosuch.sub"], "sbpatch run: No module named 'nosuch.sub'"),
        (["run", "-m", "json"], "'json' is a package and cannot be directly executed"),
        (["run", "no-such-command-xyz"], "neither a Python file nor a command on PATH"),
    ],
)
def test_run_missing_target_is_one_line_and_exit_2(args: list[str], expected: str, tmp_path: Path):
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == out.stderr.strip().splitlines()[0], f"more than one line: {out.stderr}"
    assert expected in out.stderr and "Traceback" not in out.stderr


def test_run_module_finds_the_current_directory_like_python_m(tmp_path: Path):
    (tmp_path / "mymod.py").write_text(
        "import sys\nimport sbpatch\n"
        "print(__name__, sys.argv[1:], sys.path[0] == __import__('os').getcwd(), "
        "sbpatch.status()['cleverhans'].enabled)\n"
    )
    out = run_cli("run", "--libraries", "cleverhans", "-m", "mymod", "a1", "--flag", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "__main__ ['a1', '--flag'] True True"
    script = run_cli("run", str(tmp_path / "mymod.py"), "b", cwd="/")
    assert script.returncode == 0, script.stderr
    assert script.stdout.split()[:2] == ["__main__", "['b']"]


def test_run_python_means_this_interpreter_not_the_first_on_path(tmp_path: Path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("python", "python3"):
        (fake / name).write_text("#!/bin/sh\necho WRONG PYTHON\n")
        (fake / name).chmod(0o755)
    code = "import os, sys; print(sys.prefix); print(os.environ['SBPATCH'])"
    for name in ("python", "python3"):
        out = run_cli("run", "--libraries", "cleverhans", name, "-c", code, path=f"{fake}:{os.environ['PATH']}")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [sys.prefix, "cleverhans"], out.stdout


def test_run_finds_commands_next_to_the_interpreter_first(tmp_path: Path):
    """`sbpatch run torchrun ...` works with the venv not on PATH: the interpreter's directory is searched first."""
    here = Path(sys.executable).parent
    assert cli.find_command("torchrun", path="/usr/bin:/bin") == str(here / "torchrun")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "torchrun").write_text("#!/bin/sh\necho WRONG TORCHRUN\n")
    (other / "torchrun").chmod(0o755)
    (other / "only-here").write_text("#!/bin/sh\n")
    (other / "only-here").chmod(0o755)
    assert cli.find_command("torchrun", path=str(other)) == str(here / "torchrun")  # the venv's, not PATH's first
    assert cli.find_command("only-here", path=str(other)) == str(other / "only-here")  # then PATH
    assert cli.find_command("no-such-command-xyz", path=str(other)) is None
    assert cli.find_command(str(other / "only-here")) == str(other / "only-here")  # a path is taken as it is
    out = run_cli("run", "torchrun", "--help", path=f"{other}:/usr/bin:/bin")
    assert out.returncode == 0, out.stderr
    assert "WRONG" not in out.stdout and "nproc" in out.stdout


def _subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_texts_are_plain_and_show_every_default(capsys: pytest.CaptureFixture[str]):
    parser = cli.build_parser()
    commands = _subparsers(parser)
    assert {"status", "run", "bench", "verify"} <= set(commands)
    for name, sub in commands.items():
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text and ":class:" not in text, f"{name}: raw markup in help"
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            shown = formatter._get_help_string(action)
            assert "default" in shown, f"sbpatch {name} {action.option_strings[0]}: no default in {shown!r}"
