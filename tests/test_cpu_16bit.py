"""float16 and bfloat16 on the ``cpu`` backend: same semantics as float32, 16-bit outputs and lse.

Checked against the ``reference`` backend at the suite's tolerance model (16-bit unit roundoff),
with NumPy float16 and ml_dtypes bfloat16 arrays and torch tensors, masks (boolean, and float
masks in 16-bit or float32), causal, GQA and a mod; and against FlashAttention's accuracy rule:
the error against a float64 computation from the same 16-bit values at most twice torch's own
CPU error in that dtype.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import engine
from tests.tolerances import assert_out_close, lse_atol, out_atol

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), BF16]


def _qkv(rng, dtype, Hq=2, H=2, L=140, S=301, E=32, Ev=24):
    return (rng.standard_normal((1, Hq, L, E)).astype(dtype), rng.standard_normal((1, H, S, E)).astype(dtype),
            rng.standard_normal((1, H, S, Ev)).astype(dtype))


def _cases(rng, dtype):
    q, k, v = _qkv(rng, dtype)
    L, S = q.shape[2], k.shape[2]
    fmask = (rng.standard_normal((L, S)) * 2).astype(np.float32)
    fmask[:, ::7] = -np.inf
    qg, kg, vg = _qkv(rng, dtype, Hq=4, H=2)
    from variants.softcap import tanh_softcap

    return [("plain", q, k, v, {}), ("causal", q, k, v, {"is_causal": True}),
            ("bool mask", q, k, v, {"attn_mask": rng.random((L, S)) > 0.4}),
            ("16-bit float mask", q, k, v, {"attn_mask": fmask.astype(dtype)}),
            ("float32 mask", q, k, v, {"attn_mask": fmask}),
            ("gqa", qg, kg, vg, {"enable_gqa": True}),
            ("score_mod", q, k, v, {"score_mod": tanh_softcap, "mod_args": (np.float32(2.0),)})]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_16bit_matches_reference(dtype, rng):
    for name, q, k, v, kw in _cases(rng, dtype):
        out, lse = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, **kw)
        ref, ref_lse = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **kw)
        assert out.dtype == dtype and lse.dtype == dtype, (name, out.dtype, lse.dtype)
        mask = kw.get("attn_mask")
        assert_out_close(out, ref, out_atol(dtype, q, k, v, None, mask), f"{dtype} {name} out")
        assert_out_close(lse, ref_lse, lse_atol(dtype, q, k, None, mask), f"{dtype} {name} lse")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_16bit_tensors(dtype, rng):
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    q, k, v = (torch.from_numpy(a).to(tdt) for a in _qkv(rng, np.float32))
    out = engine.scaled_dot_product_attention(q, k, v, backend="cpu", is_causal=True)
    ref = engine.scaled_dot_product_attention(q, k, v, backend="reference", is_causal=True)
    assert out.dtype == ref.dtype == (BF16 if dtype == "bfloat16" else np.float16)
    qn, kn, vn = (x.float().numpy() for x in (q, k, v))
    assert_out_close(out, ref, out_atol(out.dtype, qn, kn, vn, None), f"torch {dtype}")


def _flash_rule_cases(rng, dtype):
    L = S = 256
    q, k, v = _qkv(rng, np.float32, L=L, S=S, E=64, Ev=64)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    fmask = rng.standard_normal((L, S)).astype(dtype)
    return [("plain", q, k, v, {}), ("causal", q, k, v, {"is_causal": True}),
            ("bool mask", q, k, v, {"attn_mask": rng.random((L, S)) > 0.5}),
            ("float mask", q, k, v, {"attn_mask": fmask})]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flash_attention_accuracy_rule_against_torch(dtype, rng):
    """max |engine - exact| <= 2 * max |torch - exact|, exact = float64 from the 16-bit values."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    np_dt = BF16 if dtype == "bfloat16" else np.dtype(np.float16)
    for name, q, k, v, kw in _flash_rule_cases(rng, np_dt):
        exact = engine.scaled_dot_product_attention(*(x.astype(np.float64) for x in (q, k, v)), backend="reference",
                                                    **{key: (val.astype(np.float64) if key == "attn_mask" and val.dtype != bool else val)
                                                       for key, val in kw.items()})
        ours = engine.scaled_dot_product_attention(q, k, v, backend="cpu", **kw).astype(np.float64)
        tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dtype)) for x in (q, k, v))
        tkw = dict(kw)
        if "attn_mask" in kw:
            m = kw["attn_mask"]
            tkw["attn_mask"] = torch.from_numpy(m) if m.dtype == bool else \
                torch.from_numpy(m.astype(np.float32)).to(getattr(torch, dtype))
        with torch.no_grad():
            theirs = F.scaled_dot_product_attention(tq, tk, tv, **tkw).float().numpy().astype(np.float64)
        err, torch_err = np.abs(ours - exact).max(), np.abs(theirs - exact).max()
        assert err <= 2 * torch_err, f"{dtype} {name}: engine error {err:.3g} > 2 x torch's {torch_err:.3g}"
