"""Start-up costs nothing: SBPATCH=all imports no torch/numpy/scipy, off values import no sbpatch, and the shims
wait for an import hook on the library that needs them (fresh interpreters; the installed sbpatch.pth)."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import pytest
from helpers import run_python

from sbpatch import config, registry

ROOT = Path(__file__).parent.parent
HEAVY = (
    "torch",
    "numpy",
    "scipy",
    "transformers",
    "torchattacks",
    "art",
    "foolbox",
    "advertorch",
    "deeprobust",
    "cleverhans",
    "OpenAttack",
    "textattack",
)
LOADED = f"import sys; print(sorted(m for m in {('sbpatch', *HEAVY)!r} if m in sys.modules))"


def pth_off_values(text: str) -> set[str]:
    """The tuple of off values written in the one-line sbpatch.pth."""
    tuples = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Tuple)]
    assert len(tuples) == 1, text
    return {ast.literal_eval(e) for e in tuples[0].elts}


def test_pth_off_values_are_config_off_values_and_installed_copy_is_current():
    repo = (ROOT / "sbpatch.pth").read_text()
    assert pth_off_values(repo) == set(config.OFF_VALUES)
    installed = Path(sysconfig.get_paths()["purelib"]) / "sbpatch.pth"
    assert installed.read_text() == repo, "reinstall: python -m pip install --no-deps --force-reinstall ."


def test_sbpatch_all_imports_nothing_heavy_and_waits_for_the_libraries():
    out = run_python(
        LOADED
        + """
from sbpatch import compat, registry
print(sorted(n for n in registry.INTEGRATIONS if registry.counters(n).enabled))
print(sorted(compat.pending()))
""",
        env={"SBPATCH": "all"},
    )
    lines = out.stdout.splitlines()
    assert lines[0] == "['sbpatch']", out.stderr  # imported by the start-up hook, and nothing heavy
    assert lines[1] == str(sorted(registry.INTEGRATIONS))  # every library enabled, none imported
    assert lines[2] == "['advertorch', 'deeprobust', 'foolbox']", out.stderr
    assert out.stderr == ""


@pytest.mark.parametrize("value", ["", "0", "false", "FALSE", " none ", "no", "Off"])
def test_off_values_do_not_import_sbpatch(value: str):
    out = run_python(LOADED, env={"SBPATCH": value})
    assert out.stdout.strip() == "[]", out.stderr
    assert out.stderr == ""


def test_unset_imports_nothing():
    out = run_python(LOADED)
    assert out.stdout.strip() == "[]", out.stderr


def test_enable_imports_neither_torch_numpy_nor_scipy():
    out = run_python(
        "import sbpatch; sbpatch.enable(); sbpatch.status(); sbpatch.disable(); sbpatch.enable('all')\n" + LOADED
    )
    assert out.stdout.strip() == "['sbpatch']", out.stderr


def test_thread_count_set_after_startup_takes_effect():
    code = "import os; os.environ['OMP_NUM_THREADS'] = '2'; import torch; print(torch.get_num_threads())"
    out = run_python(code, env={"SBPATCH": "all", "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "2", out.stderr


def test_sbpatch_all_shims_and_patches_the_libraries_when_imported():
    out = run_python(
        """
        import os
        os.environ.pop("GIT_PYTHON_REFRESH", None)  # set by the tests' conftest; the foolbox shim sets it if unset
        import advertorch.attacks, foolbox, deeprobust.image.attack.pgd
        import sbpatch
        from sbpatch import compat
        from sbpatch.patching import SbpatchWrapper
        from advertorch.attacks import PGDAttack
        from deeprobust.image.attack.pgd import PGD
        from foolbox.attacks.base import FixedEpsilonAttack
        st = sbpatch.status()
        print({n: st[n].shims for n in ("advertorch", "deeprobust", "foolbox")})
        print(isinstance(PGDAttack.__dict__["perturb"], SbpatchWrapper), isinstance(PGD.__dict__["generate"],
              SbpatchWrapper), isinstance(FixedEpsilonAttack.__dict__["__call__"], SbpatchWrapper))
        print(compat.pending(), compat.errors(), type(advertorch.__loader__).__name__)
        """,
        env={"SBPATCH": "all"},
    )
    lines = out.stdout.splitlines()
    assert lines[0] == str(
        {"advertorch": ["torch_zero_gradients"], "deeprobust": ["scipy_status_message"], "foolbox": ["gitpython_quiet"]}
    ), out.stderr
    assert lines[1:] == ["True True True", "[] {} SourceFileLoader"], out.stderr


def test_shims_run_before_the_import_not_when_probed_and_never_after_disable():
    out = run_python(
        """
        import importlib.util, sys
        import sbpatch
        from sbpatch import compat
        sbpatch.enable("advertorch")
        assert importlib.util.find_spec("advertorch") is not None  # a probe is not an import
        print(compat.pending(), "torch" in sys.modules)
        sbpatch.disable("advertorch")  # as shipped again: the shim is not applied, advertorch fails to import
        try:
            import advertorch
        except ImportError as exc:
            print("FAILED", "zero_gradients" in str(exc))
        sbpatch.enable("advertorch")  # the failed import was not cached: it works now
        import advertorch.attacks
        print(sbpatch.status()["advertorch"].shims, len(sbpatch.status()["advertorch"].patched) > 10)
        """
    )
    assert out.stdout.splitlines() == [
        "['advertorch'] False",
        "FAILED True",
        "['torch_zero_gradients'] True",
    ], out.stderr


def test_library_imported_before_enable_gets_its_shim_at_once():
    """deeprobust's top-level package imports fine; its attacks need the shim: enable() applies it at once."""
    out = run_python(
        """
        import deeprobust, sbpatch
        sbpatch.enable("deeprobust")
        from deeprobust.image.attack.pgd import PGD
        from sbpatch.patching import SbpatchWrapper
        print(sbpatch.status()["deeprobust"].shims, isinstance(PGD.__dict__["generate"], SbpatchWrapper))
        """
    )
    assert out.stdout.strip() == "['scipy_status_message'] True", out.stderr


def test_import_hook_never_raises_into_the_import(tmp_path: Path):
    (tmp_path / "shimmed_pkg").mkdir()
    (tmp_path / "shimmed_pkg" / "__init__.py").write_text("import os\nVALUE = os.environ.get('SHIM_RAN')\n")
    out = run_python(
        f"""
        import os, sys, warnings
        sys.path.insert(0, {str(tmp_path)!r})
        from sbpatch import compat
        def shim():
            os.environ["SHIM_RAN"] = "yes"
            raise RuntimeError("shim bug")
        compat.before_import("shimmed_pkg", shim)
        compat.before_import("not_installed_pkg", shim)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import shimmed_pkg
            import shimmed_pkg.__init__ as again  # a submodule import: the hook has stepped aside
            try:
                import not_installed_pkg
            except ModuleNotFoundError:
                print("MISSING")
        print(shimmed_pkg.VALUE, compat.errors(), compat.pending())
        print(len(caught), "shim bug" in str(caught[0].message))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "MISSING",
        "yes {'shimmed_pkg': 'RuntimeError: shim bug'} ['not_installed_pkg']",
        "1 True",
    ], out.stderr
