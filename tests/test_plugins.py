"""Third-party adapters through the ``sbpatch.integrations`` entry point: the example package in examples/plugin is
really installed (pip, into a folder of the test) and found through its distribution's metadata; a broken plug-in
costs one warning and a status row, never an exception."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT, run_python

PLUGIN = f"{ROOT}/examples/plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """examples/plugin built and installed with pip into a fresh folder (copied first: no build files in the repo)."""
    root = tmp_path_factory.mktemp("plugin")
    shutil.copytree(PLUGIN, root / "src")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(root / "src")],
                   check=True, capture_output=True, timeout=300)
    return str(target)


ATTACK = """
    import torch, sbpatch
    from sbpatch_example_plugin import mini_attacks
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    model[1].bias.requires_grad_(False)
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    with sbpatch.paused():
        shipped = mini_attacks.PGD(model)(x, y)
    shipped_grads = sum(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    patched = mini_attacks.PGD(model)(x, y)
    print("identical", torch.equal(shipped, patched))
    print("grads", shipped_grads, sum(p.grad is not None for p in model.parameters()))
    print("flags", [p.requires_grad for p in model.parameters()])
    row = sbpatch.status()["mini_attacks"]
    print("row", row.version, row.enabled, sorted(row.patched), row.calls)
"""
EXPECTED = [
    "identical True",
    "grads 1 0",
    "flags [True, False]",
    "row 0.1.0 True ['sbpatch_example_plugin.mini_attacks.PGD.__call__', 'sbpatch_example_plugin.mini_attacks.fgsm'] 4",
]


def test_an_installed_plugin_is_enabled_like_a_builtin(installed):
    out = run_python("import sbpatch; sbpatch.enable()" + textwrap.dedent(ATTACK),
                     env={"PYTHONPATH": f"{ROOT}:{installed}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == EXPECTED
    out = run_python("import sbpatch; sbpatch.enable('mini_attacks')" + textwrap.dedent(ATTACK),
                     env={"PYTHONPATH": f"{ROOT}:{installed}"})
    assert out.stdout.splitlines() == EXPECTED, out.stderr


def test_sbpatch_all_and_status_see_it(installed):
    env = {"PYTHONPATH": f"{ROOT}:{installed}", "SBPATCH": "all"}
    out = run_python("import sbpatch; print(sbpatch.status()['mini_attacks'].enabled)", env=env)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
    out = run_python(args=["-m", "sbpatch", "status"], env={"PYTHONPATH": f"{ROOT}:{installed}"})
    assert out.returncode == 0, out.stderr
    assert any(line.split()[:2] == ["mini_attacks", "0.1.0"] for line in out.stdout.splitlines()), out.stdout


def test_a_broken_plugin_is_one_warning_and_a_status_row(tmp_path):
    dist = tmp_path / "broken_plugin-1.0.dist-info"  # an installed distribution, as pip leaves it
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sbpatch.integrations]\nbroken = broken_plugin:INTEGRATION\n"
                                          "torchattacks = broken_plugin:INTEGRATION\n")
    (tmp_path / "broken_plugin.py").write_text("INTEGRATION = 'not an Integration'\n")
    code = """
        import warnings, sbpatch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sbpatch.enable()  # never raises for a broken plug-in
            print(sbpatch.status()["broken"].note)
            sbpatch.enable()
        print(len([w for w in caught if "broken_plugin" in str(w.message)]))
        try:
            sbpatch.enable("broken")
        except sbpatch.DidNotEnable as exc:
            print("named:", exc)
    """
    out = run_python(code, env={"PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("plug-in broken_plugin:INTEGRATION is broken: TypeError: broken_plugin:INTEGRATION is a str, "
                        "not an sbpatch.patching.Integration")
    assert lines[1] == "2"  # one for the broken object, one for the entry point taking a built-in's name
    assert lines[2].startswith("named: broken: plug-in broken_plugin:INTEGRATION is broken")
