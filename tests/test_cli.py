"""The sbpatch command: status, --version, --help, and exit code 2 naming valid choices on bad arguments."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sbpatch
from sbpatch import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("sbpatch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sbpatch"]
    env = {k: v for k, v in os.environ.items() if k != "SBPATCH"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, env=env)


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
    assert "in_proj_weight" in out.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["status", "--libraries", "nope"], "valid names: torchattacks, art, foolbox, advertorch, deeprobust"),
        (["run", "--libraries", "torch_attacks", "x.py"], "valid names: torchattacks"),
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
