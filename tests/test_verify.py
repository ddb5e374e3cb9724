"""sbpatch.verify() and `sbpatch verify` on a user's model: identical table, state left as found; a representative
default set, PGD mapped per library, unknown attacks rejected naming the valid ones, a line per attack in CI logs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import data, tiny_cnn

import sbpatch
from sbpatch import cli, registry
from sbpatch.verify import REPRESENTATIVE, _cases, select


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


def test_default_is_a_representative_set_and_says_how_to_run_everything(capsys):
    model = tiny_cnn()
    x, y = data()
    report = sbpatch.verify(model, x, y, libraries=["torchattacks", "cleverhans"], progress=False)
    assert [(r.library, r.attack) for r in report] == [
        ("torchattacks", "PGD"), ("torchattacks", "CW"), ("torchattacks", "Square"),
        ("cleverhans", "projected_gradient_descent"), ("cleverhans", "carlini_wagner_l2"),
        ("cleverhans", "spsa"),
    ]
    assert report.ok
    text = str(report)
    assert "representative set: 6 of" in text and "--all" in text and "--image-size 8" in text


def test_every_representative_attack_exists_in_its_library():
    for library, names in REPRESENTATIVE.items():
        if registry.why_not(library) is not None:
            continue
        cases = _cases(library)
        assert len(select(library, cases, None)) == len(names), (library, names)


def test_pgd_is_mapped_per_library_as_bench_does():
    model = tiny_cnn()
    x, y = data()
    report = sbpatch.verify(model, x, y, libraries=["foolbox", "cleverhans", "torchattacks"], attacks=["PGD"],
                            progress=False)
    assert [(r.library, r.attack, r.result) for r in report] == [
        ("foolbox", "LinfProjectedGradientDescentAttack", "identical"),
        ("cleverhans", "projected_gradient_descent", "identical"),
        ("torchattacks", "PGD", "identical"),
    ]


def test_unknown_attack_raises_naming_the_valid_ones(capsys):
    model = tiny_cnn()
    x, y = data()
    with pytest.raises(sbpatch.ConfigError) as exc:
        sbpatch.verify(model, x, y, libraries=["torchattacks"], attacks=["NOSUCH"], progress=False)
    assert "NOSUCH" in str(exc.value) and "DeepFool" in str(exc.value) and "PGD" in str(exc.value)
    assert cli.main(["verify", "--libraries", "torchattacks", "--attacks", "PGD,NOSUCH", "--image-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sbpatch verify: error: unknown attack 'NOSUCH'") and "torchattacks: APGD" in err


def test_progress_is_a_line_per_attack_when_not_a_terminal(capsys):
    model = tiny_cnn()
    x, y = data()
    sbpatch.verify(model, x, y, libraries=["torchattacks"], attacks=["FGSM", "PGD"], progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("[1/2 ") and "torchattacks FGSM: identical (" in lines[0]
    assert lines[1].startswith("[2/2 ") and "torchattacks PGD: identical (" in lines[1]


def test_verify_says_which_parameters_were_kept_live_and_why():
    from test_freeze import FrameClassifier

    torch.manual_seed(0)
    model = FrameClassifier().eval()
    x, y = data()
    report = sbpatch.verify(model, x, y, libraries=["torchattacks"], attacks=["PGD"], progress=False)
    assert report.ok
    assert list(report.kept_live) == ["head.weight"]
    assert "non-foldable" in report.kept_live["head.weight"]
    assert "kept live" in str(report) and "head.weight" in str(report)
    assert sbpatch.verify(tiny_cnn(), x, y, libraries=["torchattacks"], attacks=["PGD"], progress=False).kept_live == {}


@pytest.mark.parametrize("model", ["notamodel", None, torch.nn.Linear(2, 2).weight])
def test_verify_rejects_what_is_not_a_model_naming_what_is_accepted(model):
    x, y = data()
    with pytest.raises(TypeError) as exc:
        sbpatch.verify(model, x, y, libraries=["torchattacks"], progress=False)
    message = str(exc.value)
    assert "torch.nn.Module" in message and type(model).__name__ in message
    assert "text victim" in message


def test_verify_rejects_a_text_victim_without_a_module():
    from types import SimpleNamespace

    victim = SimpleNamespace(model="bert", tokenizer=None, embedding=None, words=[], vectors=None)
    with pytest.raises(TypeError, match=r"text victim whose \.model is str 'bert'"):
        sbpatch.verify(victim, ["a text"], [0], progress=False)


def test_the_benchmark_modules_and_verify_do_not_import_each_other():
    """verify imports the benchmark's victims; the benchmark compares outputs with sbpatch.compare, not verify."""
    code = "import sys, sbpatch.bench.text, sbpatch.bench.runner; print('sbpatch.verify' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    import importlib

    from sbpatch import compare

    verify = importlib.import_module("sbpatch.verify")  # the module (sbpatch.verify is also the function)
    assert verify.identical is compare.identical and verify.seed_all is compare.seed_all


def test_all_caps_the_finite_difference_attacks_on_large_inputs():
    """`verify --all` leaves out the three finite-difference attacks above 16x16x3 values per sample (over an hour
    at 32 px), says so in a note, and keeps them on small inputs."""
    from sbpatch.verify import _cap_finite_differences as cap

    jobs = [("art", "FeatureAdversariesNumpy", None), ("art", "FGSM", None), ("deeprobust", "LBFGS", None),
            ("art", "VirtualAdversarialMethod", None)]
    kept, capped = cap(jobs, torch.zeros(2, 3, 32, 32))
    assert [j[1] for j in kept] == ["FGSM"]
    assert capped == ["art FeatureAdversariesNumpy", "deeprobust LBFGS", "art VirtualAdversarialMethod"]
    assert cap(jobs, torch.zeros(2, 3, 16, 16)) == (jobs, [])
    assert cap(jobs, ["a text"]) == (jobs, [])
