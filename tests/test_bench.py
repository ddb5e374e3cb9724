"""``sbpatch bench``: the tiny configuration writes valid JSON/markdown/PNG with the four columns; bad option values
exit 2 naming the valid choices; the CPU memory meter and the row selection behave. Speed is never asserted."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from sbpatch.bench import cli, runner, workloads

TINY = ["--model", "cnn", "--image-size", "16", "--steps", "2", "--repeats", "1", "--warmup", "0", "--quiet"]
COLUMNS = {"shipped", "oneliner", "sbpatch", "limit"}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sbpatch bench")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_tiny_run_writes_json_markdown_png(tmp_path, capsys):
    out = {k: str(tmp_path / f"bench.{k}") for k in ("json", "md", "png")}
    args = parse([*TINY, "--libraries", "torchattacks,cleverhans", "--attacks", "PGD,CW", "--memory",
                  "--json", out["json"], "--markdown", out["md"], "--plot", out["png"]])
    assert cli.run(args) == 0

    with open(out["json"]) as f:
        data = json.load(f)
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["threads"] >= 1
    assert data["config"]["model"] == "cnn" and data["config"]["steps"] == 2
    rows = {(r["library"], r["attack"]): r for r in data["rows"]}
    assert set(rows) == {("torchattacks", "PGD"), ("cleverhans", "PGD"), ("torchattacks", "CW")}
    for key, row in rows.items():
        assert set(row["columns"]) == COLUMNS, key
        assert set(row["ratio_wall"]) == COLUMNS and row["ratio_wall"]["shipped"] == 1.0
        assert all(c["wall_median_s"] > 0 and c["cpu_median_s"] >= 0 for c in row["columns"].values())
        assert all(isinstance(c["memory_bytes"], int) for c in row["columns"].values())
        assert row["identical"] is True and row["engaged"] is True, key
    # cleverhans calls loss.backward(): as shipped it fills param.grad, so its memory figure must be higher
    ch = rows[("cleverhans", "PGD")]
    assert ch["leaves_grad"] is True
    assert ch["columns"]["sbpatch"]["memory_bytes"] < ch["columns"]["shipped"]["memory_bytes"]
    assert rows[("torchattacks", "PGD")]["leaves_grad"] is False  # autograd.grad: nothing to save

    with open(out["md"]) as f:
        md = f.read()
    for label in ("as shipped", "one-liner", "sbpatch", "limit"):
        assert label in md
    assert md.count("\n| torchattacks |") == 2 and "| cleverhans |" in md
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "sbpatch bench" in printed and "thread(s)" in printed


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--model", "resnet9"], "resnet18"),
        (["--libraries", "art,nope"], "torchattacks"),
        (["--device", "tpu"], "cuda"),
        (["--metric", "gpu"], "wall"),
        (["--batch-size", "0"], "integer >= 1"),
        (["--steps", "two"], "integer >= 1"),
        (["--plot", "chart.txt"], ".png"),
        (["--warmup", "-1"], "0"),
    ],
)
def test_bad_values_exit_2_naming_choices(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_bad_attack_and_vit_size_exit_2(capsys):
    assert cli.run(parse([*TINY, "--libraries", "torchattacks", "--attacks", "NoSuchAttack"])) == 2
    err = capsys.readouterr().err
    assert "NoSuchAttack" in err and "PGD" in err and "DeepFool" in err
    assert cli.run(parse(["--model", "vit_b_16", "--image-size", "20"])) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_resolve_rows_maps_pgd_and_notes_missing():
    cases = {"art": {"ProjectedGradientDescent": None, "FastGradientMethod": None}, "foolbox": {}}
    rows = workloads.resolve_rows(["art", "foolbox"], ["PGD", "FastGradientMethod"], cases)
    assert [(r.library, r.attack, r.case) for r in rows] == [
        ("art", "PGD", "ProjectedGradientDescent"),
        ("foolbox", "PGD", None),
        ("art", "FastGradientMethod", "FastGradientMethod"),
    ]
    assert "no PGD" in rows[1].note
    default = workloads.resolve_rows(["torchattacks"], None, {"torchattacks": {"PGD": 1, "CW": 1, "DeepFool": 1}})
    assert [r.attack for r in default] == ["PGD", "CW", "DeepFool"]


def test_memory_meter_sees_what_freezing_saves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.rand(32, 64, requires_grad=True)

    def attack_step():
        model(x).sum().backward()

    live = runner.measure_memory(model, attack_step, "cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = runner.measure_memory(model, attack_step, "cpu")
    grads = sum(p.numel() * 4 for p in model.parameters())
    # live: .grad buffers plus the first Linear's saved input; frozen: neither (only ReLU's output is saved)
    assert live - frozen >= grads + x.numel() * 4
    assert frozen > 0


def test_limit_attack_keeps_parameters_and_grads():
    from sbpatch.bench.models import build_model, limit_attack, make_data

    model = build_model("cnn", 16)
    x, y = make_data(4, 16)
    out = limit_attack(model, x, y, 2)()
    assert out.shape == x.shape and float((out - x).abs().max()) <= 8 / 255 + 1e-6
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_python_m_sbpatch_bench(tmp_path):
    env = {**os.environ, "GIT_PYTHON_REFRESH": "quiet"}
    path = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-m", "sbpatch", "bench", *TINY, "--libraries", "torchattacks",
                           "--attacks", "PGD", "--json", str(path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(path.read_text())["rows"][0]["columns"]) == COLUMNS
    bad = subprocess.run([sys.executable, "-m", "sbpatch", "bench", "--model", "nope"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "resnet50" in bad.stderr
