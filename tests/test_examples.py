"""The README's examples run and print what the README says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, run_bounded

EXAMPLES = Path(__file__).parent.parent / "examples"
EXPECTED = {
    "quickstart.py": ["identical: True", "with sbpatch 0", "torchattacks"],
    "own_attack.py": ["weight gradients computed: 0", "fc.bias still frozen: True | conv1 trainable again: True"],
    "adversarial_training.py": ["step 2: adversarial loss", "frozen attack calls: 3"],
    "text_attack.py": [
        "TextAttack: identical: True",
        "as shipped 40, with sbpatch 1",  # TextAttack's get_grad sets the word embedding live itself
        "OpenAttack: identical: True",
        "as shipped 40, with sbpatch 0",
        "frozen attack calls: TextAttack 4, OpenAttack 8",
    ],
}


# Launched with torchrun (2 gloo ranks) as shipped, under SBPATCH=all and under `sbpatch run`, unmodified.
TORCHRUN = {"ddp_adversarial_training.py"}
# Named targets (SBPATCH_TARGETS / sbpatch run --target): tests/test_targets.py runs them.
NAMED_TARGETS = {"named_target_gcg.py", "gcg_utils.py"}


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED) | TORCHRUN | NAMED_TARGETS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example(name: str):
    env = {k: v for k, v in os.environ.items() if k != "SBPATCH"} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    for text in EXPECTED[name]:
        assert text in out.stdout, out.stdout
    if name == "quickstart.py":  # the README shows its output: every line but the CPU times, which vary
        shown = [line for line in readme_output(name) if not line.startswith("CPU time:")]
        printed = [line.rstrip() for line in out.stdout.splitlines() if not line.startswith("CPU time:")]
        assert printed == shown, "README's quick-start output block is not what examples/quickstart.py prints"


def readme_output(name: str) -> list[str]:
    """The fenced block that follows the README's "[`examples/<name>`](...) runs this ... prints:" line."""
    text = (EXAMPLES.parent / "README.md").read_text()
    after = text[text.index(f"[`examples/{name}`](examples/{name}) runs this"):]
    block = after.split("```\n", 2)[1]
    return block.rstrip("\n").splitlines()


def test_speed_figures_are_measured_on_one_thread():
    """README's figures are 1 thread: every example that prints a time pins torch's threads itself."""
    for path in EXAMPLES.glob("*.py"):
        source = path.read_text()
        if "time." in source or "perf_counter" in source:
            assert "torch.set_num_threads(1)" in source, f"{path.name} prints a time without pinning threads"


def torchrun(name: str, *args: str) -> list[str]:
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*command, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(EXAMPLES / name), *args]


@pytest.mark.parametrize("launch", ["as shipped", "SBPATCH=all", "sbpatch run"])
def test_ddp_example_under_torchrun(launch: str):
    """The same script: as shipped every attack step all-reduces the model's gradients; patched (the start-up hook
    in every rank, or `sbpatch run`) the attacks communicate nothing, the training still reduces, ranks stay equal."""
    command = torchrun("ddp_adversarial_training.py")
    if launch == "sbpatch run":
        command = [sys.executable, "-m", "sbpatch", "run", *command]
    out = run_bounded(command, timeout=240, env={"SBPATCH": "all"} if launch == "SBPATCH=all" else {})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2: adversarial loss" in out.stdout and "parameters identical on every rank: True" in out.stdout
    if launch == "as shipped":
        assert "sbpatch: off" in out.stdout and "gradient all-reduces: attacks 9, training 3" in out.stdout
    else:
        assert "sbpatch: on" in out.stdout and "gradient all-reduces: attacks 0, training 3" in out.stdout


def test_ddp_example_failing_rank_tears_down():
    """A rank that crashes does not leave the other hanging: torchrun stops it and exits non-zero, in bounded time."""
    out = run_bounded(torchrun("ddp_adversarial_training.py", "--fail-rank", "1"), timeout=240, env={"SBPATCH": "all"})
    assert out.returncode != 0
    assert "fails on purpose" in out.stderr and "ChildFailedError" in out.stderr
