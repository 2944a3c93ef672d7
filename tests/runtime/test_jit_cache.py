"""Numba's on-disk cache in hostile places (``engine/runtime/jit_cache.py``), each in a child interpreter.

A read-only install folder with an unwritable home must still import and run (cache in a writable
fallback); an unwritable ``NUMBA_CACHE_DIR`` must run with a warning and no cache; a corrupted
cache file must be recompiled, not be fatal. The read-only cases run on a copy of the package
tree; when the tests run as root (who can write anywhere), the child runs without capabilities
(``setpriv``), so the permission bits bind it as they bind any user. It stays root rather than
becoming ``nobody`` so that it can still read the Python environment, which may sit in a private
folder (a clone in ``mktemp -d``).

The planted-folder tests play another local user who creates the temp-directory fallback folder
first (owned by someone else, writable by everyone, or a symbolic link) with a cache index that runs
code when Numba unpickles it: the engine must refuse the folder, so the code never runs. They use a
tiny kernel module instead of the engine's kernels, so each child takes a second or two.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import HANG_TIMEOUT_S, ROOT

# no CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, now or after exec: root obeys the permission bits
DROP_CAPABILITIES = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]

# what the probe computes: the cpu attention kernel (a user's first call), or the small kernel of
# ``merge_attention`` where the point is the cache files, not what is in them (a fraction of the
# compile time)
FORWARD = """
    q, k, v = (rng.standard_normal((1, 2, 40, 8)).astype(np.float32) for _ in range(3))
    out = engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    ref = engine.scaled_dot_product_attention(q, k, v, backend="reference")"""
MERGE = """
    q, k, v = (rng.standard_normal((1, 2, 40, 8)).astype(np.float32) for _ in range(3))
    parts = [engine.scaled_dot_product_attention(q, k[:, :, s], v[:, :, s], backend="reference", return_lse=True)
             for s in (slice(0, 15), slice(15, 40))]
    out, _ = engine.merge_attention([o for o, _ in parts], [lse for _, lse in parts])
    ref = engine.scaled_dot_product_attention(q, k, v, backend="reference")"""

PROBE = r"""
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import numpy as np
    import engine, numba
    rng = np.random.default_rng(0){compute}
import importlib, pkgutil
import engine.kernels
from numba.core.dispatcher import Dispatcher
hits = 0
for m in pkgutil.walk_packages(engine.kernels.__path__, "engine.kernels."):
    if ".cuda" in m.name:  # numba-cuda kernels: not compiled by this probe
        continue
    mod = importlib.import_module(m.name)
    hits += sum(sum(d.stats.cache_hits.values()) for d in vars(mod).values() if isinstance(d, Dispatcher))
print(json.dumps({"file": engine.__file__, "cache_hits": hits, "correct": bool(np.allclose(out, ref, atol=2e-5)),
                  "cache_enabled": engine.runtime.jit_cache.cache_enabled(), "cache_dir": numba.config.CACHE_DIR,
                  "warnings": [str(w.message) for w in caught if "attention-engine" in str(w.message)]}))
"""
FORWARD_PROBE = PROBE.replace("{compute}", FORWARD)
MERGE_PROBE = PROBE.replace("{compute}", MERGE)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CACHE_DIR", "XDG_CACHE_HOME"))}
    env.update(extra)
    return env


def _run(env, unprivileged=False, probe=MERGE_PROBE):
    cmd = [sys.executable, "-c", probe]
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
            shutil.copytree(
                os.path.join(ROOT, pkg), os.path.join(site, pkg), ignore=shutil.ignore_patterns("__pycache__")
            )
        home = os.path.join(top, "home")
        tmp = os.path.join(top, "tmp")
        os.makedirs(home)
        os.makedirs(tmp)
        os.chmod(tmp, 0o1777)  # as /tmp: everyone may create, only owners may rename or delete
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
    env = _env(
        PYTHONPATH=os.pathsep.join([os.path.join(top, "site")] + sys.path),
        HOME=os.path.join(top, "home"),
        TMPDIR=os.path.join(top, "tmp"),
    )
    got = _run(env, unprivileged, probe=FORWARD_PROBE)
    assert got["file"].startswith(os.path.join(top, "site")), got  # the read-only copy was imported
    assert got["correct"] and got["cache_enabled"], got
    assert got["cache_dir"].startswith(os.path.join(top, "tmp", "attention-engine-numba-")), got
    cached = [n for _, _, files in os.walk(got["cache_dir"]) for n in files if n.endswith(".nbi")]
    assert cached, "the fallback folder holds no cache index"
    again = _run(env, unprivileged, probe=FORWARD_PROBE)  # the second process loads from the fallback cache
    assert again["correct"] and again["cache_dir"] == got["cache_dir"] and again["cache_hits"] > 0, again


def test_unwritable_cache_dir_runs_without_cache_and_warns(sandbox):
    top, unprivileged = sandbox
    env = _env(
        PYTHONPATH=os.pathsep.join([os.path.join(top, "site")] + sys.path),
        HOME=os.path.join(top, "home"),
        TMPDIR=os.path.join(top, "tmp"),
        NUMBA_CACHE_DIR=os.path.join(top, "home", "cache"),
    )
    got = _run(env, unprivileged)
    assert got["correct"] and not got["cache_enabled"], got
    assert any("no writable folder for Numba's cache" in w and "NUMBA_CACHE_DIR" in w for w in got["warnings"]), got


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


# ---- a fallback folder planted by another local user ------------------------------------------

OTHER_UID = 65534  # nobody: "another local user"

# one tiny cached kernel, cached wherever the engine says; umask 0 in the child, so a folder it
# creates is private only if the engine asks for mode 0700 explicitly
TINY_KERNEL = """
from numba import njit
from engine.runtime.jit_cache import cache_enabled

@njit(cache=cache_enabled())
def twice(x):
    return 2.0 * x
"""

TINY_PROBE = r"""
import json, os, warnings
os.umask(0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import numba
    import ae_tiny_kernel
    value = ae_tiny_kernel.twice(21.0)
from engine.runtime.jit_cache import cache_enabled
print(json.dumps({"value": value, "cache_enabled": cache_enabled(), "cache_dir": numba.config.CACHE_DIR,
                  "cache_hits": sum(ae_tiny_kernel.twice.stats.cache_hits.values()),
                  "warnings": [str(w.message) for w in caught if "attention-engine" in str(w.message)]}))
"""


class _RunsCode:
    """Unpickling this creates a folder: the planted cache index's payload, visible from outside."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture(scope="module")
def tiny_site():
    """(top, unprivileged, poisoned): a read-only copy of the package with the tiny kernel module, an
    unwritable home, and a Numba cache of that kernel (built once here, then copied by each test that
    plants it) whose index files a test overwrites with a payload."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be made real")
    top = tempfile.mkdtemp(prefix="ae-plant-")
    try:
        os.chmod(top, 0o755)
        site = os.path.join(top, "site")
        shutil.copytree(
            os.path.join(ROOT, "engine"), os.path.join(site, "engine"), ignore=shutil.ignore_patterns("__pycache__")
        )
        with open(os.path.join(site, "ae_tiny_kernel.py"), "w") as f:
            f.write(TINY_KERNEL)
        home = os.path.join(top, "home")
        os.makedirs(home)
        for dirpath, dirnames, filenames in os.walk(site):
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o444)
            os.chmod(dirpath, 0o555)
        os.chmod(home, 0o555)
        poisoned = os.path.join(top, "poisoned")
        env = _env(PYTHONPATH=os.pathsep.join([site] + sys.path), HOME=home, NUMBA_CACHE_DIR=poisoned)
        assert _run(env, probe=TINY_PROBE)["cache_enabled"]
        assert [n for _, _, files in os.walk(poisoned) for n in files if n.endswith(".nbi")]
        yield top, os.geteuid() == 0, poisoned
    finally:
        for dirpath, dirnames, filenames in os.walk(top):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def victim(tiny_site, tmp_path):
    """A fresh temp folder (mode 1777, like /tmp) for one test, and how to run the tiny probe with it
    as the temp directory: returns (tmp, fallback path, plant(folder, owner, mode), run())."""
    top, unprivileged, poisoned = tiny_site
    tmp = tempfile.mkdtemp(dir=top)
    os.chmod(tmp, 0o1777)
    fallback = os.path.join(tmp, f"attention-engine-numba-{os.geteuid()}")
    marker = os.path.join(tmp, "planted-code-ran")

    def plant(folder, owner, mode):
        """The cache built by tiny_site, copied to ``folder``, every index a payload."""
        give = (lambda path: os.chown(path, owner, owner)) if owner != os.geteuid() else (lambda path: None)
        shutil.copytree(poisoned, folder)
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if name.endswith(".nbi"):
                    with open(path, "wb") as f:
                        pickle.dump(_RunsCode(marker), f)
                os.chmod(path, 0o666 if mode & 0o002 else 0o600)
                give(path)
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), mode)
                give(os.path.join(dirpath, name))
        os.chmod(folder, mode)
        give(folder)

    def run(**extra):
        env = _env(
            PYTHONPATH=os.pathsep.join([os.path.join(top, "site")] + sys.path),
            HOME=os.path.join(top, "home"),
            TMPDIR=tmp,
            **extra,
        )
        got = _run(env, unprivileged, probe=TINY_PROBE)
        got["planted_code_ran"] = os.path.exists(marker)
        assert got["value"] == 42.0, got
        return got

    yield tmp, fallback, plant, run
    for dirpath, dirnames, filenames in os.walk(tmp):
        os.chmod(dirpath, 0o755)


def _refused(got, fallback, *why):
    assert not got["planted_code_ran"], "the planted cache index was unpickled: its code ran"
    assert not got["cache_enabled"] and got["cache_dir"] != fallback, got
    assert any(fallback in w and "is not used" in w and all(x in w for x in why) for w in got["warnings"]), got[
        "warnings"
    ]


def test_planted_payload_runs_when_the_folder_is_used(victim):
    """Control for the planted-folder tests: the same planted index, in a folder the user chose
    (NUMBA_CACHE_DIR), is unpickled, so the payload would run; that is what the refusals prevent."""
    tmp, _, plant, run = victim
    chosen = os.path.join(tmp, "chosen")
    plant(chosen, os.geteuid(), 0o700)
    assert run(NUMBA_CACHE_DIR=chosen)["planted_code_ran"]


def test_fallback_folder_owned_by_another_user_is_refused(victim):
    if os.geteuid() != 0:
        pytest.skip("making a folder owned by another user needs root")
    tmp, fallback, plant, run = victim
    plant(fallback, OTHER_UID, 0o777)
    _refused(run(), fallback, f"owned by uid {OTHER_UID}")


def test_fallback_folder_writable_by_others_is_refused(victim):
    tmp, fallback, plant, run = victim
    plant(fallback, os.geteuid(), 0o777)
    _refused(run(), fallback, "writable by group or others", "0777")


def test_symlink_in_place_of_the_fallback_folder_is_refused(victim):
    """A link can be pointed elsewhere after any check, by whoever owns it: refused even when it
    points to a private folder of the user's own."""
    tmp, fallback, plant, run = victim
    target = os.path.join(tmp, "private-looking")
    plant(target, os.geteuid(), 0o700)
    os.symlink(target, fallback)
    _refused(run(), fallback, "symbolic link")


def test_fallback_in_a_temp_folder_others_can_rename_in_is_refused(victim):
    """Without the sticky bit, anyone who may write the temp folder may rename the private folder
    away after the check and put their own in its place."""
    tmp, fallback, plant, run = victim
    os.chmod(tmp, 0o777)
    _refused(run(), fallback, "without the sticky bit")
    assert not os.path.lexists(fallback), "checked the temp folder only after creating a folder in it"


def test_fresh_fallback_folder_is_private_and_cached_across_processes(victim):
    tmp, fallback, plant, run = victim
    first = run()
    assert first["cache_enabled"] and first["cache_dir"] == fallback and not first["warnings"], first
    st = os.lstat(fallback)
    assert st.st_uid == os.geteuid() and oct(st.st_mode & 0o7777) == oct(0o700), oct(st.st_mode)  # umask 0
    again = run()  # a second process loads the kernel from the folder the first one created
    assert again["cache_dir"] == fallback and again["cache_hits"] > 0 and not again["warnings"], again


def test_existing_own_fallback_folder_not_writable_by_others_is_used(victim):
    tmp, fallback, plant, run = victim
    os.mkdir(fallback)
    os.chmod(fallback, 0o755)  # readable by others is harmless: reading a cache runs nothing
    got = run()
    assert got["cache_enabled"] and got["cache_dir"] == fallback and not got["warnings"], got
    assert run()["cache_hits"] > 0


def test_cache_dir_writable_by_others_is_used_with_a_warning(victim):
    tmp, fallback, plant, run = victim
    chosen = os.path.join(tmp, "shared-cache")
    os.mkdir(chosen)
    os.chmod(chosen, 0o777)
    got = run(NUMBA_CACHE_DIR=chosen)
    assert got["cache_enabled"] and got["cache_dir"] == chosen, got
    assert any(
        "NUMBA_CACHE_DIR" in w and chosen in w and "writable by group or others" in w and "because you chose it" in w
        for w in got["warnings"]
    ), got["warnings"]


def test_private_cache_dir_gives_no_warning(victim):
    """Control for the test above; a link to a private folder is fine when the user chose it."""
    tmp, fallback, plant, run = victim
    chosen = os.path.join(tmp, "mine")
    os.mkdir(chosen, 0o700)
    os.symlink(chosen, os.path.join(tmp, "link-to-mine"))
    got = run(NUMBA_CACHE_DIR=os.path.join(tmp, "link-to-mine"))
    assert got["cache_enabled"] and not got["warnings"], got


# ---- the folder check itself, in this process (each rule on its own) ---------------------------


def _problem(path):
    from engine.runtime.jit_cache import _private_folder_problem

    return _private_folder_problem(str(path))


def test_private_folder_check_rules(tmp_path):
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    assert _problem(own) is None
    for mode, bits in ((0o720, "0720"), (0o702, "0702"), (0o1777, "1777")):
        os.chmod(own, mode)
        assert "writable by group or others" in _problem(own) and bits in _problem(own), mode
    os.chmod(own, 0o755)
    assert _problem(own) is None
    link = tmp_path / "link"
    link.symlink_to(own)
    assert _problem(link) == "is a symbolic link"
    (tmp_path / "file").write_text("")
    assert _problem(tmp_path / "file") == "is not a folder"
    assert "cannot be inspected" in _problem(tmp_path / "missing")
    if os.geteuid() == 0:  # only root can give a folder away
        os.chmod(own, 0o700)
        os.chown(own, OTHER_UID, OTHER_UID)
        assert f"owned by uid {OTHER_UID}" in _problem(own)


def test_parent_folder_check_rules(tmp_path):
    from engine.runtime.jit_cache import _parent_problem

    parent = tmp_path / "parent"
    parent.mkdir(mode=0o755)
    child = str(parent / "attention-engine-numba-0")
    assert _parent_problem(child) is None
    os.chmod(parent, 0o1777)  # sticky, as /tmp: others may create but not rename what is not theirs
    assert _parent_problem(child) is None
    os.chmod(parent, 0o777)
    assert "without the sticky bit" in _parent_problem(child) and "0777" in _parent_problem(child)
    os.chmod(parent, 0o775)
    assert "without the sticky bit" in _parent_problem(child)
    if os.geteuid() == 0:  # only root can give a folder away; its owner may rename anything in it
        os.chmod(parent, 0o755)
        os.chown(parent, OTHER_UID, OTHER_UID)
        assert f"owned by uid {OTHER_UID}" in _parent_problem(child)
