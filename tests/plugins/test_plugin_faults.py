"""Plugin faults: real throw-away distributions (a ``*.dist-info`` with ``METADATA`` and
``entry_points.txt``, plus a module) on ``sys.path`` of a child interpreter, all installed at once.

Each fault must give a warning or error naming the plugin and its distribution, and every other
plugin (the built-ins and a good third-party one) must keep working. A child process gets a fresh
``importlib.metadata`` view and a fresh plugin manager, so nothing leaks into this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import engine

from conftest import HALVED_PLUGIN, HANG_TIMEOUT_S, make_distribution

GOOD = HALVED_PLUGIN.replace("an installed test plugin", "a good installed plugin")

HOOK_RAISES = """
    import engine

    @engine.hookimpl
    def attention_variants():
        raise KeyError("hook exploded")
"""

NO_INTERFACE = """
    import engine

    class NoForward(engine.Variant):
        name = "no-forward"
        description = "forgets forward()"

    class NoName(engine.Variant):
        description = "forgets its name"

        def forward(self, *a, **k):
            return None, None

    class NotAVariant:
        name = "not-a-variant"
        description = "does not subclass engine.Variant"

    @engine.hookimpl
    def attention_variants():
        return [NoForward, NoName, NotAVariant]
"""

TWIN = """
    import engine
    from variants.multi_head import MultiHeadAttention

    class Twin(MultiHeadAttention):
        name = "twin"
        description = "offered by two distributions"

    @engine.hookimpl
    def attention_variants():
        return [Twin]
"""

TYPO_HOOK = """
    import engine

    @engine.hookimpl
    def attention_variantz():
        return []
"""

# (distribution, module, source, entry-point lines)
DISTRIBUTIONS = [
    ("ae-good", "ae_good", GOOD, ["halved = ae_good"]),
    (
        "ae-import-fails",
        "ae_import_fails",
        "raise RuntimeError('boom at import')\n",
        ["import-fails = ae_import_fails"],
    ),
    ("ae-missing-module", "ae_unused", "", ["missing-module = ae_no_such_module"]),
    ("ae-hook-raises", "ae_hook_raises", HOOK_RAISES, ["hook-raises = ae_hook_raises"]),
    ("ae-no-interface", "ae_no_interface", NO_INTERFACE, ["no-interface = ae_no_interface"]),
    ("ae-twin-a", "ae_twin_a", TWIN, ["twin-a = ae_twin_a"]),
    ("ae-twin-b", "ae_twin_b", TWIN, ["twin-b = ae_twin_b"]),
    ("ae-typo-hook", "ae_typo_hook", TYPO_HOOK, ["typo-hook = ae_typo_hook"]),
    # the same plugin module registered twice: under a second name in a second distribution
    ("ae-twice", "ae_twice", GOOD.replace('"halved"', '"twice"'), ["twice = ae_twice"]),
    ("ae-twice-again", "ae_unused2", "", ["twice-again = ae_twice"]),
    # two distributions using the same entry-point name for two different modules
    ("ae-clash-1", "ae_clash_1", GOOD.replace('"halved"', '"clash-1"'), ["clash = ae_clash_1"]),
    ("ae-clash-2", "ae_clash_2", GOOD.replace('"halved"', '"clash-2"'), ["clash = ae_clash_2"]),
]

PROBE = r"""
import json, sys, warnings
import numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import engine
    names = engine.list_variants()
    plugins = sorted(n for n, _ in engine.get_plugin_manager().list_name_plugin())
result = {"names": names, "plugins": plugins, "warnings": [str(w.message) for w in caught]}
x = np.ones((1, 3, 8), np.float32)
ref = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=0)(x)[0]
result["halved_ratio"] = float((ref / engine.get_variant("halved", embed_dim=8, num_heads=2, seed=0)(x)[0]).mean())
for name in ("cross", "masked", "self"):
    sized = {"embed_dim": 8} if name == "self" else {"embed_dim": 8, "num_heads": 2}
    cls = type(engine.get_variant(name, **sized))
    v = engine.get_variant(name, **cls.example_params(8, 2), seed=0)
    out = v(**v.example_inputs(1, 4, rng=0))[0]
    result[f"{name}_finite"] = bool(np.isfinite(out).all())
try:
    engine.get_variant("twin", embed_dim=8, num_heads=2)
    result["twin_error"] = None
except Exception as exc:
    result["twin_error"] = f"{type(exc).__name__}: {exc}"
try:
    engine.register_plugin(sys.modules["ae_good"], name="halved-by-hand")
    result["register_twice_error"] = None
except Exception as exc:
    result["register_twice_error"] = f"{type(exc).__name__}: {exc}"
from engine.cli.listing import collect
info = collect()
result["listed_halved"] = [v for v in info["variants"] if v["name"] == "halved"]
result["listed_conflicts"] = info["conflicts"]
from engine.cli import main
import io, contextlib
buf = io.StringIO()
with contextlib.redirect_stdout(buf), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    result["cli_rc"] = main(["list"])
result["cli_out"] = buf.getvalue()
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    for dist, module, source, eps in DISTRIBUTIONS:
        make_distribution(root, dist, module, source, eps)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + sys.path))
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _warned(probe, *words):
    return any(all(w in msg for w in words) for msg in probe["warnings"])


def test_other_plugins_keep_working(probe):
    assert probe["halved_ratio"] == pytest.approx(2.0, rel=1e-5)
    assert {"halved", "multi-head", "cross", "masked", "self"} <= set(probe["names"])
    assert probe["cross_finite"] and probe["masked_finite"] and probe["self_finite"]
    assert probe["listed_halved"] == [
        {
            "name": "halved",
            "description": "multi-head attention, output halved (a good installed plugin)",
            "plugin": "halved",
            "distribution": "ae-good",
        }
    ]
    assert probe["cli_rc"] == 0 and "halved" in probe["cli_out"]


def test_entry_point_whose_module_raises_on_import(probe):
    assert _warned(
        probe,
        "skipping plugin 'import-fails' from distribution 'ae-import-fails'",
        "failed to import",
        "RuntimeError: boom at import",
    ), probe["warnings"]
    assert "import-fails" not in probe["plugins"]


def test_entry_point_whose_module_does_not_exist(probe):
    assert _warned(
        probe,
        "skipping plugin 'missing-module' from distribution 'ae-missing-module'",
        "ModuleNotFoundError",
        "ae_no_such_module",
    ), probe["warnings"]


def test_plugin_whose_hook_raises(probe):
    assert _warned(
        probe,
        "plugin 'hook-raises' (distribution 'ae-hook-raises')",
        "hook attention_variants raised KeyError",
        "hook exploded",
    ), probe["warnings"]


@pytest.mark.parametrize(
    "what",
    [
        "does not implement forward()",
        "does not declare its own non-empty class attribute 'name'",
        "is not a subclass of engine.Variant",
    ],
)
def test_variant_class_missing_the_interface(probe, what):
    assert _warned(probe, "plugin 'no-interface' (distribution 'ae-no-interface')", what), probe["warnings"]
    assert not {"no-forward", "not-a-variant"} & set(probe["names"])


def test_two_plugins_with_the_same_variant_name(probe):
    both = ("plugin 'twin-a' (distribution 'ae-twin-a')", "plugin 'twin-b' (distribution 'ae-twin-b')")
    assert _warned(probe, "variant name 'twin' is offered by both", *both), probe["warnings"]
    assert probe["twin_error"] is not None and probe["twin_error"].startswith("PluginError: ")
    assert all(b in probe["twin_error"] for b in both), probe["twin_error"]
    assert "twin" not in probe["names"]
    assert sorted(c["distribution"] for c in probe["listed_conflicts"]["twin"]) == ["ae-twin-a", "ae-twin-b"]
    assert "CONFLICT: 'twin'" in probe["cli_out"]


def test_plugin_with_an_unknown_hook(probe):
    assert _warned(probe, "skipping plugin 'typo-hook' (distribution 'ae-typo-hook')", "attention_variantz"), probe[
        "warnings"
    ]
    assert "typo-hook" not in probe["plugins"]


def test_same_plugin_module_under_two_entry_points_is_registered_once(probe):
    assert len({"twice", "twice-again"} & set(probe["plugins"])) == 1, probe["plugins"]
    assert "twice" in probe["names"] and "twice" not in probe["listed_conflicts"]


def test_plugin_registered_twice_at_run_time_is_an_error(probe):
    err = probe["register_twice_error"]
    assert err is not None and err.startswith("PluginError: cannot register plugin 'halved-by-hand'"), err
    assert "already registered" in err, err


def test_entry_point_name_taken_by_another_distribution_is_named(probe):
    """Both load, or the one left out is named with both distributions."""
    loaded = {"clash-1", "clash-2"} <= set(probe["names"])
    assert loaded or _warned(probe, "'clash'", "ae-clash-1", "ae-clash-2"), probe["warnings"]


def test_plugin_registered_twice_in_this_process():
    class Plugin:
        @engine.hookimpl
        def attention_variants(self):
            return []

    p = Plugin()
    name = engine.register_plugin(p, name="fault-twice")
    try:
        with pytest.raises(engine.PluginError, match=r"cannot register plugin 'fault-twice-2'.*already registered"):
            engine.register_plugin(p, name="fault-twice-2")
        with pytest.raises(engine.PluginError, match=r"cannot register plugin 'fault-twice'"):
            engine.register_plugin(Plugin(), name="fault-twice")
    finally:
        engine.unregister_plugin(name)
    x = np.ones((1, 2, 8), np.float32)
    assert np.isfinite(engine.get_variant("multi-head", embed_dim=8, num_heads=2)(x)[0]).all()
