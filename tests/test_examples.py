"""The README's examples run and print what the README says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
EXPECTED = {
    "quickstart.py": ["identical: True", "with sbpatch 0", "torchattacks"],
    "own_attack.py": ["weight gradients computed: 0", "fc.bias still frozen: True | conv1 trainable again: True"],
    "adversarial_training.py": ["step 2: adversarial loss", "frozen attack calls: 3"],
}


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example(name: str):
    env = {k: v for k, v in os.environ.items() if k != "SBPATCH"} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    for text in EXPECTED[name]:
        assert text in out.stdout, out.stdout
