"""Shared test machinery: tiny models and the patched-vs-unpatched comparison every adapter test uses.

``compare(library, attack, model, run)`` runs ``run()`` unpatched (under ``sbpatch.paused()``) and patched with the
same seeds, and checks the contract: identical output, ``.grad`` untouched, ``requires_grad`` restored (with a
user-frozen subset), the train/eval mode the library itself leaves, and that the patched call really froze.
A case whose unpatched call fails is returned as library-broken with its error. Outcomes are appended to
``$SBPATCH_COVERAGE_OUT/<library>.jsonl`` when that variable is set (``docs/make_coverage.py`` reads them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torchvision

import sbpatch
from sbpatch import registry
from sbpatch.verify import identical, seed_all


class TinyCNN(nn.Module):
    """Conv + batch norm + linear on 3x8x8 inputs (or ``size``), 10 classes, with a shared (tied) linear layer."""

    def __init__(self, channels: int = 3, size: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.hidden = nn.Linear(4 * size * size, 16)
        self.head = nn.Linear(16, classes)
        self.tied = self.head  # the same module twice: parameters must be de-duplicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.hidden(x.flatten(1))))


def tiny_cnn(seed: int = 0, **kw: Any) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN(**kw).eval()
    model.conv.bias.requires_grad_(False)  # a user-frozen parameter: must stay frozen
    return model


def tiny_vit(seed: int = 0, size: int = 8, classes: int = 10) -> nn.Module:
    """A torchvision VisionTransformer (nn.MultiheadAttention inside: the kernel-choice trap)."""
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=size, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=classes
    ).eval()
    with torch.no_grad():  # torchvision zero-initialises the head: logits and input gradients would all be 0
        head = model.heads.head
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)))
        head.bias.copy_(torch.randn(head.bias.shape, generator=torch.Generator().manual_seed(seed + 1)))
    model.heads.head.bias.requires_grad_(False)
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": tiny_cnn, "vit": tiny_vit}


def kept_live_names(model: nn.Module) -> set[str]:
    """Names of the parameters sbpatch keeps live when it freezes ``model``: static rules (batch-first attention
    in-projections, user rules) and the run-time rules learned so far."""
    group = sbpatch.freeze.collect([model])[0]
    kept = {id(r()) for r in group.kept}
    return {n for n, p in model.named_parameters() if id(p) in kept}


def data(n: int = 4, size: int = 8, seed: int = 1, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


@dataclass
class Outcome:
    library: str
    attack: str
    model: str
    result: str  # "identical" or "library-broken"
    error: str = ""


def _snapshot_grads(model: nn.Module) -> list[torch.Tensor | None]:
    """Give every other parameter a known gradient, leave the rest None; return the expected state."""
    g = torch.Generator().manual_seed(123)
    out = []
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=g) if i % 2 == 0 else None
        out.append(None if p.grad is None else p.grad.clone())
    return out


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _set_modes(model: nn.Module, modes: list[bool]) -> None:
    for m, t in zip(model.modules(), modes):
        m.training = t


def record(outcome: Outcome) -> Outcome:
    out_dir = os.environ.get("SBPATCH_COVERAGE_OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{outcome.library}.jsonl"), "a") as f:
            f.write(json.dumps(outcome.__dict__) + "\n")
    return outcome


def compare(
    library: str,
    attack: str,
    model: nn.Module,
    run: Callable[[], Any],
    model_name: str = "",
    seed: int = 0,
    models: list[nn.Module] | None = None,
    expect_freeze: bool = True,
) -> Outcome:
    """Run ``run`` unpatched then patched with the same seed and assert the whole contract.

    ``models``: every module the attack touches (default ``[model]``). ``expect_freeze``: assert that the patched
    call ran with parameters frozen (seen by a forward pre-hook) and was counted.
    """
    models = models or [model]
    flags = [[p.requires_grad for p in m.parameters()] for m in models]
    assert any(not f for fl in flags for f in fl), "the test model needs a user-frozen parameter"
    grads = [_snapshot_grads(m) for m in models]
    modes0 = [_modes(m) for m in models]

    seed_all(seed)
    try:
        with sbpatch.paused():
            expected = run()
    except Exception as exc:  # the library itself fails on this stack: report, never count as ours
        _restore(models, grads, modes0)
        return record(Outcome(library, attack, model_name, "library-broken", f"{type(exc).__name__}: {exc}"[:300]))
    modes_unpatched = [_modes(m) for m in models]
    flags_unpatched = [[p.requires_grad for p in m.parameters()] for m in models]
    _restore(models, grads, modes0, flags)

    live = {id(p) for m in models for p in m.parameters() if p.requires_grad}
    seen_frozen: list[bool] = []  # per forward: was a normally-live parameter frozen?
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, inp: seen_frozen.append(any(not p.requires_grad for p in mod.parameters() if id(p) in live))
        )
        for m in models
    ]
    counters = registry.counters(library)
    calls0 = counters.calls
    seed_all(seed)
    try:
        got = run()
    finally:
        for h in hooks:
            h.remove()

    assert identical(expected, got), f"{library} {attack} on {model_name}: patched output differs from unpatched"
    for m, fl_expected in zip(models, flags_unpatched):
        assert [p.requires_grad for p in m.parameters()] == fl_expected, f"{attack}: requires_grad not restored"
    for m, gs in zip(models, grads):
        for p, g in zip(m.parameters(), gs):
            if g is None:
                assert p.grad is None, f"{attack}: .grad appeared on a parameter"
            else:
                assert p.grad is not None and torch.equal(p.grad, g), f"{attack}: an existing .grad changed"
    assert [_modes(m) for m in models] == modes_unpatched, f"{attack}: train/eval mode differs from unpatched"
    assert sbpatch.freeze.held_count() == 0, "sbpatch still holds parameters after the call"
    if expect_freeze:
        assert counters.calls > calls0, f"{attack}: the patched call was not frozen by sbpatch"
        if seen_frozen:  # attacks that never call the model (GN) have nothing to observe
            assert any(seen_frozen), f"{attack}: the model ran with no parameter frozen"
    return record(Outcome(library, attack, model_name, "identical"))


def expect(outcome: Outcome, known_broken: dict[Any, str]) -> None:
    """Assert ``outcome`` is identical, or library-broken with the error substring ``known_broken`` records for it
    (keyed by ``(attack, model)`` or by ``attack``): a newly broken or newly fixed case fails the test."""
    error = known_broken.get((outcome.attack, outcome.model), known_broken.get(outcome.attack))
    if error is None:
        assert outcome.result == "identical", outcome
    else:
        assert outcome.result == "library-broken" and error in outcome.error, outcome


def _restore(models: list[nn.Module], grads: list, modes: list, flags: list | None = None) -> None:
    for i, (m, gs, md) in enumerate(zip(models, grads, modes)):
        for j, (p, g) in enumerate(zip(m.parameters(), gs)):
            p.grad = None if g is None else g.clone()
            if flags is not None:
                p.requires_grad_(flags[i][j])
        _set_modes(m, md)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(
    code: str = "", args: list[str] | None = None, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """A fresh interpreter running ``code`` (dedented) or ``args``: SBPATCH unset unless ``env`` sets it, the
    repository first on PYTHONPATH, one OpenMP thread."""
    full_env = {k: v for k, v in os.environ.items() if k != "SBPATCH"}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, full_env.get("PYTHONPATH")) if p)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *(args or ["-c", textwrap.dedent(code)])],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bounded(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` like :func:`run_python` (SBPATCH unset unless ``env`` sets it, the repository and tests/ first on
    PYTHONPATH, one thread) in its own session; past ``timeout`` kill the whole session (a launcher and every rank
    it started) and fail."""
    import signal

    full_env = {k: v for k, v in os.environ.items() if k != "SBPATCH"}
    tests = os.path.join(ROOT, "tests")
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, tests, full_env.get("PYTHONPATH")) if p)
    full_env["OMP_NUM_THREADS"] = "1"
    full_env.update(env or {})
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{args} ran past {timeout} s and was killed:\n{out[-2000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
