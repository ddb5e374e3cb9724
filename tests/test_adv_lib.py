"""adv-lib 0.2.8: equality on every wrapped attack function (CNN and ViT), the target table against the library's
exports, nested calls through the rebound module globals, the memory held for backward, and the visdom stand-in."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import sys
from typing import Any

import pytest
import torch
from helpers import MODELS, compare, data, expect, run_python, tiny_cnn, tiny_vit

import sbpatch
from sbpatch import freeze, locate, registry
from sbpatch.bench.runner import SavedTensorMeter
from sbpatch.contrib.adv_lib import ATTACKS, cases
from sbpatch.patching import SbpatchWrapper

CASES = cases()

# attack (or (attack, model)) -> a substring of the error the UNPATCHED call raises on this stack.
KNOWN_BROKEN: dict[Any, str] = {
    # as shipped: abort_early's `i % (max_iterations // 10)` divides by zero below 10 iterations
    "carlini_wagner_l2-2-iterations": "ZeroDivisionError",
}


def _visdom_installed() -> bool:
    try:
        importlib.metadata.distribution("visdom")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _exported() -> set[tuple[str, str]]:
    """(defining module, name) of every function adv_lib.attacks and adv_lib.attacks.segmentation export that takes
    the model first."""
    out = set()
    for pkg in ("adv_lib.attacks", "adv_lib.attacks.segmentation"):
        mod = importlib.import_module(pkg)
        for name in dir(mod):
            f = inspect.unwrap(getattr(mod, name))
            if inspect.isfunction(f) and next(iter(inspect.signature(f).parameters), None) == "model":
                out.add((f.__module__, f.__name__))
    return out


def test_targets_are_every_exported_attack_function() -> None:
    exported = _exported()
    assert len(exported) == 24
    # minimal_apgd is public in adv_lib.attacks.auto_pgd without being re-exported: wrapped too
    assert set(ATTACKS) == exported | {("adv_lib.attacks.auto_pgd", "minimal_apgd")}
    seg = {f"segmentation.{n}" for m, n in ATTACKS if ".segmentation." in m}
    assert set(CASES) == {n for m, n in ATTACKS if ".segmentation." not in m} | seg


def test_status_shows_every_target_patched_and_the_rebound_names() -> None:
    import adv_lib.attacks as attacks
    import adv_lib.attacks.segmentation as segmentation
    import adv_lib.attacks.superdeepfool as superdeepfool

    st = sbpatch.status()["adv_lib"]
    assert st.enabled and not st.skipped, st
    for module, name in ATTACKS:
        assert f"{module}.{name}" in st.patched
        assert isinstance(getattr(importlib.import_module(module), name), SbpatchWrapper), (module, name)
    # the re-exports and superdeepfool's by-name import of df hold the same wrapper (enabled before the import here:
    # they bound the wrapper themselves; the rebinding after an import is tested in a subprocess below)
    assert superdeepfool.df is attacks.df and isinstance(attacks.df, SbpatchWrapper)
    assert isinstance(attacks.ddn, SbpatchWrapper)
    assert isinstance(segmentation.dag, SbpatchWrapper) and segmentation.pdgd is not attacks.pdgd
    assert "run_attack" in " ".join(st.excluded)
    if not _visdom_installed():  # only adv-lib's own import gets sbpatch's stand-in...
        stub = sys.modules.get("visdom")
        theirs = stub is not None and not getattr(stub, "__sbpatch_stand_in__", False)
        # ...unless secmlt, imported first in this process, has put its own stub in sys.modules
        assert st.shims == ["visdom_stand_in"] or (theirs and st.shims == []), (st.shims, stub)


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str) -> None:
    model = MODELS[model_name]()
    x, y = data()
    run = CASES[attack](model, x, y, 2)
    if attack == "segmentation.alma_prox":
        # its prox_linf_indicator is @torch.compile'd (tensors of the perturbation only, never the model): a cold
        # inductor compile takes ~40 s on 2 cores, so both runs here are eager
        eager = run

        def run() -> Any:
            with torch._dynamo.config.patch(disable=True):
                return eager()

    expect(compare("adv_lib", attack, model, run, model_name), KNOWN_BROKEN)


def test_carlini_wagner_l2_below_10_iterations_is_library_broken() -> None:
    from adv_lib.attacks import carlini_wagner_l2

    model = tiny_cnn()
    x, y = data()
    outcome = compare(
        "adv_lib",
        "carlini_wagner_l2-2-iterations",
        model,
        lambda: carlini_wagner_l2(model, x, y, binary_search_steps=1, max_iterations=2),
        "cnn",
    )
    expect(outcome, KNOWN_BROKEN)


def test_nested_calls_through_rebound_globals_are_frozen_and_counted() -> None:
    """minimal_apgd calls apgd (a partial with model=) once per binary-search step; sdf calls df by the name it
    imported."""
    from adv_lib.attacks import sdf
    from adv_lib.attacks.auto_pgd import minimal_apgd

    model = tiny_cnn()
    x, y = data()
    counters = registry.counters("adv_lib")
    calls = counters.calls
    minimal_apgd(model, x, y, norm=float("inf"), max_eps=0.1, binary_search_steps=3, n_iter=2)
    assert counters.calls - calls == 1 + 3
    calls = counters.calls
    states: list[bool] = []
    handle = model.register_forward_pre_hook(lambda m, i: states.append(any(p.requires_grad for p in m.parameters())))
    try:
        sdf(model, x, y, steps=1, df_steps=2, search_iter=1)
    finally:
        handle.remove()
    assert counters.calls - calls >= 2  # sdf, and at least one df step through superdeepfool's global
    assert states and not any(states), states
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True, True, True, True, True]
    assert all(p.grad is None for p in model.parameters())
    assert freeze.held_count() == 0


def test_memory_saved_for_backward_is_lower_patched() -> None:
    """autograd.grad computes no weight gradients either way, but live weights make Linear layers save their inputs
    for backward: frozen, fewer bytes are held for backward (and the adversarial examples are identical)."""
    from adv_lib.attacks import ddn

    model = tiny_vit()  # in the tiny CNN every Linear input is also saved by the ReLU before it: no difference there
    x, y = data()
    params = list(model.parameters())

    def peak(patched: bool) -> tuple[int, torch.Tensor]:
        meter = SavedTensorMeter(params)
        torch.manual_seed(0)
        with meter.measuring():
            if patched:
                out = ddn(model, x, y, steps=3)
            else:
                with sbpatch.paused():
                    out = ddn(model, x, y, steps=3)
        return meter.peak, out

    live, out_live = peak(False)
    frozen, out_frozen = peak(True)
    assert torch.equal(out_live, out_frozen)
    assert 0 < frozen < live, (frozen, live)
    assert all(p.grad is None for p in params)


def test_visdom_stand_in_lets_adv_lib_import_and_leaves_no_visdom_behind() -> None:
    """In a fresh interpreter without visdom: adv_lib.attacks fails to import as shipped; after enable() it imports
    (the stand-in), `import visdom` still fails elsewhere, and a VisdomLogger says visdom is missing."""
    proc = run_python(
        """
        import importlib.util, sys
        if importlib.util.find_spec("visdom") is not None:
            print("visdom installed: nothing to stand in for"); print("OK"); raise SystemExit
        try:
            import adv_lib.attacks
        except ModuleNotFoundError as exc:
            assert exc.name == "visdom", exc
        else:
            raise AssertionError("adv_lib.attacks imported without visdom")
        import sbpatch
        sbpatch.enable("adv_lib")
        try:
            import visdom  # not adv-lib's import: no stand-in
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("the user's own import of visdom got the stand-in")
        import adv_lib.attacks
        from adv_lib.utils.visdom_logger import VisdomLogger
        from sbpatch.patching import SbpatchWrapper
        assert isinstance(adv_lib.attacks.fmn, SbpatchWrapper)
        assert "visdom" not in sys.modules
        try:
            import visdom
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("the stand-in stayed importable")
        try:
            VisdomLogger(port=1)
        except ModuleNotFoundError as exc:
            assert "visdom is not installed" in str(exc), exc
        else:
            raise AssertionError("VisdomLogger built without visdom")
        st = sbpatch.status()["adv_lib"]
        assert st.shims == ["visdom_stand_in"] and not st.skipped, st

        # disable(): the defining modules get the originals back; names the library bound to the wrapper during its
        # own import (re-exports, superdeepfool's df) keep it, gated off: it calls straight through, unfrozen
        import torch
        import adv_lib.attacks.deepfool as deepfool
        import adv_lib.attacks.superdeepfool as superdeepfool
        sbpatch.disable("adv_lib")
        assert not isinstance(deepfool.df, SbpatchWrapper)
        assert superdeepfool.df.__wrapped__ is deepfool.df
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        states = []
        model.register_forward_pre_hook(lambda m, i: states.append(all(p.requires_grad for p in m.parameters())))
        calls = sbpatch.registry.counters("adv_lib").calls
        adv_lib.attacks.df(model, torch.rand(2, 3, 2, 2), torch.tensor([0, 1]), steps=1)
        assert states and all(states) and sbpatch.registry.counters("adv_lib").calls == calls
        print("OK")
        """,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_enable_after_import_rebinds_the_library_names_and_disable_restores_them() -> None:
    proc = run_python(
        """
        import sys
        from sbpatch import compat
        compat.apply("visdom_stand_in")  # by hand: adv_lib imported before enable() (a no-op if visdom is installed)
        import adv_lib.attacks
        import adv_lib.attacks.deepfool as deepfool
        import adv_lib.attacks.segmentation
        import adv_lib.attacks.superdeepfool as superdeepfool
        import sbpatch
        from sbpatch.patching import SbpatchWrapper

        def names():
            return {(n, k): v for n, m in list(sys.modules.items()) if m is not None and n.startswith("adv_lib")
                    for k, v in vars(m).items()}

        before = names()
        original = deepfool.df
        sbpatch.enable("adv_lib")
        after = names()
        changed = {k for k in before if after[k] is not before[k]}
        assert all(isinstance(after[k], SbpatchWrapper) and after[k].__wrapped__ is before[k] for k in changed)
        assert {("adv_lib.attacks", "df"), ("adv_lib.attacks.superdeepfool", "df"), ("adv_lib.attacks.deepfool", "df"),
                ("adv_lib.attacks.segmentation", "dag"), ("adv_lib.attacks.auto_pgd", "apgd")} <= changed, changed
        assert superdeepfool.df is adv_lib.attacks.df is deepfool.df and deepfool.df.__wrapped__ is original
        patched = set(sbpatch.status()["adv_lib"].patched)
        assert {"adv_lib.attacks.df", "adv_lib.attacks.superdeepfool.df", "adv_lib.attacks.deepfool.df"} <= patched
        sbpatch.disable("adv_lib")
        restored = names()
        assert all(restored[k] is v for k, v in before.items())
        print("OK")
        """,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_model_without_a_module_runs_unpatched_warns_and_is_counted() -> None:
    from adv_lib.attacks import df

    x, y = data()
    weight = torch.randn(3 * 8 * 8, 10, generator=torch.Generator().manual_seed(0))
    locate._warned.discard("adv_lib.attacks.deepfool.df")  # warned once per function and process
    counters = registry.counters("adv_lib")
    calls, unlocated = counters.calls, counters.unlocated
    with pytest.warns(sbpatch.SbpatchWarning, match="no torch.nn.Module found"):
        out = df(lambda t: t.flatten(1) @ weight, x, y, steps=2)
    assert out.shape == x.shape
    assert counters.unlocated == unlocated + 1 and counters.calls == calls
