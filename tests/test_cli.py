"""The sbpatch command: status, run, --version, --help (plain text, every default shown), and exit code 2 with one
line naming the valid choices on bad arguments (a missing script or module too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def test_status_imports_and_lists_every_target():
    out = run_cli("status", "-v", "--libraries", "torchattacks,cleverhans")
    assert out.returncode == 0, out.stderr
    assert "  patched  torchattacks.attack.Attack.__call__" in out.stdout
    assert "  excluded torchattacks.LGV: trains copies" in out.stdout
    assert "  patched  cleverhans.torch.attacks.projected_gradient_descent.projected_gradient_descent" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("cleverhans"))
    assert row.split()[3:5] == ["yes", "6"]


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
