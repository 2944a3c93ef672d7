"""Plugins: run-time registration, real entry-point discovery, failures named clearly."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import engine
from variants.multi_head import MultiHeadAttention

from conftest import HALVED_PLUGIN, HANG_TIMEOUT_S, make_distribution


class _Scaled(MultiHeadAttention):
    name = "test-scaled"
    description = "multi-head attention whose output is doubled (test plugin)"

    def forward(self, *args, **kwargs):
        out, w = super().forward(*args, **kwargs)
        return out * 2, w


class _ScaledPlugin:
    @engine.hookimpl
    def attention_variants(self):
        return [_Scaled]


def test_builtin_variants_and_backends_are_registered():
    assert {"self", "multi-head", "cross", "masked"} <= set(engine.list_variants())
    assert {"reference", "cpu", "cuda"} <= set(engine.list_backends())


def test_register_and_unregister_at_run_time():
    name = engine.register_plugin(_ScaledPlugin(), name="scaled-plugin")
    try:
        assert name == "scaled-plugin" and "test-scaled" in engine.list_variants()
        v = engine.get_variant("test-scaled", embed_dim=8, num_heads=2, seed=0)
        ref = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=0)
        x = np.ones((1, 3, 8), np.float32)
        np.testing.assert_allclose(v(x)[0], 2 * ref(x)[0], rtol=1e-6)
    finally:
        engine.unregister_plugin("scaled-plugin")
    assert "test-scaled" not in engine.list_variants()
    with pytest.raises(ValueError, match="no plugin registered under 'scaled-plugin'"):
        engine.unregister_plugin("scaled-plugin")


def test_unknown_variant_lists_available_names():
    with pytest.raises(ValueError, match="unknown variant 'nope'; available: " + ", ".join(engine.list_variants())):
        engine.get_variant("nope")


def test_duplicate_variant_name_is_an_error_naming_both_plugins():
    class Dup(MultiHeadAttention):
        name = "multi-head"
        description = "a clash"

    class DupPlugin:
        @engine.hookimpl
        def attention_variants(self):
            return [Dup]

    with pytest.raises(
        engine.PluginError,
        match=r"'multi-head' is offered by both plugin 'variants.multi_head' "
        r"\(distribution 'attention-engine'\) and plugin 'dup'",
    ):
        engine.register_plugin(DupPlugin(), name="dup")
    assert not engine.get_plugin_manager().has_plugin("dup")
    assert type(engine.get_variant("multi-head", embed_dim=8, num_heads=2)) is MultiHeadAttention


def test_malformed_variant_is_refused():
    class NoName(engine.Variant):
        description = "no name"

        def forward(self, *a, **k):
            return None, None

    class Bad:
        @engine.hookimpl
        def attention_variants(self):
            return [NoName]

    with pytest.raises(engine.PluginError, match="does not declare its own non-empty class attribute 'name'"):
        engine.register_plugin(Bad(), name="bad")
    assert not engine.get_plugin_manager().has_plugin("bad")


def test_unknown_hook_is_refused():
    class Typo:
        @engine.hookimpl
        def attention_variantz(self):
            return []

    with pytest.raises(Exception, match="unknown hook 'attention_variantz'"):
        engine.register_plugin(Typo(), name="typo")
    assert not engine.get_plugin_manager().has_plugin("typo")


PROBE = """
import json, sys, warnings
import numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import engine
    names = engine.list_variants()
from engine.cli.listing import collect
x = np.ones((1, 2, 8), np.float32)
out = engine.get_variant("halved", embed_dim=8, num_heads=2, seed=0)(x)[0]
ref = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=0)(x)[0]
print(json.dumps({"names": names, "warnings": [str(w.message) for w in caught],
                  "ratio": float((ref / out).mean()),
                  "listed": [v for v in collect()["variants"] if v["name"] == "halved"]}))
"""


def test_entry_point_discovery_for_real(tmp_path):
    make_distribution(tmp_path, "ae-halved", "ae_halved_plugin", HALVED_PLUGIN, ["halved = ae_halved_plugin"])
    make_distribution(
        tmp_path,
        "ae-broken",
        "ae_broken_plugin",
        "raise RuntimeError('boom at import')\n",
        ["broken = ae_broken_plugin"],
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert "halved" in got["names"] and "multi-head" in got["names"]
    assert got["ratio"] == pytest.approx(2.0, rel=1e-5)
    assert got["listed"] == [
        {
            "name": "halved",
            "description": "multi-head attention, output halved (an installed test plugin)",
            "plugin": "halved",
            "distribution": "ae-halved",
        }
    ]
    assert any(
        "skipping plugin 'broken' from distribution 'ae-broken'" in w and "boom at import" in w for w in got["warnings"]
    ), got["warnings"]


# ---- limiting which installed plugins load (ATTENTION_ENGINE_BLOCK_PLUGINS, ..._DISABLE_PLUGIN_AUTOLOAD)

LIMIT_PROBE = """
import importlib, json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import engine
    from engine.plugins.manager import BUILTIN_PLUGINS
    imported = sorted(m for m in ("ae_kept", "ae_unwanted") if m in sys.modules)  # before any use
    plugins = sorted(n for n, _ in engine.get_plugin_manager().list_name_plugin())
    names = engine.list_variants()
    imported_after_discovery = sorted(m for m in ("ae_kept", "ae_unwanted") if m in sys.modules)
    try:  # a plugin the user imports and registers by hand, under its entry-point name
        engine.register_plugin(importlib.import_module("ae_unwanted"), name="unwanted")
        by_hand = None
    except Exception as exc:
        by_hand = f"{type(exc).__name__}: {exc}"
print(json.dumps({"imported": imported, "imported_after_discovery": imported_after_discovery,
                  "plugins": plugins, "names": names, "by_hand": by_hand,
                  "builtins_registered": all(p in plugins for p in BUILTIN_PLUGINS),
                  "warnings": [str(w.message) for w in caught]}))
"""


@pytest.fixture(scope="module")
def limit_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("limit-site")
    make_distribution(root, "ae-kept", "ae_kept", HALVED_PLUGIN.replace('"halved"', '"kept"'), ["kept = ae_kept"])
    make_distribution(
        root, "ae-unwanted", "ae_unwanted", HALVED_PLUGIN.replace('"halved"', '"unwanted"'), ["unwanted = ae_unwanted"]
    )

    def run(**env_extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATTENTION_ENGINE_")}
        env.update(PYTHONPATH=os.pathsep.join([str(root)] + sys.path), **env_extra)
        res = subprocess.run([sys.executable, "-c", LIMIT_PROBE], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    return run


def test_every_installed_plugin_loads_by_default(limit_site):
    """Control for the two tests below."""
    got = limit_site()
    assert got["imported"] == [], "entry points were imported at `import engine`"
    assert got["imported_after_discovery"] == ["ae_kept", "ae_unwanted"], got
    assert {"kept", "unwanted"} <= set(got["names"]) and got["builtins_registered"], got


def test_blocked_plugin_is_never_imported(limit_site):
    got = limit_site(ATTENTION_ENGINE_BLOCK_PLUGINS=" unwanted, ,not-installed ")
    assert got["imported_after_discovery"] == ["ae_kept"], "the blocked plugin's module was imported"
    assert "kept" in got["names"] and "unwanted" not in got["names"] and got["builtins_registered"], got
    assert got["by_hand"] is not None and got["by_hand"].startswith("PluginError: ")
    assert "'unwanted' is blocked" in got["by_hand"] and "ATTENTION_ENGINE_BLOCK_PLUGINS" in got["by_hand"]
    assert not [w for w in got["warnings"] if "attention-engine" in w], got["warnings"]


def test_autoload_disabled_loads_no_entry_point(limit_site):
    got = limit_site(ATTENTION_ENGINE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert got["imported_after_discovery"] == [], "an entry point was imported"
    assert not {"kept", "unwanted"} & set(got["names"]) and got["builtins_registered"], got
    assert got["by_hand"] is None, got  # registering a plugin yourself is the way to opt in
