"""Property-based tests: every available backend and every registered variant against ``reference``.

Hypothesis draws the whole input space of ``scaled_dot_product_attention``: batch shapes (none,
one or two leading dims, or 2-D ``(L, E)`` inputs), head counts with GQA ratios, L and S from 1 to
300 (not tile multiples), E != Ev, boolean and float masks of every broadcastable shape (fully
masked rows and fully masked inputs included), causal with L < S and L > S, custom scales (zero
and negative included), float32 and float64, and C-contiguous, transposed, strided, Fortran and
negative-stride views. The oracle always gets C-contiguous copies, so views are tested too.

Profiles: ``ci`` (default: derandomized, fixed examples, bounded time) and ``dev`` (many more
random examples): ``HYPOTHESIS_PROFILE=dev pytest tests/forward/test_properties.py``. Tolerances live in
``tests/tolerances.py``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import engine

from conftest import available_backends, variant_names
from tolerances import LONG_F32_BOUND, assert_out_close, lse_atol, out_atol, variant_atol

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=100,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# variants cost more per example (projections, weights, a kernel compiled per mod closure); the ci
# profile runs fewer of them (the dev profile: 120)
VARIANT_PROFILE = settings(PROFILE, max_examples=max(10, PROFILE.max_examples // 5))

BACKENDS = available_backends()  # reference included: views vs contiguous copies
VARIANTS = variant_names()
LAYOUTS = ("c", "transposed", "strided", "fortran", "negative")
#: score entries (batch * heads * L * S) per drawn case: keeps the ci profile within its budget
WORK = 250_000


def as_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """The same values as ``x`` in a view with other strides (never C-contiguous unless trivial)."""
    if layout == "c" or x.ndim < 2:
        return x
    if layout == "transposed":  # stored (..., cols, rows), viewed (..., rows, cols)
        return np.swapaxes(np.ascontiguousarray(np.swapaxes(x, -1, -2)), -1, -2)
    if layout == "fortran":
        return np.asfortranarray(x)
    if layout == "strided":  # every other element of a bigger buffer, on the last two axes
        buf = np.zeros(x.shape[:-2] + (2 * x.shape[-2], 2 * x.shape[-1]), dtype=x.dtype)
        buf[..., ::2, ::2] = x
        return buf[..., ::2, ::2]
    if layout == "negative":  # negative strides on the last two axes
        return np.ascontiguousarray(x[..., ::-1, ::-1])[..., ::-1, ::-1]
    raise AssertionError(layout)


@st.composite
def attention_cases(draw):
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    L = draw(st.one_of(st.integers(1, 24), st.integers(1, 300)))
    S = draw(st.one_of(st.integers(1, 24), st.integers(1, 300)))
    budget = max(1, WORK // (L * S))
    two_d = draw(st.integers(0, 7)) == 0
    if two_d:
        batch, H, group = (), 1, 1
    else:
        nb = draw(st.integers(0, 2))
        batch = tuple(draw(st.integers(1, 3)) for _ in range(nb))
        while math.prod(batch) > budget:
            batch = batch[1:]
        room = max(1, budget // max(1, math.prod(batch)))
        H = draw(st.integers(1, max(1, min(3, room))))
        group = draw(st.sampled_from([g for g in (1, 1, 2, 3, 4) if H * g <= max(room, 1)] or [1]))
    Hq = H * group
    E = draw(st.integers(1, 40))
    Ev = draw(st.integers(1, 40))
    scale = draw(st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False), st.just(0.0)))
    mode = draw(st.sampled_from(["none", "causal", "bool", "float"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mag = draw(st.sampled_from([1.0, 1.0, 3.0]))

    if two_d:
        shapes = [(L, E), (S, E), (S, Ev)]
    else:
        shapes = [batch + (Hq, L, E), batch + (H, S, E), batch + (H, S, Ev)]
    q, k, v = (rng.standard_normal(s).astype(dtype) * dtype.type(mag) for s in shapes)

    mask = None
    if mode in ("bool", "float"):
        target = (L, S) if two_d else batch + (Hq, L, S)
        drop = draw(st.integers(0, len(target)))
        mshape = tuple(t if draw(st.booleans()) else 1 for t in target[drop:])
        keep = draw(st.sampled_from([1.0, 0.7, 0.3, 0.0]))  # 0.0: the whole input is masked
        allowed = rng.random(mshape) < keep
        if allowed.ndim >= 2 and draw(st.booleans()):  # a fully masked row
            allowed[..., rng.integers(allowed.shape[-2]), :] = False
        if mode == "bool":
            mask = allowed
        else:
            mdtype = draw(st.sampled_from([dtype, np.dtype(np.float32), np.dtype(np.float64)]))
            vals = rng.standard_normal(mshape) * draw(st.sampled_from([0.0, 1.0, 10.0]))
            mask = np.where(allowed, vals, -np.inf).astype(mdtype)
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(4)]
    event(f"mask={mode}" + ("" if mask is None else f" ndim={mask.ndim}"))
    event("L or S > 64" if max(L, S) > 64 else "L and S <= 64")
    event(f"GQA group={group}")
    kwargs = {"scale": scale, "enable_gqa": group > 1 or draw(st.booleans())}
    if mode == "causal":
        kwargs["is_causal"] = True
    return dict(q=q, k=k, v=v, mask=mask, kwargs=kwargs, layouts=layouts, dtype=dtype)


def _check_against_reference(backend, case):
    q, k, v, mask, kw, dtype = case["q"], case["k"], case["v"], case["mask"], case["kwargs"], case["dtype"]
    lq, lk, lv, lm = case["layouts"]
    views = [as_layout(x, lay) for x, lay in ((q, lq), (k, lk), (v, lv))]
    mview = None if mask is None else as_layout(mask, lm)
    out, lse = engine.scaled_dot_product_attention(*views, attn_mask=mview, backend=backend, return_lse=True, **kw)
    ref, ref_lse = engine.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, backend="reference", return_lse=True, **kw
    )
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and out.dtype == dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == dtype
    dead = np.isneginf(ref_lse)
    # rows with no visible key: exactly zeros and lse = -inf (torch >= 2.5)
    np.testing.assert_array_equal(np.isneginf(lse), dead)
    assert np.all(out[dead] == 0.0)
    assert np.all(np.isfinite(out)), "finite inputs must give finite outputs"
    assert_out_close(out, ref, out_atol(dtype, q, k, v, kw["scale"], mask), f"out {dtype}")
    assert_out_close(lse, ref_lse, lse_atol(dtype, q, k, kw["scale"], mask), f"lse {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@PROFILE
@given(case=attention_cases())
def test_backend_matches_reference(backend, case):
    _check_against_reference(backend, case)


# -- variants -------------------------------------------------------------------------------------


@st.composite
def variant_cases(draw, name):
    from engine.plugins.registry import variant_info

    cls = variant_info()[0][name].cls
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    heads = draw(st.integers(1, 4))
    params = cls.example_params(heads * draw(st.integers(1, 6)), heads)
    N = draw(st.integers(1, 3))
    L = draw(st.one_of(st.integers(1, 16), st.integers(1, 150)))
    S = draw(st.one_of(st.integers(1, 16), st.integers(1, 150)))
    seed = draw(st.integers(0, 2**32 - 1))
    variant = engine.get_variant(name, **params, seed=seed % 1000, dtype=dtype)
    inputs = variant.example_inputs(N, L, key_length=S, rng=seed)
    rng = np.random.default_rng(seed)
    S_eff = inputs.get("key", inputs["query"]).shape[1]
    nh = getattr(variant, "num_heads", 1)
    kw = {
        "need_weights": draw(st.booleans()),
        "average_attn_weights": draw(st.booleans()),
        "is_causal": draw(st.booleans()),
    }
    kpm = draw(st.sampled_from(["none", "some", "all-of-one"]))
    if kpm != "none":
        pad = rng.random((N, S_eff)) < 0.3
        if kpm == "all-of-one":  # one sequence entirely padding: its rows are fully masked
            pad[rng.integers(N)] = True
        kw["key_padding_mask"] = pad
    am = draw(st.sampled_from(["none", "bool-LS", "float-LS", "bool-NH", "float-NH"]))
    if am != "none":
        shape = (L, S_eff) if am.endswith("LS") else (N * nh, L, S_eff)
        blocked = rng.random(shape) < 0.3  # MHA polarity: True = not allowed
        kw["attn_mask"] = (
            blocked if am.startswith("bool") else np.where(blocked, -np.inf, rng.standard_normal(shape)).astype(dtype)
        )
    unbatched = N == 1 and draw(st.booleans())
    if unbatched:
        inputs = {key: val[0] for key, val in inputs.items()}
        if "key_padding_mask" in kw:
            kw["key_padding_mask"] = kw["key_padding_mask"][0]
        if am.endswith("NH"):
            kw["attn_mask"] = kw["attn_mask"]  # (1 * heads, L, S): already right for N = 1
    layouts = {key: draw(st.sampled_from(LAYOUTS)) for key in inputs}
    return dict(variant=variant, inputs=inputs, kw=kw, layouts=layouts, dtype=dtype)


def _call(variant, inputs, backend, kw):
    """(out, weights) or the exception the call raised."""
    try:
        return variant(**inputs, backend=backend, **kw)
    except (ValueError, TypeError) as exc:
        return exc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
@VARIANT_PROFILE
@given(data=st.data())
def test_variant_matches_reference(name, backend, data):
    """A backend agrees with the reference on every drawn call: same result within tolerance, or
    the same kind of clean error (a variant may refuse a mask it does not take). A backend that
    declares it cannot run the variant's inputs must say why; ``auto`` must then still work."""
    case = data.draw(variant_cases(name))
    variant, inputs, kw, dtype = case["variant"], case["inputs"], case["kw"], case["dtype"]
    views = {key: as_layout(val, case["layouts"][key]) for key, val in inputs.items()}
    expected = _call(variant, inputs, "reference", kw)
    got = _call(variant, views, backend, kw)
    if isinstance(got, ValueError) and "cannot run these inputs: " in str(got) and backend != "reference":
        event(f"{backend} declined; compared backend='auto'")
        got = _call(variant, views, "auto", kw)
    if isinstance(expected, Exception):
        event("variant refused the drawn arguments")
        assert type(got) is type(expected), (got, expected)
        return
    assert not isinstance(got, Exception), got
    (out, w), (ref, ref_w) = got, expected
    assert out.dtype == dtype and out.shape == ref.shape
    assert np.all(np.isfinite(out))
    assert_out_close(out, ref, variant_atol(dtype, ref), f"variant out {dtype}")
    if kw["need_weights"]:
        assert w.shape == ref_w.shape and w.dtype == dtype
        assert_out_close(w, ref_w, variant_atol(dtype, ref_w), f"variant weights {dtype}")
        rows = w.sum(-1)
        if kw["average_attn_weights"]:  # a mean over heads: each head's row sums to 1 or 0
            assert np.all((rows > -1e-6) & (rows < 1 + 1e-3))
        else:
            assert np.all((np.abs(rows - 1) < 1e-3) | (rows == 0)), "rows sum to 1 (0: fully masked)"
    else:
        assert w is None


# -- numerical stability --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scores_of_magnitude_1e4_are_finite_and_correct(backend, dtype):
    rng = np.random.default_rng(11)
    q = (rng.standard_normal((2, 3, 77, 16)) * 25).astype(dtype)
    k = (rng.standard_normal((2, 3, 131, 16)) * 25).astype(dtype)
    v = rng.standard_normal((2, 3, 131, 9)).astype(dtype)
    kw = dict(scale=4.0)  # |scores| up to about 4 * 25 * 25 * 16 = 4e4
    out, lse = engine.scaled_dot_product_attention(q, k, v, backend=backend, return_lse=True, **kw)
    ref, ref_lse = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **kw)
    assert np.abs(ref_lse).max() > 1e4  # the scores really are that large
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    assert_out_close(out, ref, out_atol(dtype, q, k, v, 4.0))
    assert_out_close(lse, ref_lse, lse_atol(dtype, q, k, 4.0), "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masks_of_minus_1e9_are_finite_and_correct(backend, dtype):
    """-1e9 where some key is visible acts as -inf; a row of only -1e9 stays a finite convex
    combination of v (in float32, -1e9 + s rounds s to a multiple of 64: as in torch)."""
    rng = np.random.default_rng(12)
    q, k = (rng.standard_normal((1, 2, 70, 8)).astype(dtype) for _ in range(2))
    v = rng.standard_normal((1, 2, 70, 5)).astype(dtype)
    allowed = rng.random((70, 70)) < 0.5
    allowed[:, 0] = True
    allowed[13] = False  # a row of only -1e9
    mask = np.where(allowed, 0.0, -1e9).astype(dtype)
    out = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    ref = engine.scaled_dot_product_attention(q, k, v, attn_mask=allowed, backend="reference")
    assert np.all(np.isfinite(out))
    live = np.ones(70, bool)
    live[13] = False
    assert_out_close(out[:, :, live], ref[:, :, live], out_atol(dtype, q, k, v, None))
    lo, hi = v.min(axis=2), v.max(axis=2)
    assert np.all(out[:, :, 13] >= lo - 1e-5) and np.all(out[:, :, 13] <= hi + 1e-5)
    if dtype == np.float64:  # exact enough in float64: -1e9 shifts the whole row, softmax ignores it
        ref13 = engine.scaled_dot_product_attention(q, k, v, backend="reference")[:, :, 13]
        np.testing.assert_allclose(out[:, :, 13], ref13, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_stays_within_stated_bound_of_float64_up_to_L_16384(causal):
    """float32 on the fastest float32 backend vs the float64 reference, L = S = 16384.

    Rows are independent, so the float64 oracle is computed on 128 sampled rows only (among them
    the first and the last, which in the causal case see 1 and 16384 keys).
    """
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    rng = np.random.default_rng(13)
    L = S = 16384
    q, k, v = (rng.standard_normal((1, 1, L, 32)).astype(np.float32) for _ in range(3))
    out = engine.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    rows = np.unique(np.concatenate([[0, L - 1], rng.choice(L, 126, replace=False)]))
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    s = (q64[0, 0, rows] @ k64[0, 0].T) / math.sqrt(32)
    if causal:
        s = np.where(np.arange(S)[None, :] <= rows[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p @ v64[0, 0]) / p.sum(-1, keepdims=True)
    err = np.abs(out[0, 0, rows] - ref).max() / np.abs(v64).max()
    assert np.all(np.isfinite(out))
    assert err <= LONG_F32_BOUND, f"float32 error {err:.3g} x max|v| exceeds the stated {LONG_F32_BOUND}"


def test_report_worst_error_ratios(capsys):
    """Not a check of its own: prints the worst error / tolerance ratio of this run (run it last,
    with ``-s``) so the margins in ``tests/tolerances.py`` can be re-measured."""
    from tolerances import WORST

    with capsys.disabled():
        for what, ratio in sorted(WORST.items()):
            print(f"\n  worst error/tolerance {what}: {ratio:.3g}", end="")
    assert all(r <= 1.0 for r in WORST.values())
