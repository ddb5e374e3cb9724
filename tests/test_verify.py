"""sbpatch.verify() and `sbpatch verify` on a user's model: identical table, state left as found."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from helpers import data, tiny_cnn

import sbpatch
from sbpatch import registry


def test_verify_reports_identical_and_leaves_model_as_found():
    model = tiny_cnn()
    x, y = data()
    flags = [p.requires_grad for p in model.parameters()]
    report = sbpatch.verify(model, x, y, libraries=["torchattacks"], attacks=["CW", "PGD", "Square"], progress=False)
    assert [(r.library, r.attack, r.result) for r in report] == [
        ("torchattacks", "CW", "identical"),
        ("torchattacks", "PGD", "identical"),
        ("torchattacks", "Square", "identical"),
    ]
    assert all(r.patched_s > 0 and r.unpatched_s > 0 for r in report)
    assert report.ok and "3 identical, 0 DIFFERENT" in str(report)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_verify_enables_for_the_run_only():
    sbpatch.disable("cleverhans")
    try:
        model = tiny_cnn()
        x, y = data()
        report = sbpatch.verify(model, x, y, libraries=["cleverhans"], attacks=["fast_gradient_method"], progress=False)
        assert [r.result for r in report] == ["identical"]
        assert registry.counters("cleverhans").enabled is False
    finally:
        sbpatch.enable("cleverhans")


def test_identical_is_bitwise():
    a = torch.tensor([1.0, float("nan")])
    assert sbpatch.verify.__module__ == "sbpatch.verify"
    from sbpatch.verify import identical

    assert identical(a, a.clone())
    assert not identical(a, torch.tensor([1.0 + 1e-7, float("nan")]))
    assert not identical(a, a.double())


def test_verify_cli_json(tmp_path):
    out_file = tmp_path / "v.json"
    out = subprocess.run(
        [sys.executable, "-m", "sbpatch", "verify", "--libraries", "torchattacks", "--attacks", "FGSM,DeepFool",
         "--image-size", "16", "--batch-size", "2", "--threads", "1", "--json", str(out_file)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "2 identical, 0 DIFFERENT" in out.stdout
    rows = json.loads(out_file.read_text())
    assert {r["attack"] for r in rows} == {"FGSM", "DeepFool"} and all(r["result"] == "identical" for r in rows)
    bad = subprocess.run([sys.executable, "-m", "sbpatch", "verify", "--model", "resnet9"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "resnet18" in bad.stderr
