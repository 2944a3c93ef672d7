"""The catalogue of bad inputs: one test each, the error type and the words of its message.

Argument errors are raised by validation before any kernel runs, so they are tested in this
process. Everything that reaches a kernel or may allocate a lot (NaN and Inf in the data, empty
sizes, ``need_weights`` on a huge size) runs in a child process, so a segfault, an abort or an
out-of-memory kill fails the tests concerned instead of killing the run. The README's
Reliability table is this file's ``CATALOGUE`` and ``CHILD_CASES``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import engine

from conftest import HANG_TIMEOUT_S, TESTS, available_backends, variant_names

f = engine.scaled_dot_product_attention
Q = np.zeros((2, 4, 5, 8), np.float32)
K = np.zeros((2, 4, 7, 8), np.float32)
V = np.zeros((2, 4, 7, 6), np.float32)
BACKENDS = available_backends()
#: the child's import path: this test module and the shared helpers it imports
HERE = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), TESTS])


def _call(*args, **kwargs):
    return lambda: f(*args, **kwargs)


# (id, what goes in, call, exception type, regex the message must match)
CATALOGUE = [
    (
        "rank-1-query",
        "query of rank 1",
        _call(np.zeros(8, np.float32), K, V),
        ValueError,
        r"query must have at least 2 dimensions .* got shape \(8,\)",
    ),
    (
        "rank-0-query",
        "query a 0-d array",
        _call(np.float32(1.0), K, V),
        ValueError,
        r"query must have at least 2 dimensions .* got shape \(\)",
    ),
    (
        "batch-mismatch",
        "a batch size that does not broadcast in key/value",
        _call(Q, np.zeros((3, 4, 7, 8), np.float32), np.zeros((3, 4, 7, 6), np.float32)),
        ValueError,
        r"batch dimensions of query, key and value must broadcast \(as torch.matmul\), got shapes "
        r"query=\(2, 4, 5, 8\), key=\(3, 4, 7, 8\)",
    ),
    (
        "rank-mismatch-no-broadcast",
        "key of another rank whose batch does not broadcast",
        _call(np.zeros((2, 3, 4, 5, 8), np.float32), K, V),
        ValueError,
        r"batch dimensions of query, key and value must broadcast",
    ),
    (
        "heads-mismatch",
        "other head count, no enable_gqa",
        _call(Q, K[:, :2], V[:, :2]),
        ValueError,
        r"query has 4 heads but key/value have 2; pass enable_gqa=True",
    ),
    (
        "kv-heads-mismatch",
        "key and value head counts differ",
        _call(Q, K, V[:, :2]),
        ValueError,
        r"key and value must have the same number of heads \(or one of them 1\), got key=\(2, 4, 7, 8\), "
        r"value=\(2, 2, 7, 6\)",
    ),
    (
        "gqa-not-dividing",
        "enable_gqa with 4 query heads, 3 kv heads",
        _call(Q, K[:, :3], V[:, :3], enable_gqa=True),
        ValueError,
        r"multiple of the key/value head count, got 4 and 3",
    ),
    (
        "E-mismatch",
        "key feature size differs from query's",
        _call(Q, K[..., :4], V),
        ValueError,
        r"same feature size E, got query=\(2, 4, 5, 8\), key=\(2, 4, 7, 4\)",
    ),
    (
        "S-mismatch",
        "value length differs from key's",
        _call(Q, K, V[:, :, :6]),
        ValueError,
        r"same sequence length S, got key=\(2, 4, 7, 8\), value=\(2, 4, 6, 6\)",
    ),
    (
        "int-array",
        "int32 query",
        _call(Q.astype(np.int32), K, V),
        TypeError,
        r"query must have a floating dtype .* got int32 with shape \(2, 4, 5, 8\)",
    ),
    (
        "bool-array",
        "boolean value",
        _call(Q, K, V.astype(bool)),
        TypeError,
        r"value must have a floating dtype .* got bool",
    ),
    (
        "complex-array",
        "complex64 key",
        _call(Q, K.astype(np.complex64), V),
        TypeError,
        r"key must have a floating dtype .* got complex64",
    ),
    (
        "object-array",
        "object array of floats",
        _call(Q.astype(object), K, V),
        TypeError,
        r"query must have a floating dtype .* got object",
    ),
    (
        "string-array",
        "array of strings",
        _call(np.full((5, 8), "x"), K[0, 0], V[0, 0]),
        TypeError,
        r"query must have a floating dtype .* got <U1",
    ),
    (
        "ragged-list",
        "ragged nested list",
        _call([[1.0, 2.0], [3.0]], K, V),
        TypeError,
        r"query could not be converted to an array",
    ),
    ("none-array", "key=None", _call(Q, None, V), TypeError, r"key must be an array, got None"),
    (
        "mixed-dtypes",
        "float32 query, float64 value",
        _call(Q, K, V.astype(np.float64)),
        TypeError,
        r"share one dtype, got float32, float32, float64",
    ),
    (
        "mask-not-broadcastable",
        "attn_mask (3, 5, 7) for scores (2, 4, 5, 7)",
        _call(Q, K, V, attn_mask=np.zeros((3, 5, 7), bool)),
        ValueError,
        r"attn_mask of shape \(3, 5, 7\) is not broadcastable to the score shape \(2, 4, 5, 7\)",
    ),
    (
        "mask-too-many-dims",
        "attn_mask of rank 5 for rank-4 inputs",
        _call(Q, K, V, attn_mask=np.zeros((1, 2, 4, 5, 7), bool)),
        ValueError,
        r"attn_mask of shape \(1, 2, 4, 5, 7\) is not broadcastable",
    ),
    (
        "mask-int",
        "int64 attn_mask",
        _call(Q, K, V, attn_mask=np.zeros((5, 7), np.int64)),
        TypeError,
        r"attn_mask must be boolean .* got dtype int64",
    ),
    (
        "mask-complex",
        "complex attn_mask",
        _call(Q, K, V, attn_mask=np.zeros((5, 7), complex)),
        TypeError,
        r"attn_mask must be boolean .* got dtype complex128",
    ),
    (
        "mask-string",
        "attn_mask of strings",
        _call(Q, K, V, attn_mask=np.full((5, 7), "y")),
        TypeError,
        r"attn_mask must be boolean .* got dtype <U1",
    ),
    (
        "mask-object",
        "object attn_mask",
        _call(Q, K, V, attn_mask=np.ones((5, 7), object)),
        TypeError,
        r"attn_mask must be boolean .* got dtype object",
    ),
    (
        "causal-and-mask",
        "is_causal=True with attn_mask",
        _call(Q, K, V, attn_mask=np.ones((5, 7), bool), is_causal=True),
        ValueError,
        r"either attn_mask or is_causal",
    ),
    (
        "is_causal-not-bool",
        "is_causal='yes'",
        _call(Q, K, V, is_causal="yes"),
        TypeError,
        r"is_causal must be a bool, got str",
    ),
    ("scale-nan", "scale=nan", _call(Q, K, V, scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    ("scale-inf", "scale=inf", _call(Q, K, V, scale=float("inf")), ValueError, r"scale must be finite, got inf"),
    (
        "scale-minus-inf",
        "scale=-inf (numpy float32)",
        _call(Q, K, V, scale=np.float32("-inf")),
        ValueError,
        r"scale must be finite, got -inf",
    ),
    (
        "query-masked-array",
        "query=np.ma.masked_array(...)",
        _call(np.ma.masked_array(Q, mask=np.zeros(Q.shape, bool)), K, V),
        TypeError,
        r"query is a numpy.ma.MaskedArray \(shape \(2, 4, 5, 8\)\): its mask would be ignored",
    ),
    (
        "mask-masked-array",
        "attn_mask=np.ma.masked_array(...)",
        _call(Q, K, V, attn_mask=np.ma.masked_array(np.ones((5, 7), bool))),
        TypeError,
        r"attn_mask is a numpy.ma.MaskedArray",
    ),
    (
        "scale-huge-int",
        "scale=10**400 (a Python int past float64)",
        _call(Q, K, V, scale=10**400),
        ValueError,
        r"scale must be finite, got an integer of 1329 bits",
    ),
    (
        "dropout-huge-int",
        "dropout_p=-(10**400)",
        _call(Q, K, V, dropout_p=-(10**400)),
        ValueError,
        r"dropout_p must be between 0 and 1, got a negative integer of 1329 bits",
    ),
    (
        "scale-string",
        "scale='big'",
        _call(Q, K, V, scale="big"),
        TypeError,
        r"scale must be a real number or None, got str",
    ),
    (
        "scale-bool",
        "scale=True",
        _call(Q, K, V, scale=True),
        TypeError,
        r"scale must be a real number or None, got bool",
    ),
    (
        "return_lse-not-bool",
        "return_lse=1",
        _call(Q, K, V, return_lse=1),
        TypeError,
        r"return_lse must be a bool, got int",
    ),
    (
        "unknown-backend",
        "backend='tpu'",
        _call(Q, K, V, backend="tpu"),
        ValueError,
        r"unknown backend 'tpu'; available: auto, .*cpu.*reference",
    ),
    ("backend-not-a-string", "backend=3", _call(Q, K, V, backend=3), ValueError, r"unknown backend 3"),
    (
        "backend-cannot-run",
        "E = 0 on backend='cpu'",
        _call(Q[..., :0], K[..., :0], V, scale=1.0, backend="cpu"),
        ValueError,
        r"backend 'cpu' cannot run these inputs: E = 0",
    ),
    (
        "E-zero-default-scale",
        "E = 0 without scale",
        _call(Q[..., :0], K[..., :0], V),
        ValueError,
        r"default scale 1/sqrt\(E\) needs E >= 1",
    ),
    (
        "unknown-variant",
        "get_variant('nope')",
        lambda: engine.get_variant("nope"),
        ValueError,
        r"unknown variant 'nope'; available: .*multi-head",
    ),
    (
        "unknown-backend-variant",
        "variant called with backend='tpu'",
        lambda: engine.get_variant("multi-head", embed_dim=8, num_heads=2)(
            np.zeros((1, 3, 8), np.float32), backend="tpu"
        ),
        ValueError,
        r"unknown backend 'tpu'",
    ),
    (
        "variant-int-input",
        "int64 input to a variant",
        lambda: engine.get_variant("multi-head", embed_dim=8, num_heads=2)(np.zeros((1, 3, 8), np.int64)),
        TypeError,
        r"query must be floating, got dtype int64",
    ),
    (
        "variant-rank-4-input",
        "rank-4 input to a variant",
        lambda: engine.get_variant("multi-head", embed_dim=8, num_heads=2)(np.zeros((1, 1, 3, 8), np.float32)),
        ValueError,
        r"query must be \(N, L, features\) or unbatched \(L, features\), got shape \(1, 1, 3, 8\)",
    ),
    (
        "variant-bad-embed-dim",
        "embed_dim=0",
        lambda: engine.get_variant("multi-head", embed_dim=0, num_heads=1),
        ValueError,
        r"embed_dim must be a positive int, got 0",
    ),
    (
        "variant-bad-dtype",
        "dtype=int32",
        lambda: engine.get_variant("multi-head", embed_dim=8, num_heads=2, dtype=np.int32),
        TypeError,
        r"dtype must be float16, bfloat16, float32 or float64, got int32",
    ),
    (
        "variant-mask-int",
        "int key_padding_mask",
        lambda: engine.get_variant("multi-head", embed_dim=8, num_heads=2)(
            np.zeros((1, 3, 8), np.float32), key_padding_mask=np.zeros((1, 3), np.int64)
        ),
        TypeError,
        r"key_padding_mask must be boolean .* got dtype int64",
    ),
    (
        "set-num-threads-0",
        "engine.set_num_threads(0)",
        lambda: engine.set_num_threads(0),
        ValueError,
        r"num_threads must be an int in 1\.\.",
    ),
]


@pytest.mark.parametrize("entry", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_argument(entry):
    _, _, call, exc, match = entry
    for _ in range(2):  # the second call meets whatever the first cached
        with pytest.raises(exc, match=match):
            call()


def test_masked_arrays_are_refused_by_variants_too():
    v = engine.get_variant("multi-head", embed_dim=16, num_heads=2)
    x = np.ones((1, 4, 16), np.float32)
    for _ in range(2):
        with pytest.raises(TypeError, match=r"query is a numpy.ma.MaskedArray \(shape \(1, 4, 16\)\)"):
            v(np.ma.masked_array(x), x, x)
    state = v.state_dict()
    state["in_proj_weight"] = np.ma.masked_array(state["in_proj_weight"])
    with pytest.raises(TypeError, match=r"state_dict\['in_proj_weight'\] is a numpy.ma.MaskedArray"):
        v.load_state_dict(state)


def test_enable_gqa_not_bool():
    with pytest.raises(TypeError, match="enable_gqa must be a bool"):
        f(Q, K, V, enable_gqa="no")


# -- state_dict, for every registered variant ----------------------------------------------------


def _variant(name):
    from engine.plugins.registry import variant_info

    return engine.get_variant(name, **variant_info()[0][name].cls.example_params(8, 2), seed=0)


def _unchanged(v, before):
    after = v.state_dict()
    return after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("name", variant_names())
def test_state_dict_wrong_keys(name):
    v = _variant(name)
    good = v.state_dict()
    first = sorted(good)[0]
    with pytest.raises(ValueError, match=rf"missing keys \['{first}'\] and unexpected keys \['bogus'\]"):
        v.load_state_dict({**{k: a for k, a in good.items() if k != first}, "bogus": good[first]})
    assert _unchanged(v, good)


@pytest.mark.parametrize("name", variant_names())
def test_state_dict_wrong_shape(name):
    v = _variant(name)
    good = v.state_dict()
    key = sorted(good)[-1]
    bad = np.zeros(good[key].shape + (2,), np.float32)
    with pytest.raises(
        ValueError,
        match=rf"state_dict\['{key}'\] has shape {bad.shape}, expected".replace("(", r"\(").replace(")", r"\)"),
    ):
        v.load_state_dict({**good, key: bad})
    assert _unchanged(v, good)


@pytest.mark.parametrize("name", variant_names())
@pytest.mark.parametrize("dtype", [np.int64, np.complex64, bool, object])
def test_state_dict_wrong_dtype(name, dtype):
    v = _variant(name)
    good = v.state_dict()
    key = sorted(good)[0]
    with pytest.raises(TypeError, match=rf"state_dict\['{key}'\] must be floating, got dtype"):
        v.load_state_dict({**good, key: good[key].astype(dtype)})
    assert _unchanged(v, good)


@pytest.mark.parametrize("name", variant_names())
def test_state_dict_not_a_mapping(name):
    v = _variant(name)
    with pytest.raises(TypeError, match="state_dict must be a mapping, got list"):
        v.load_state_dict(list(v.state_dict().items()))


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "the following arguments are required"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["list", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "--batch", "0"], "argument --batch: expected a positive integer, got 0"),
        (["bench", "--lengths", "a,b"], "argument --lengths: lengths must be comma-separated integers"),
        (["bench", "--heads", "-3"], "argument --heads: expected a positive integer, got -3"),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else None,
)
def test_bad_cli_arguments_exit_2_with_usage(argv, message, capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--variants", "nope", "--lengths", "8"], "unknown variant(s) nope; available:"),
        (["bench", "--backends", "tpu", "--lengths", "8"], "unknown backend 'tpu'; available:"),
        (
            ["bench", "--embed-dim", "10", "--heads", "3", "--lengths", "8"],
            "--embed-dim (10) must be divisible by --heads (3)",
        ),
    ],
)
def test_bad_cli_values_return_2(argv, message, capsys):
    from engine.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["list"], ["bench", "--lengths", "8"]])
def test_a_bad_gemm_environment_variable_is_a_usage_error(argv, monkeypatch, capsys):
    from engine.cli import main

    monkeypatch.setenv("ATTENTION_ENGINE_GEMM", "bogus")
    assert main(argv) == 2
    assert "attention-engine: error: ATTENTION_ENGINE_GEMM='bogus': GEMM provider must be" in capsys.readouterr().err


# -- cases that reach a kernel: run in a child process -------------------------------------------


def _data(seed=0, shape=(2, 2, 70, 16), S=300, Ev=5, dtype=np.float32):
    rng = np.random.default_rng(seed)
    B, H, L, E = shape
    return (
        rng.standard_normal(shape).astype(dtype),
        rng.standard_normal((B, H, S, E)).astype(dtype),
        rng.standard_normal((B, H, S, Ev)).astype(dtype),
    )


def _rows_report(out, base, expected_rows, *, all_nan=True):
    """Facts about which output rows went non-finite and whether the others changed at all."""
    bad = ~np.isfinite(out).all(-1)
    expected = np.zeros(bad.shape, bool)
    expected[expected_rows] = True
    rows_nan_everywhere = bool(np.isnan(out[expected]).all()) if all_nan else bool((~np.isfinite(out[expected])).all())
    return {
        "nonfinite_rows_are_expected": bool(np.array_equal(bad, expected)),
        "n_nonfinite": int(bad.sum()),
        "n_expected": int(expected.sum()),
        "expected_rows_entirely_nonfinite": rows_nan_everywhere,
        "other_rows_bitwise_unchanged": bool(np.array_equal(out[~expected], base[~expected])),
    }


def _case_nan_query_row(backend):
    q, k, v = _data()
    base = f(q, k, v, backend=backend)
    q[1, 0, 33, 4] = np.nan
    out, lse = f(q, k, v, backend=backend, return_lse=True)
    return {**_rows_report(out, base, (1, 0, 33)), "lse_nan": bool(np.isnan(lse[1, 0, 33]))}


def _case_nan_key_row_causal(backend):
    q, k, v = _data(shape=(2, 2, 300, 16))
    base = f(q, k, v, is_causal=True, backend=backend)
    k[0, 1, 200, 3] = np.nan  # rows 200.. of head 1 see key 200
    return _rows_report(f(q, k, v, is_causal=True, backend=backend), base, (0, 1, slice(200, None)))


def _mask_column(rng, L, S, j):
    allowed = rng.random((L, S)) < 0.5
    allowed[:, 0] = True
    allowed[:, j] = rng.random(L) < 0.5
    return allowed


def _case_nan_key_row_bool_mask(backend):
    q, k, v = _data()
    allowed = _mask_column(np.random.default_rng(1), 70, 300, 123)
    base = f(q, k, v, attn_mask=allowed, backend=backend)
    k[1, 1, 123, 0] = np.nan
    out = f(q, k, v, attn_mask=allowed, backend=backend)
    return _rows_report(out, base, (1, 1, np.flatnonzero(allowed[:, 123])))


def _case_nan_key_row_float_mask(backend):
    q, k, v = _data()
    allowed = _mask_column(np.random.default_rng(1), 70, 300, 123)
    fmask = np.where(allowed, 0.0, -np.inf).astype(np.float32)
    base = f(q, k, v, attn_mask=fmask, backend=backend)
    k[1, 1, 123, 0] = np.nan
    out = f(q, k, v, attn_mask=fmask, backend=backend)
    return _rows_report(out, base, (1, 1, np.flatnonzero(allowed[:, 123])))


def _case_nan_value_row_unmasked(backend):
    q, k, v = _data()
    base = f(q, k, v, backend=backend)
    v[0, 1, 250, 2] = np.nan  # every row of (0, 1) attends to key 250
    return _rows_report(f(q, k, v, backend=backend), base, (0, 1), all_nan=False)


def _case_nan_value_row_bool_mask(backend):
    q, k, v = _data()
    allowed = _mask_column(np.random.default_rng(2), 70, 300, 77)
    base = f(q, k, v, attn_mask=allowed, backend=backend)
    v[0, 0, 77, 1] = np.nan
    out = f(q, k, v, attn_mask=allowed, backend=backend)
    return _rows_report(out, base, (0, 0, np.flatnonzero(allowed[:, 77])), all_nan=False)


def _case_nan_value_row_causal(backend):
    q, k, v = _data(shape=(2, 2, 300, 16))
    base = f(q, k, v, is_causal=True, backend=backend)
    v[1, 0, 150, 0] = np.nan
    out = f(q, k, v, is_causal=True, backend=backend)
    return _rows_report(out, base, (1, 0, slice(150, None)), all_nan=False)


def _case_inf_query_row(backend):
    q, k, v = _data()
    base = f(q, k, v, backend=backend)
    q[0, 1, 5, 0] = np.inf
    return _rows_report(f(q, k, v, backend=backend), base, (0, 1, 5), all_nan=False)


def _case_inf_key_row_bool_mask(backend):
    q, k, v = _data()
    allowed = _mask_column(np.random.default_rng(3), 70, 300, 42)
    base = f(q, k, v, attn_mask=allowed, backend=backend)
    k[0, 0, 42, :] = np.inf
    out = f(q, k, v, attn_mask=allowed, backend=backend)
    blind = ~allowed[:, 42]  # rows that do not see key 42 must not change; the others may
    unchanged = (
        np.array_equal(np.delete(out, 0, axis=1), np.delete(base, 0, axis=1))
        and np.array_equal(out[:, 0][:, blind], base[:, 0][:, blind])
        and np.array_equal(out[1], base[1])
    )
    return {"other_rows_bitwise_unchanged": bool(unchanged)}


def _case_inf_value_row_bool_mask(backend):
    q, k, v = _data()
    allowed = _mask_column(np.random.default_rng(4), 70, 300, 99)
    base = f(q, k, v, attn_mask=allowed, backend=backend)
    v[1, 1, 99, 3] = np.inf
    out = f(q, k, v, attn_mask=allowed, backend=backend)
    return _rows_report(out, base, (1, 1, np.flatnonzero(allowed[:, 99])), all_nan=False)


def _case_nan_in_float_mask_entry(backend):
    q, k, v = _data()
    fmask = np.zeros((70, 300), np.float32)
    base = f(q, k, v, attn_mask=fmask, backend=backend)
    fmask[12, 7] = np.nan  # every (batch, head) row 12 adds it
    out = f(q, k, v, attn_mask=fmask, backend=backend)
    return _rows_report(out, base, (slice(None), slice(None), 12))


def _case_empty_L(backend):
    q, k, v = _data(shape=(2, 2, 0, 16))
    out, lse = f(q, k, v, backend=backend, return_lse=True)
    return {"out_shape": list(out.shape), "lse_shape": list(lse.shape), "dtype": str(out.dtype)}


def _case_empty_S(backend):
    q, k, v = _data(S=0)
    out, lse = f(q, k, v, backend=backend, return_lse=True)
    return {
        "out_shape": list(out.shape),
        "all_zero": bool(np.all(out == 0)),
        "lse_all_minus_inf": bool(np.all(np.isneginf(lse))),
        "dtype": str(out.dtype),
    }


def _case_empty_S_with_mask(backend):
    q, k, v = _data(S=0)
    out = f(q, k, v, attn_mask=np.ones((70, 0), bool), backend=backend)
    return {"out_shape": list(out.shape), "all_zero": bool(np.all(out == 0))}


def _case_empty_batch_and_heads(backend):
    shapes = []
    for shape in ((0, 2, 70, 16), (2, 0, 70, 16)):
        q, k, v = _data(shape=shape)
        shapes.append(list(f(q, k, v, backend=backend).shape))
    return {"shapes": shapes}


def _case_E_zero_with_scale(backend):
    q, k, v = _data(shape=(1, 2, 9, 0), S=11)
    try:
        out = f(q, k, v, scale=1.0, backend=backend)
    except ValueError as exc:
        return {"refused": str(exc)}
    return {"uniform_mean_of_v": bool(np.allclose(out, v.mean(axis=2, keepdims=True), atol=1e-6))}


def _case_need_weights_too_large(backend):
    import tracemalloc

    mh = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=0)
    x = np.zeros((1, 200_000, 8), np.float32)  # weights would be 2 x 200000^2 x 8 bytes
    tracemalloc.start()
    try:
        mh(x, need_weights=True, backend=backend)
        result = {"error": None}
    except MemoryError as exc:
        result = {"error": "MemoryError", "message": str(exc)}
    result["peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result


CHILD_CASES = {name[len("_case_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("_case_")}

_CHILD = """
import json, os, sys
sys.path[:0] = sys.argv[1].split(os.pathsep)
import test_bad_inputs as m
for spec in sys.argv[2:]:
    name, backend = spec.split("@")
    print(json.dumps({"start": spec}), flush=True)
    try:
        res = {"result": m.CHILD_CASES[name](backend)}
    except BaseException as exc:
        res = {"raised": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({"case": spec, **res}), flush=True)
"""


@pytest.fixture(scope="module")
def child_results():
    """Run every child case in one child process; if the child dies (a signal or any exit), the
    case it was running is recorded as crashed and the rest continue in a fresh child."""
    todo = [f"{name}@{b}" for name in CHILD_CASES for b in BACKENDS]
    results = {}
    while todo:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, HERE, *todo],
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT_S,
            env=dict(os.environ, PYTHONFAULTHANDLER="1"),
        )
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["case"]] = msg
                started = None
        if started is None and proc.returncode == 0:
            break
        crashed = started or todo[len(results)]
        results[crashed] = {"crashed": f"child exited with {proc.returncode}; stderr tail: {proc.stderr[-2000:]}"}
        todo = todo[todo.index(crashed) + 1 :]
    return results


def _result(child_results, name, backend):
    msg = child_results.get(f"{name}@{backend}")
    assert msg is not None, f"case {name}@{backend} never ran"
    assert "crashed" not in msg, msg["crashed"]
    assert "raised" not in msg, msg["raised"]
    return msg["result"]


def _assert_rows(r):
    assert r["nonfinite_rows_are_expected"], r
    assert r["expected_rows_entirely_nonfinite"], r
    assert r["other_rows_bitwise_unchanged"], r


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_query_row_gives_nan_in_that_row_only(child_results, backend):
    r = _result(child_results, "nan_query_row", backend)
    _assert_rows(r)
    assert r["n_expected"] == 1 and r["lse_nan"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_key_gives_nan_in_rows_that_see_it_causal(child_results, backend):
    _assert_rows(_result(child_results, "nan_key_row_causal", backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_key_gives_nan_in_rows_that_see_it_bool_mask(child_results, backend):
    _assert_rows(_result(child_results, "nan_key_row_bool_mask", backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_key_gives_nan_in_rows_that_see_it_float_mask(child_results, backend):
    _assert_rows(_result(child_results, "nan_key_row_float_mask", backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_value_gives_nan_in_every_row_that_attends(child_results, backend):
    r = _result(child_results, "nan_value_row_unmasked", backend)
    assert r["nonfinite_rows_are_expected"] and r["other_rows_bitwise_unchanged"], r


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_value_leaves_rows_that_do_not_attend_bool_mask(child_results, backend):
    r = _result(child_results, "nan_value_row_bool_mask", backend)
    assert r["nonfinite_rows_are_expected"] and r["other_rows_bitwise_unchanged"], r


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_value_leaves_rows_that_do_not_attend_causal(child_results, backend):
    r = _result(child_results, "nan_value_row_causal", backend)
    assert r["nonfinite_rows_are_expected"] and r["other_rows_bitwise_unchanged"], r


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_in_query_row_changes_that_row_only(child_results, backend):
    r = _result(child_results, "inf_query_row", backend)
    assert r["nonfinite_rows_are_expected"] and r["other_rows_bitwise_unchanged"], r


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_in_key_leaves_rows_that_do_not_see_it(child_results, backend):
    assert _result(child_results, "inf_key_row_bool_mask", backend)["other_rows_bitwise_unchanged"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_in_value_leaves_rows_that_do_not_attend(child_results, backend):
    r = _result(child_results, "inf_value_row_bool_mask", backend)
    assert r["nonfinite_rows_are_expected"] and r["other_rows_bitwise_unchanged"], r


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_float_mask_entry_gives_nan_in_that_row_only(child_results, backend):
    _assert_rows(_result(child_results, "nan_in_float_mask_entry", backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_L_zero_gives_empty_output(child_results, backend):
    r = _result(child_results, "empty_L", backend)
    assert r == {"out_shape": [2, 2, 0, 5], "lse_shape": [2, 2, 0], "dtype": "float32"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_S_zero_gives_zeros_and_lse_minus_inf(child_results, backend):
    r = _result(child_results, "empty_S", backend)
    assert r == {"out_shape": [2, 2, 70, 5], "all_zero": True, "lse_all_minus_inf": True, "dtype": "float32"}
    assert _result(child_results, "empty_S_with_mask", backend) == {"out_shape": [2, 2, 70, 5], "all_zero": True}


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_batch_or_heads_give_empty_output(child_results, backend):
    assert _result(child_results, "empty_batch_and_heads", backend) == {"shapes": [[0, 2, 70, 5], [2, 0, 70, 5]]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_E_zero_is_uniform_attention_or_a_named_refusal(child_results, backend):
    r = _result(child_results, "E_zero_with_scale", backend)
    if "refused" in r:
        assert f"backend '{backend}' cannot run these inputs: E = 0" in r["refused"], r
    else:
        assert r["uniform_mean_of_v"], r


@pytest.mark.parametrize("backend", BACKENDS)
def test_need_weights_too_large_is_memory_error_before_allocating(child_results, backend):
    r = _result(child_results, "need_weights_too_large", backend)
    assert r["error"] == "MemoryError", r
    assert "need_weights=True for (N, heads, L, S) = (1, 2, 200000, 200000) would need" in r["message"]
    assert r["peak_mb"] < 64, r  # the inputs are 6 MiB: nothing of size L x S was allocated
