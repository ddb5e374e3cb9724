"""Start-up costs nothing: SBPATCH=all imports only sbpatch's tiny start-up modules (no wrapt, packaging, torch, numpy,
scipy) and enables when a library is first imported; off values import no sbpatch; the shims wait for an import hook
on the library that needs them (fresh interpreters; the installed sbpatch.pth)."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import pytest
from helpers import run_python

from sbpatch import _startup, config, registry

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


# What SBPATCH=all may import at start-up beyond a bare interpreter (the .pth's import, and nothing else).
STARTUP_MODULES = ["__future__", "sbpatch", "sbpatch._startup", "sbpatch.compat", "sbpatch.config", "sbpatch.errors"]
MODULES = "import sys; print(sorted(sys.modules))"


def test_startup_names_match_the_registry():
    """_startup.LIBRARIES repeats each contrib module's import name (importing the registry is what it avoids)."""
    assert list(_startup.LIBRARIES) == list(registry.INTEGRATIONS)
    for name, module in _startup.LIBRARIES.items():
        integration = registry.integration(name)
        assert integration.module == module, name
        # the enabling runs while the top-level module executes: no target may live in that module itself
        assert all(t.module.startswith(module + ".") for t in integration.targets), name


def test_sbpatch_all_start_up_imports_only_the_tiny_modules():
    code = (
        MODULES
        + """
import sys
heavy = ("wrapt", "packaging", "asyncio", "logging", "typing", "threading", "importlib.util", "importlib.metadata")
print([m for m in heavy if m in sys.modules])
print(sorted(sys.modules["sbpatch.compat"].pending()))
"""
    )
    unset = run_python(code)
    out = run_python(code, env={"SBPATCH": "all"})
    lines = out.stdout.splitlines()
    new = sorted(set(ast.literal_eval(lines[0])) - set(ast.literal_eval(unset.stdout.splitlines()[0])))
    assert new == STARTUP_MODULES, out.stderr
    assert lines[1] == "[]", out.stderr  # neither wrapt (asyncio) nor packaging: nor any heavier stdlib module
    assert lines[2] == str(sorted(_startup.LIBRARIES.values())), out.stderr  # every library watched
    assert out.stderr == ""


def test_sbpatch_all_enables_when_a_library_is_first_imported_not_when_probed():
    out = run_python(
        """
        import importlib.util, sys
        assert importlib.util.find_spec("torchattacks") is not None  # a probe is not an import
        print("sbpatch.registry" in sys.modules, "torchattacks" in sys.modules)
        import torchattacks  # the first watched import: sbpatch is enabled before torchattacks executes
        from torchattacks.attack import Attack
        from sbpatch import compat, registry
        from sbpatch.patching import SbpatchWrapper
        print(isinstance(Attack.__dict__["__call__"], SbpatchWrapper))
        print(all(registry.counters(n).enabled for n in registry.INTEGRATIONS))
        print(sorted(compat.pending()))  # the start-up watches are gone: only the shims wait for their libraries
        import advertorch.attacks  # fails to import without its shim
        from advertorch.attacks import PGDAttack
        print(registry.status()["advertorch"].shims, isinstance(PGDAttack.__dict__["perturb"], SbpatchWrapper))
        """,
        env={"SBPATCH": "all"},
    )
    assert out.stdout.splitlines() == [
        "False False",
        "True",
        "True",
        "['adv_lib', 'advertorch', 'deeprobust', 'foolbox']",
        "['torch_zero_gradients'] True",
    ], out.stderr
    assert out.stderr == ""


def test_sbpatch_named_library_watches_only_that_one():
    out = run_python(
        """
        import sys
        import cleverhans  # not named: sbpatch stays asleep
        print("sbpatch.registry" in sys.modules)
        import torchattacks
        from sbpatch import registry
        print(sorted(n for n in registry.INTEGRATIONS if registry.counters(n).enabled))
        """,
        env={"SBPATCH": "TorchAttacks"},
    )
    assert out.stdout.splitlines() == ["False", "['torchattacks']"], out.stderr
    assert out.stderr == ""


def test_lazy_package_exports_every_public_name():
    out = run_python(
        """
        import sys
        import sbpatch
        print(sorted(m for m in sys.modules if m.startswith("sbpatch")))
        from sbpatch import ConfigError, frozen, paused
        from sbpatch.verify import identical  # binds the submodule on the package: sbpatch.verify stays the function
        print(callable(sbpatch.verify), sbpatch.verify.__module__, set(sbpatch.__all__) <= set(dir(sbpatch)))
        print(all(getattr(sbpatch, n) is not None for n in sbpatch.__all__), sbpatch.errors.ConfigError is ConfigError)
        print(sbpatch.freeze.kept_live() == {}, sbpatch.registry.status is sbpatch.status)  # as an eager import bound
        try:
            sbpatch.nosuch
        except AttributeError as exc:
            print(exc)
        """
    )
    assert out.stdout.splitlines() == [
        "['sbpatch']",
        "True sbpatch.verify True",
        "True True",
        "True True",
        "module 'sbpatch' has no attribute 'nosuch'",
    ], out.stderr


def test_sbpatch_all_imports_nothing_heavy_and_waits_for_the_libraries():
    """The registry's first use enables what SBPATCH names, as if at start-up; the libraries are not imported."""
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
    assert lines[1] == str(sorted(registry.INTEGRATIONS))  # every library enabled by the registry's import
    assert lines[2] == "['adv_lib', 'advertorch', 'deeprobust', 'foolbox']", out.stderr
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
    assert lines[1:] == ["True True True", "['adv_lib'] {} SourceFileLoader"], out.stderr


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
