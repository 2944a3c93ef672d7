"""Numba's on-disk cache in hostile places (``engine/jit_cache.py``), each in a child interpreter.

A read-only install folder with an unwritable home must still import and run (cache in a writable
fallback); an unwritable ``NUMBA_CACHE_DIR`` must run with a warning and no cache; a corrupted
cache file must be recompiled, not be fatal. The read-only cases run on a copy of the package
tree; when the tests run as root (who can write anywhere), the child runs without capabilities
(``setpriv``), so the permission bits bind it as they bind any user. It stays root rather than
becoming ``nobody`` so that it can still read the Python environment, which may sit in a private
folder (a clone in ``mktemp -d``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import HANG_TIMEOUT_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# no CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, now or after exec: root obeys the permission bits
DROP_CAPABILITIES = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]

PROBE = r"""
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import numpy as np
    import engine, numba
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 40, 8)).astype(np.float32) for _ in range(3))
    out = engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    ref = engine.scaled_dot_product_attention(q, k, v, backend="reference")
import importlib, pkgutil
import engine.kernels
from numba.core.dispatcher import Dispatcher
hits = 0
for m in pkgutil.iter_modules(engine.kernels.__path__):
    mod = importlib.import_module("engine.kernels." + m.name)
    hits += sum(sum(d.stats.cache_hits.values()) for d in vars(mod).values() if isinstance(d, Dispatcher))
print(json.dumps({"file": engine.__file__, "cache_hits": hits, "correct": bool(np.allclose(out, ref, atol=2e-5)),
                  "cache_enabled": engine.jit_cache.cache_enabled(), "cache_dir": numba.config.CACHE_DIR,
                  "warnings": [str(w.message) for w in caught if "attention-engine" in str(w.message)]}))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CACHE_DIR", "XDG_CACHE_HOME"))}
    env.update(extra)
    return env


def _run(env, unprivileged=False):
    cmd = [sys.executable, "-c", PROBE]
    if unprivileged:
        cmd = DROP_CAPABILITIES + cmd
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def sandbox():
    """A world-traversable folder with a read-only copy of the package tree, an unwritable home and
    a writable temp folder; yields (folder, run_unprivileged)."""
    root_user = os.geteuid() == 0
    if root_user and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be made real")
    top = tempfile.mkdtemp(prefix="ae-jit-")
    try:
        os.chmod(top, 0o755)
        site = os.path.join(top, "site")
        for pkg in ("engine", "variants"):
            shutil.copytree(os.path.join(ROOT, pkg), os.path.join(site, pkg),
                            ignore=shutil.ignore_patterns("__pycache__"))
        home = os.path.join(top, "home")
        tmp = os.path.join(top, "tmp")
        os.makedirs(home)
        os.makedirs(tmp)
        os.chmod(tmp, 0o777)
        for dirpath, dirnames, filenames in os.walk(site):  # read-only install
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o444)
            os.chmod(dirpath, 0o555)
        os.chmod(home, 0o555)
        yield top, root_user
    finally:
        for dirpath, dirnames, filenames in os.walk(top):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(top, ignore_errors=True)


def test_read_only_install_and_unwritable_home_use_a_writable_fallback(sandbox):
    top, unprivileged = sandbox
    env = _env(PYTHONPATH=os.pathsep.join([os.path.join(top, "site")] + sys.path),
               HOME=os.path.join(top, "home"), TMPDIR=os.path.join(top, "tmp"))
    got = _run(env, unprivileged)
    assert got["file"].startswith(os.path.join(top, "site")), got  # the read-only copy was imported
    assert got["correct"] and got["cache_enabled"], got
    assert got["cache_dir"].startswith(os.path.join(top, "tmp", "attention-engine-numba-")), got
    cached = [n for _, _, files in os.walk(got["cache_dir"]) for n in files if n.endswith(".nbi")]
    assert cached, "the fallback folder holds no cache index"
    again = _run(env, unprivileged)  # the second process loads from the fallback cache
    assert again["correct"] and again["cache_dir"] == got["cache_dir"] and again["cache_hits"] > 0, again


def test_unwritable_cache_dir_runs_without_cache_and_warns(sandbox):
    top, unprivileged = sandbox
    env = _env(PYTHONPATH=os.pathsep.join([os.path.join(top, "site")] + sys.path),
               HOME=os.path.join(top, "home"), TMPDIR=os.path.join(top, "tmp"),
               NUMBA_CACHE_DIR=os.path.join(top, "home", "cache"))
    got = _run(env, unprivileged)
    assert got["correct"] and not got["cache_enabled"], got
    assert any("no writable folder for Numba's cache" in w and "NUMBA_CACHE_DIR" in w
               for w in got["warnings"]), got


@pytest.fixture(scope="module")
def populated_cache(tmp_path_factory):
    """A Numba cache folder filled by one child run (copied by each test that corrupts it)."""
    cache = tmp_path_factory.mktemp("populated") / "cache"
    first = _run(_env(NUMBA_CACHE_DIR=str(cache)))
    assert first["correct"] and first["cache_enabled"]
    return cache


def _copy_cache(populated_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(populated_cache, cache)
    files = [p for p in cache.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert any(p.suffix == ".nbi" for p in files) and any(p.suffix == ".nbc" for p in files)
    return cache, files


def test_corrupted_cache_files_are_recompiled(populated_cache, tmp_path):
    cache, files = _copy_cache(populated_cache, tmp_path)
    for p in files:  # garbage in every index and every compiled blob
        p.write_bytes(b"\x80\x04 not a pickle \x00" * 7)
    env = _env(NUMBA_CACHE_DIR=str(cache))
    assert _run(env)["correct"]
    rewritten = [p for p in cache.rglob("*.nbi") if b"not a pickle" not in p.read_bytes()]
    assert rewritten, "the corrupted index was not replaced by a recompiled one"
    assert _run(env)["correct"]


def test_truncated_cache_blob_is_recompiled(populated_cache, tmp_path):
    cache, files = _copy_cache(populated_cache, tmp_path)
    for p in files:
        if p.suffix == ".nbc":  # a half-written file, as after a crash or a full disk
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])
    assert _run(_env(NUMBA_CACHE_DIR=str(cache)))["correct"]


def test_cache_copied_intact_is_loaded(populated_cache, tmp_path):
    """Control for the two tests above: the same copy, not corrupted, is loaded (cache hits)."""
    cache, _ = _copy_cache(populated_cache, tmp_path)
    got = _run(_env(NUMBA_CACHE_DIR=str(cache)))
    assert got["correct"] and got["cache_hits"] > 0, got
