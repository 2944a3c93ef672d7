"""score_mod / mask_mod / block masks, and the variants built on them, against dense equivalents."""

import math
import os
import re

import numba
import numpy as np
import pytest
import torch

import engine
from engine.problems.mods import EMPTY, FULL, PARTIAL
from variants.alibi import alibi_slopes

from conftest import HANG_TIMEOUT_S, available_backends, randn
from testmods import causal_mod, head_bias, softcap_mod, window_mod

MOD_BACKENDS = [b for b in available_backends() if engine.get_backend(b).supports_mods]


def _qkv(rng, B=2, H=3, L=70, S=300, E=16, dtype=np.float32):
    return randn(rng, (B, H, L, E), dtype), randn(rng, (B, H, S, E), dtype), randn(rng, (B, H, S, E), dtype)


def _close(a, b, dtype=np.float32):
    np.testing.assert_allclose(a, b, atol=2e-5 if dtype == np.float32 else 1e-10, rtol=0)


@pytest.mark.parametrize("backend", MOD_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_causal_mask_mod_equals_is_causal(backend, dtype, rng):
    q, k, v = _qkv(rng, dtype=dtype)
    out, lse = engine.scaled_dot_product_attention(q, k, v, mask_mod=causal_mod, backend=backend, return_lse=True)
    ref, ref_lse = engine.scaled_dot_product_attention(q, k, v, is_causal=True, backend="reference", return_lse=True)
    _close(out, ref, dtype)
    _close(lse, ref_lse, dtype)


@pytest.mark.parametrize("backend", MOD_BACKENDS)
def test_window_mask_mod_with_block_mask_equals_dense_mask(backend, rng):
    q, k, v = _qkv(rng, L=300, S=300)
    i, j = np.arange(300)[:, None], np.arange(300)[None]
    dense = (i - 20 <= j) & (j <= i + 5)
    bm = engine.create_block_mask(window_mod, None, None, 300, 300, mod_args=(20, 5))
    assert 0 < bm.density < 1
    for kw in ({"block_mask": bm}, {"mask_mod": window_mod, "mod_args": (20, 5)}):
        out = engine.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
        _close(out, engine.scaled_dot_product_attention(q, k, v, attn_mask=dense, backend="reference"))


@pytest.mark.parametrize("backend", MOD_BACKENDS)
def test_score_mod_with_captured_array_equals_dense_bias(backend, rng):
    q, k, v = _qkv(rng)
    slopes = np.array([0.5, 0.25, 0.125])
    bias = -slopes[:, None, None] * np.abs(np.arange(70)[:, None] - np.arange(300)[None])
    out = engine.scaled_dot_product_attention(q, k, v, score_mod=head_bias, mod_args=(slopes,), backend=backend)
    _close(out, engine.scaled_dot_product_attention(q, k, v, attn_mask=bias.astype(np.float32), backend="reference"))


@pytest.mark.parametrize("backend", MOD_BACKENDS)
def test_score_mod_combined_with_mask_and_njit_function(backend, rng):
    import numba

    q, k, v = _qkv(rng, L=40, S=40)
    mod = numba.njit(softcap_mod)
    out = engine.scaled_dot_product_attention(q, k, v, score_mod=mod, mod_args=(0.5,), is_causal=True, backend=backend)
    s = np.einsum("bhle,bhse->bhls", q.astype(np.float64), k.astype(np.float64)) / 4.0
    s = np.where(np.tril(np.ones((40, 40), bool)), 0.5 * np.tanh(s / 0.5), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)
    _close(out, expected)


def test_block_mask_classification():
    bm = engine.create_block_mask(causal_mod, None, None, 200, 600, block_q=64, block_k=256)
    # 64-row query tiles x 256-key tiles: tile (qb, kb) is empty when its first key is beyond its last row
    for qb in range(bm.kinds.shape[2]):
        for kb in range(bm.kinds.shape[3]):
            i0, i1, j0, j1 = qb * 64, min(qb * 64 + 64, 200) - 1, kb * 256, min(kb * 256 + 256, 600) - 1
            expected = EMPTY if j0 > i1 else (FULL if j1 <= i0 else PARTIAL)
            assert bm.kinds[0, 0, qb, kb] == expected
    per_head = engine.create_block_mask(lambda b, h, i, j: h == 1, 2, 3, 10, 10)
    assert per_head.kinds.shape == (2, 3, 1, 1)
    assert (per_head.kinds[:, 1] == FULL).all() and (per_head.kinds[:, [0, 2]] == EMPTY).all()
    np.testing.assert_array_equal(
        bm.kinds_at(128, 256),
        engine.create_block_mask(causal_mod, None, None, 200, 600, block_q=128, block_k=256).kinds,
    )
    assert bm.kinds_at(128, 256) is bm.kinds_at(128, 256)  # derived once, memoised


def test_mod_errors(rng):
    q, k, v = _qkv(rng, L=10, S=10)
    with pytest.raises(TypeError, match="mask_mod must be a function, got int"):
        engine.scaled_dot_product_attention(q, k, v, mask_mod=3)
    with pytest.raises(TypeError, match="mod_args must be a tuple, got list"):
        engine.scaled_dot_product_attention(q, k, v, mask_mod=causal_mod, mod_args=[1])
    bm = engine.create_block_mask(causal_mod, None, None, 20, 20)
    with pytest.raises(
        ValueError,
        match=r"block_mask was built for \(batch, heads, L, S\) = \(1, 1, 20, 20\) but the "
        r"inputs have \(2, 3, 10, 10\)",
    ):
        engine.scaled_dot_product_attention(q, k, v, block_mask=bm)


# --- the variants built on mods ---------------------------------------------------------------


def _mha_twin(variant, rng):
    """A plain multi-head variant with the same weights, to compute the dense equivalent."""
    twin = engine.get_variant("multi-head", embed_dim=variant.embed_dim, num_heads=variant.num_heads)
    twin.load_state_dict(variant.state_dict())
    return twin


def _randomise(variant, rng):
    variant.load_state_dict({k: rng.uniform(-0.5, 0.5, v.shape) for k, v in variant.state_dict().items()})
    return variant


@pytest.mark.parametrize("backend", MOD_BACKENDS)
def test_sliding_window_variant_equals_dense_mask(backend, rng):
    sw = _randomise(engine.get_variant("sliding-window", embed_dim=32, num_heads=4, left=7, right=2), rng)
    x = randn(rng, (2, 90, 32))
    i, j = np.arange(90)[:, None], np.arange(90)[None]
    blocked = ~((i - 7 <= j) & (j <= i + 2))  # MHA polarity: True = not allowed
    out, w = sw(x, need_weights=True, backend=backend)
    ref, ref_w = _mha_twin(sw, rng)(x, attn_mask=blocked, need_weights=True, backend="reference")
    _close(out, ref)
    _close(w, ref_w)


@pytest.mark.parametrize("backend", MOD_BACKENDS)
@pytest.mark.parametrize("heads", [4, 6])
def test_alibi_variant_equals_dense_bias(backend, heads, rng):
    al = _randomise(engine.get_variant("alibi", embed_dim=48, num_heads=heads), rng)
    x = randn(rng, (2, 50, 48))
    i, j = np.arange(50)[:, None], np.arange(50)[None]
    bias = -alibi_slopes(heads)[:, None, None] * np.abs(i - j)
    bias = np.where(j <= i, bias, -np.inf)  # causal, as the paper's LMs
    out, _ = al(x, backend=backend)
    ref, _ = _mha_twin(al, rng)(x, attn_mask=np.tile(bias, (2, 1, 1)).astype(np.float32), backend="reference")
    _close(out, ref)


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), [2 ** -(k + 1) for k in range(8)])
    s6 = alibi_slopes(6)  # 4 slopes of 4 heads, then every other slope of 8 heads
    np.testing.assert_allclose(s6, [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


@pytest.mark.parametrize("backend", MOD_BACKENDS)
def test_softcap_variant_matches_torch_formula(backend, rng):
    sc = _randomise(engine.get_variant("softcap", embed_dim=32, num_heads=4, cap=1.5), rng)
    x = randn(rng, (2, 30, 32))
    out, _ = sc(x, backend=backend)
    sd = {k: torch.from_numpy(v) for k, v in sc.state_dict().items()}
    t = torch.from_numpy(x)
    qkv = t @ sd["in_proj_weight"].T + sd["in_proj_bias"]
    q, k, v = (z.reshape(2, 30, 4, 8).transpose(1, 2) for z in qkv.split(32, dim=-1))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    p = torch.softmax(1.5 * torch.tanh(s / 1.5), dim=-1)
    expected = (p @ v).transpose(1, 2).reshape(2, 30, 32) @ sd["out_proj.weight"].T + sd["out_proj.bias"]
    _close(out, expected.numpy())


@pytest.mark.parametrize("backend", MOD_BACKENDS)
def test_grouped_query_variant_matches_torch_sdpa(backend, rng):
    gq = _randomise(engine.get_variant("grouped-query", embed_dim=32, num_heads=8, num_kv_heads=2), rng)
    assert gq.state_dict()["k_proj_weight"].shape == (8, 32)
    x = randn(rng, (2, 33, 32))
    out, _ = gq(x, backend=backend)
    sd = {k: torch.from_numpy(v) for k, v in gq.state_dict().items()}
    t = torch.from_numpy(x)
    b = sd["in_proj_bias"]
    q = (t @ sd["q_proj_weight"].T + b[:32]).reshape(2, 33, 8, 4).transpose(1, 2)
    k = (t @ sd["k_proj_weight"].T + b[32:40]).reshape(2, 33, 2, 4).transpose(1, 2)
    v = (t @ sd["v_proj_weight"].T + b[40:]).reshape(2, 33, 2, 4).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    expected = o.transpose(1, 2).reshape(2, 33, 32) @ sd["out_proj.weight"].T + sd["out_proj.bias"]
    _close(out, expected.numpy())


@pytest.mark.parametrize("backend", MOD_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_document_variant_equals_block_diagonal_mask(backend, causal, rng):
    doc = _randomise(engine.get_variant("document", embed_dim=16, num_heads=2, causal=causal), rng)
    x = randn(rng, (2, 40, 16))
    ids = np.array([[0] * 10 + [1] * 25 + [2] * 5, [0] * 39 + [1]])
    out, w = doc(x, document_ids=ids, need_weights=True, backend=backend)
    blocked = ids[:, :, None] != ids[:, None, :]
    if causal:
        blocked = blocked | np.triu(np.ones((40, 40), bool), 1)
    twin = _mha_twin(doc, rng)
    ref, ref_w = twin(x, attn_mask=np.repeat(blocked, 2, axis=0), need_weights=True, backend="reference")
    _close(out, ref)
    _close(w, ref_w)
    assert np.all(w[0, :10, 10:] == 0)  # the first document never sees the others
    with pytest.raises(ValueError, match=r"document_ids must be integers of shape \(N, L\) = \(2, 40\)"):
        doc(x, document_ids=ids[:, :30])


USER_SCRIPT = """
import warnings
import numpy as np
import engine
warnings.simplefilter("error")   # an unreadable cache index would warn (and recompile)

def {name}(b, h, i, j):
    return (i + j) % 3 != 0 or j == 0

q = np.random.default_rng(0).random((1, 2, 50, 8)).astype(np.float32)
out = engine.scaled_dot_product_attention(q, q, q, mask_mod={name}, backend="cpu")
ref = engine.scaled_dot_product_attention(q, q, q, mask_mod={name}, backend="reference")
assert np.abs(out - ref).max() < 1e-5
"""


def test_user_mods_from_other_scripts_share_a_cache_folder(tmp_path):
    """Kernels specialised on a script's own mods stay out of Numba's disk cache: its index would
    refer to the script's module, which other processes cannot import. Two scripts run against one
    cache folder, and no kernel with mods is left in it (a later process could only load them)."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    for name in ("mask_a", "mask_b"):
        script = tmp_path / f"{name}.py"
        script.write_text(USER_SCRIPT.format(name=name))
        res = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S
        )
        assert res.returncode == 0, res.stderr[-2000:]
    # a kernel specialised on mods is cached as "<module>.<kernel>_mods[_serial]_<tag>-<line>..."
    cached = sorted(p.name for p in cache.rglob("*") if p.suffix in (".nbi", ".nbc"))
    assert cached and not [n for n in cached if re.search(r"_mods(_serial)?(_[0-9a-f]{16})?-\d+\.", n)], cached


BUILTIN_MODS_SCRIPT = """
import json, warnings
import numpy as np
import engine
from engine.kernels.cpu import flash_fwd as cpu_flash
warnings.simplefilter("error")   # an unreadable cache index would warn (and recompile)

x = np.random.default_rng(0).standard_normal((2, 40, 16)).astype(np.float32)
ids = np.repeat(np.arange(4), 10)[None].repeat(2, 0)
outs = {{}}
for key in {keys!r}:
    name, causal = key.split(":") if ":" in key else (key, None)
    kw = {{}} if causal is None else {{"causal": causal == "causal"}}
    attn = engine.get_variant(name, embed_dim=16, num_heads=2, seed=0, **kw)
    call = {{"document_ids": ids}} if name == "document" else {{}}
    outs[key] = attn(x, backend="cpu", **call)[0].tolist()
hits = sum(sum(k.stats.cache_hits.values()) for k in cpu_flash._with_mods.values())
print(json.dumps({{"outs": outs, "hits": hits, "kernels": len(cpu_flash._with_mods)}}))
"""

# a score_mod and a mask_mod kernel, and two mask_mods whose kernels share a signature (Numba keys
# its entries by signature as well as by name, so only such a pair can load the other's kernel if
# the tag fails to tell them apart; a second score_mod with its own signature would add nothing)
KEYS = ["alibi", "document:plain", "document:causal"]


def test_builtin_mods_kernels_are_loaded_from_the_disk_cache(tmp_path):
    """The second process loads the built-in mods' kernels instead of compiling them (about 12 s
    each), and each gets its own kernel back, in either order: same_document and
    same_document_causal even share a signature."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for keys in (KEYS, KEYS[::-1]):
        script = tmp_path / "builtin_mods.py"
        script.write_text(BUILTIN_MODS_SCRIPT.format(keys=keys))
        res = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S
        )
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["kernels"] == second["kernels"] == len(KEYS)
    assert first["hits"] == 0 and second["hits"] == len(KEYS)
    for key in KEYS:  # each key gets its own kernel back (a fresh and a cached build may differ by an ulp)
        np.testing.assert_allclose(first["outs"][key], second["outs"][key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert first["outs"]["document:plain"] != first["outs"]["document:causal"]


def _module_function(source, module):
    """A function compiled from ``source`` as if it were defined in ``module``."""
    env = {"__name__": module}
    exec(compile(source, f"<{module}>", "exec"), env)
    return env["f"]


def test_cache_tag_changes_with_the_mods_code_and_skips_what_it_cannot_vouch_for():
    from engine.kernels.cpu.flash_fwd import _CACHE
    from engine.kernels.specialise import cache_tag as _cache_tag

    if not _CACHE:
        pytest.skip("Numba's disk cache is off in this environment")
    src = "def f(score, b, h, q_idx, kv_idx):\n    return score * {c}\n"
    a = _module_function(src.format(c=2.0), "variants.example")
    edited = _module_function(src.format(c=3.0), "variants.example")
    assert _cache_tag(a, None) and _cache_tag(a, None) == _cache_tag(numba.njit(a), None)
    assert _cache_tag(a, None) != _cache_tag(edited, None)
    assert _cache_tag(a, None) != _cache_tag(None, a)
    assert _cache_tag(_module_function(src.format(c=2.0), "some_plugin.mods"), None) is None
    assert _cache_tag(_module_function(src.format(c=2.0), "__main__"), None) is None

    def closure(c):
        def f(score, b, h, q_idx, kv_idx):
            return score * c

        return f

    inner = closure(2.0)
    inner.__module__ = "variants.example"
    assert _cache_tag(inner, None) is None


def test_cache_tag_is_the_same_in_every_process():
    """The tag names a disk-cache entry that other processes look up, so it may depend only on the
    mods' code: not on reference counts (``marshal.dumps`` marks objects referenced twice, which
    gave a generated gradient step another tag under pytest than alone, so its kernel was compiled
    again in every process) nor on the hash seed (a frozenset constant iterates in a
    seed-dependent order)."""
    import subprocess
    import sys

    from engine.kernels.cpu.flash_fwd import _CACHE
    from engine.kernels.specialise import cache_tag as _cache_tag

    if not _CACHE:
        pytest.skip("Numba's disk cache is off in this environment")
    a = _module_function("def f(score, b, h, q_idx, kv_idx):\n    return score * 2.5 + (1.5, 0.5)[b]\n", "variants.x")
    before = _cache_tag(a, None)
    extra_references = list(a.__code__.co_consts)  # noqa: F841 (raises each constant's count)
    assert _cache_tag(a, None) == before

    source = "def f(score, b, h, q_idx, kv_idx):\n    return score if str(b) in {'0', '1', '2', '3', '4'} else 0.0\n"
    script = (
        "import sys; from engine.kernels.specialise import cache_tag; env = {'__name__': 'variants.x'}; "
        "exec(compile(sys.argv[1], '<variants.x>', 'exec'), env); print(cache_tag(env['f'], None))"
    )
    tags = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, "-c", script, source], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        tags.add(run.stdout.strip())
    assert len(tags) == 1 and None not in tags, tags


def test_cached_mods_setting_adds_the_modules_it_names_and_nothing_else(monkeypatch):
    """``ATTENTION_ENGINE_CACHED_MODS`` (comma-separated top-level names) makes those modules' mods
    cacheable as the built-ins' are; other modules, ``__main__`` and closures stay uncached."""
    from engine.kernels.cpu.flash_fwd import _CACHE
    from engine.kernels.specialise import CACHED_MODS_ENV
    from engine.kernels.specialise import cache_tag as _cache_tag

    if not _CACHE:
        pytest.skip("Numba's disk cache is off in this environment")
    src = "def f(score, b, h, q_idx, kv_idx):\n    return score * 2.0\n"
    mine, other = _module_function(src, "my_mods.attention"), _module_function(src, "my_modsx")
    script = _module_function(src, "__main__")
    monkeypatch.delenv(CACHED_MODS_ENV, raising=False)
    assert _cache_tag(mine, None) is None
    monkeypatch.setenv(CACHED_MODS_ENV, " other_pkg , my_mods,,__main__")
    tag = _cache_tag(mine, None)
    assert tag and tag == _cache_tag(numba.njit(mine), None)
    assert tag != _cache_tag(_module_function(src, "other_pkg"), None)  # the module is in the tag
    assert _cache_tag(other, None) is None  # a prefix of a name is not that name
    assert _cache_tag(mine, other) is None  # every mod of the tuple must qualify
    assert _cache_tag(script, None) is None  # never a script's module

    def closure(c):
        def f(score, b, h, q_idx, kv_idx):
            return score * c

        return f

    inner = closure(2.0)
    inner.__module__ = "my_mods"
    assert _cache_tag(inner, None) is None
    # the tests' own mods are cached through this setting (conftest.py)
    from testmods import causal_mod

    monkeypatch.setenv(CACHED_MODS_ENV, "testmods")
    assert _cache_tag(causal_mod, None)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"score_mod": lambda s, b: s}, "score_mod .* must take 5 positional arguments"),
        ({"score_mod": lambda s, b, h, i, j, a: s}, r"must take 5 positional arguments .*mod_args entry: 0"),
        ({"mask_mod": lambda b, h, i: True}, "mask_mod .* must take 4 positional arguments"),
        ({"score_mod": lambda s, b, h, i, j: s, "mod_args": (np.ones(2),)}, "must take 6 positional arguments"),
    ],
)
def test_mod_with_the_wrong_arity_is_a_type_error_naming_it(kw, match):
    """Checked in validation: before, Numba's typing error pointed into the kernel's source."""
    q = np.ones((1, 2, 4, 8), np.float32)
    for backend in ("reference", "cpu"):
        with pytest.raises(TypeError, match=match):
            engine.scaled_dot_product_attention(q, q, q, backend=backend, **kw)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_tuple_inside_mod_args_is_refused_by_name(backend):
    """A parallel kernel cannot take a tuple inside its mod_args: every backend refuses it alike
    (the reference backend used to take it and the cpu kernel to fail with Numba's type error)."""
    from testmods import softcap_mod

    q = np.ones((1, 2, 8, 4), np.float32)
    for bad in ((0.5, 1.0), [0.5]):
        with pytest.raises(TypeError, match=r"mod_args\[0\] is a (tuple|list)"):
            engine.scaled_dot_product_attention(q, q, q, score_mod=softcap_mod, mod_args=(bad,), backend=backend)
