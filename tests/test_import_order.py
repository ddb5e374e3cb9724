"""Enabling in every order, in fresh interpreters: before/after import, SBPATCH, `sbpatch run`, disable, twice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import run_python

import sbpatch
from sbpatch import config, registry
from sbpatch.errors import ConfigError

CHECK = """
import torch
from torchattacks.attack import Attack
from sbpatch.patching import SbpatchWrapper
wrapped = isinstance(Attack.__dict__["__call__"], SbpatchWrapper)
print("WRAPPED" if wrapped else "PLAIN")
"""


run_py = run_python


def test_enable_then_import():
    out = run_py("import sbpatch; sbpatch.enable('torchattacks')\n" + CHECK)
    assert out.returncode == 0, out.stderr
    assert "WRAPPED" in out.stdout


def test_import_then_enable():
    out = run_py("import torchattacks, sbpatch; sbpatch.enable()\n" + CHECK)
    assert "WRAPPED" in out.stdout, out.stderr


def test_disable_restores_identity_and_later_imports_patch_nothing():
    out = run_py(
        """
        import sbpatch
        sbpatch.enable()
        sbpatch.disable()
        import torchattacks  # imported after disable: the registered hook must do nothing
        from torchattacks.attack import Attack
        original = Attack.__dict__["__call__"]
        assert not sbpatch.status()["torchattacks"].patched
        sbpatch.enable("torchattacks")
        assert Attack.__dict__["__call__"] is not original
        sbpatch.disable("torchattacks")
        assert Attack.__dict__["__call__"] is original
        assert sbpatch.status()["torchattacks"].enabled is False
        sbpatch.enable("torchattacks")
        assert Attack.__dict__["__call__"] is not original
        print("OK")
        """
    )
    assert out.stdout.strip() == "OK", out.stderr


def test_enable_twice_wraps_once():
    out = run_py(
        """
        import sbpatch, torchattacks
        from torchattacks.attack import Attack
        from sbpatch.patching import SbpatchWrapper
        sbpatch.enable(); sbpatch.enable("torchattacks"); sbpatch.enable()
        w = Attack.__dict__["__call__"]
        assert isinstance(w, SbpatchWrapper) and not isinstance(w.__wrapped__, SbpatchWrapper)
        print(len(sbpatch.status()["torchattacks"].patched))
        """
    )
    assert out.stdout.strip() == "1", out.stderr


def test_unknown_name_names_valid_choices():
    out = run_py(
        """
        import sbpatch
        try:
            sbpatch.enable("torchatacks")
        except sbpatch.ConfigError as exc:
            assert isinstance(exc, ValueError) and isinstance(exc, sbpatch.SbpatchError)
            print(exc)
        """
    )
    assert "torchatacks" in out.stdout and "torchattacks, art, foolbox" in out.stdout, out.stderr


def test_enable_and_disable_speak_the_env_var_vocabulary():
    out = run_py(
        """
        import sbpatch
        from sbpatch import registry
        def on():
            return sorted(n for n in registry.INTEGRATIONS if registry.counters(n).enabled)
        sbpatch.enable(["Art"]); print(on())
        sbpatch.enable(("foolbox", "ADVERTORCH")); print(on())
        sbpatch.disable("ALL"); print(on())
        sbpatch.enable("TorchAttacks, cleverhans"); print(on())
        sbpatch.disable(["torchattacks"]); print(on())
        sbpatch.enable("all"); print(len(on()))
        """
    )
    assert out.stdout.splitlines() == [
        "['art']",
        "['advertorch', 'art', 'foolbox']",
        "[]",
        "['cleverhans', 'torchattacks']",
        "['cleverhans']",
        str(len(registry.INTEGRATIONS)),
    ], out.stderr


@pytest.mark.parametrize(
    "args, error",
    [
        ((5,), TypeError),
        ((["art", 3],), TypeError),
        ((b"art",), TypeError),
        (({"art": 1},), TypeError),
        ((None,), TypeError),
        (("nosuch",), ConfigError),
        ((["art", "nosuch"],), ConfigError),
        (([],), ConfigError),
        ((" , ",), ConfigError),
    ],
)
def test_bad_names_raise_naming_the_valid_choices(args: tuple, error: type):
    for fn in (sbpatch.enable, sbpatch.disable, registry.check_names):  # validated before any state changes
        with pytest.raises(error) as info:
            fn(*args) if fn is not registry.check_names else fn(list(args))
        assert "'all' or any of: torchattacks, art, foolbox" in str(info.value)


def test_check_names_normalises():
    assert registry.check_names(["ART", "art", " Foolbox"]) == ["art", "foolbox"]
    assert registry.check_names(["all"]) == list(registry.INTEGRATIONS)
    assert registry.check_names([("cleverhans", "Art")]) == ["cleverhans", "art"]


def test_unsupported_version_raises_when_named_and_warns_once_otherwise():
    out = run_py(
        """
        import dataclasses, warnings
        import sbpatch
        from sbpatch import registry
        state = registry._state("torchattacks")
        state.integration = dataclasses.replace(state.integration, supported="<1")
        try:
            sbpatch.enable("torchattacks")
        except sbpatch.DidNotEnable as exc:
            print("RAISED", exc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sbpatch.enable()
            sbpatch.enable()
        mine = [w for w in caught if w.category is sbpatch.SbpatchWarning and "torchattacks" in str(w.message)]
        print("WARNINGS", len(mine))
        s = sbpatch.status()["torchattacks"]
        print("ENABLED", s.enabled, "NOTE", s.note)
        """
    )
    assert "RAISED torchattacks 3.5.1 is outside the supported range <1" in out.stdout, out.stderr
    assert "WARNINGS 1" in out.stdout
    assert "ENABLED False NOTE torchattacks 3.5.1 is outside" in out.stdout


DEMO = """
from sbpatch.patching import Integration, Target

def locate(wrapped, instance, args, kwargs):
    raise RuntimeError("locator bug")

INTEGRATION = Integration(
    name="demo", distribution="packaging", module="xml", supported=">=0",
    targets=(
        Target("xml.dom.minidom", "Document.no_such_method", locate),
        Target("xml.dom.minidom", "parseString", locate),
    ),
)
"""


def test_hook_never_raises_and_moved_target_is_skipped(tmp_path: Path):
    (tmp_path / "demo_contrib.py").write_text(DEMO)
    out = run_py(
        f"""
        import sys, warnings
        sys.path.insert(0, {str(tmp_path)!r})
        import sbpatch
        from sbpatch import registry
        registry.INTEGRATIONS["demo"] = "demo_contrib"
        warnings.simplefilter("always")
        sbpatch.enable("demo")
        import xml.dom.minidom  # the hook fires here: one target moved, one fine
        doc = xml.dom.minidom.parseString("<a/>")  # the locator raises: the call still runs, unpatched
        s = sbpatch.status()["demo"]
        print("SKIPPED", list(s.skipped))
        print("PATCHED", s.patched)
        print("UNLOCATED", s.unlocated, doc.documentElement.tagName)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "SKIPPED ['xml.dom.minidom.Document.no_such_method']" in out.stdout
    assert "PATCHED ['xml.dom.minidom.parseString']" in out.stdout
    assert "UNLOCATED 1 a" in out.stdout
    assert out.stderr.count("skipping xml.dom.minidom.Document.no_such_method") == 1


# --- start-up enabling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["all", "1", "true", "torchattacks", "art,torchattacks"])
def test_env_var_enables(value: str):
    out = run_py(CHECK, env={"SBPATCH": value})
    assert "WRAPPED" in out.stdout, out.stderr


@pytest.mark.parametrize("value", ["", "0", "false", "none", "art"])
def test_env_var_off_or_other_library(value: str):
    out = run_py(CHECK, env={"SBPATCH": value})
    assert "PLAIN" in out.stdout, out.stderr
    assert out.stderr == ""


def test_bad_env_value_prints_one_line_and_runs():
    out = run_py(CHECK, env={"SBPATCH": "torchatacks"})
    assert out.returncode == 0
    assert "PLAIN" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "torchatacks" in lines[0] and "torchattacks, art" in lines[0], out.stderr


def test_env_var_library_that_cannot_be_enabled_leaves_the_others_enabled():
    out = run_py(
        """
        import dataclasses, os
        from sbpatch import registry
        state = registry._state("cleverhans")
        state.integration = dataclasses.replace(state.integration, supported="<1")
        os.environ["SBPATCH"] = "cleverhans,torchattacks"
        import sbpatch._startup  # what sbpatch.pth does at interpreter start when SBPATCH is set
        print(registry.counters("torchattacks").enabled, registry.counters("cleverhans").enabled)
        """
    )
    assert out.stdout.strip() == "True False", out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "SBPATCH: cleverhans 4.0.0 is outside the supported range <1" in lines[0], out.stderr


def test_unset_env_imports_nothing():
    out = run_py("import sys; print(sorted(m for m in ('sbpatch', 'torch', 'torchattacks') if m in sys.modules))")
    assert out.stdout.strip() == "[]", out.stderr


def test_startup_hook_is_installed():
    out = run_py("import sys; print('sbpatch._startup' in sys.modules)", env={"SBPATCH": "art"})
    assert out.stdout.strip() == "True", "sbpatch.pth is not in site-packages: install the project non-editable"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("TorchAttacks", ["torchattacks"]),
        (" ART , torchattacks ", ["art", "torchattacks"]),
        ("all,art", []),
        ("ALL", []),
        ("True", []),
        (" Yes ", []),
        ("on", []),
        ("None", None),
        ("no", None),
        ("OFF", None),
        ("", None),
        (None, None),
    ],
)
def test_env_var_vocabulary(value: str | None, expected: list[str] | None):
    assert config.parse_libraries(value, list(registry.INTEGRATIONS)) == expected


def test_bad_env_value_message_lists_every_accepted_value():
    """The message names each on-value and off-value exactly as the parser takes them (and each is taken)."""
    valid = list(registry.INTEGRATIONS)
    with pytest.raises(ConfigError) as exc:
        config.parse_libraries("bogus", valid)
    message = str(exc.value)
    assert "invalid SBPATCH='bogus'" in message
    on, off = message.split(": use ", 1)[1].split("; ")[:2]
    assert on == f"{', '.join(config.ALL_VALUES)} (every library)" == "all, 1, true, yes, on (every library)"
    assert off == "unset, empty, 0, false, no, off, none (nothing)"
    assert all(config.parse_libraries(v, valid) == [] for v in config.ALL_VALUES)
    assert all(config.parse_libraries(v, valid) is None for v in config.OFF_VALUES)
    assert "comma-separated list of: " + ", ".join(valid) in message


def test_readme_documents_every_accepted_value():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("| `SBPATCH=` |"):]
    on = next(line for line in table.splitlines() if "enable every supported library" in line)
    off = next(line for line in table.splitlines() if "nothing: sbpatch is not even imported" in line)
    assert all(f"`{v}`" in on for v in config.ALL_VALUES), on
    assert all(f"`{v}`" in off for v in config.OFF_VALUES if v) and "unset, empty" in off, off


def test_env_var_names_are_case_insensitive():
    on = "from sbpatch import registry; print(sorted(n for n in registry.INTEGRATIONS if registry.counters(n).enabled))"
    out = run_py(on, env={"SBPATCH": " TorchAttacks,ART "})
    assert out.stdout.strip() == "['art', 'torchattacks']" and out.stderr == "", out.stderr


SCRIPT = """
import sys
from torchattacks.attack import Attack
from sbpatch.patching import SbpatchWrapper
print(__name__, sys.argv[1:], isinstance(Attack.__dict__["__call__"], SbpatchWrapper))
"""


def test_sbpatch_run_script_module_and_command(tmp_path: Path):
    script = tmp_path / "attack_script.py"
    script.write_text(SCRIPT)
    out = run_py("", args=["-m", "sbpatch", "run", str(script), "--flag", "x"])
    assert out.stdout.strip() == "__main__ ['--flag', 'x'] True", out.stderr
    out = run_py("", args=["-m", "sbpatch", "run", "--libraries", "art", str(script)])
    assert out.stdout.strip() == "__main__ [] False", out.stderr
    env = {"PYTHONPATH": str(tmp_path)}
    out = run_py("", env=env, args=["-m", "sbpatch", "run", "--libraries", "torchattacks", "-m", "attack_script", "a"])
    assert out.stdout.strip() == "__main__ ['a'] True", out.stderr
    out = run_py("", args=["-m", "sbpatch", "run", sys.executable, str(script), "b"])
    assert out.stdout.strip() == "__main__ ['b'] True", out.stderr
