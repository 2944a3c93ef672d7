"""pytest-benchmark: every registered variant on every available backend, next to its baselines.

One benchmark group per shape: ``variants N=.. L=.. E=.. heads=..`` holds every variant on every
backend and each variant's ``torch.nn.MultiheadAttention`` with the same weights;
``sdpa N=.. heads=.. L=.. head_dim=..`` holds ``engine.scaled_dot_product_attention`` per backend,
plain NumPy (materialised scores) and torch's SDPA. The first call of every case (JIT compilation,
cache loading) happens before the timed rounds and is recorded as ``extra_info["first_call_s"]``,
with the shape, the operation count and ``gflops`` (from the median).

    pytest bench/ --benchmark-only                       # L = 128 .. 4096
    pytest bench/ --bench-size=smoke --benchmark-disable  # CI: every case once, outputs checked
"""

import time

import numpy as np
import pytest

import engine
from engine.benchmark import (
    as_torch_inputs,
    device_synchronizer,
    numpy_sdpa,
    sdpa_flop,
    torch_mha_forward,
    torch_mha_like,
    variant_flop,
)
from engine.plugins.registry import variant_info
from engine.problems.attention import validate_attention_args
from engine.variant import check_fits_in_memory

#: outputs are checked against the reference up to this length (the check costs another call)
CHECK_MAX_LENGTH = 512


def _group_variants(cfg, length):
    return f"variants N={cfg['batch']} L={length} E={cfg['embed_dim']} heads={cfg['heads']}"


def _group_sdpa(cfg, length):
    return f"sdpa N={cfg['batch']} heads={cfg['heads']} L={length} head_dim={cfg['embed_dim'] // cfg['heads']}"


def _make_variant(name, cfg):
    cls = variant_info()[0][name].cls
    params = cls.example_params(cfg["embed_dim"], cfg["heads"])
    try:
        return engine.get_variant(name, **params, seed=0)
    except TypeError:  # a plugin whose constructor takes no seed
        return engine.get_variant(name, **params)


def _bench(benchmark, fn, *, group, flop, budget=None, **shape):
    """Warm up (timed once, outside the rounds), then benchmark ``fn``; returns the warm-up output.

    ``budget`` is ``(call_budget, key)``: the case is skipped where it is predicted too slow, and
    its warm-up time is recorded for the next length.
    """
    if budget is not None:
        budget[0].check(budget[1], shape["L"])
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    if budget is not None:
        budget[0].record(budget[1], shape["L"], first)
    benchmark.group = group
    benchmark.extra_info.update(shape, flop=flop, first_call_s=first)
    benchmark(fn)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops"] = flop / benchmark.stats.stats.median / 1e9
    return out


def _materialised_fits(cfg, length, itemsize, copies, what):
    try:
        check_fits_in_memory(copies * cfg["batch"] * cfg["heads"] * length * length * itemsize, what)
    except MemoryError as exc:
        pytest.skip(str(exc))


def _call_or_skip(fn):
    """Run ``fn`` once; skip (with the backend's reasons) when the backend refuses the inputs."""
    try:
        return fn()
    except ValueError as exc:
        if "cannot run these inputs" in str(exc):
            pytest.skip(str(exc))
        raise


# ------------------------------------------------------------------------------------------------
# variants: each registered variant on each available backend, and torch's MHA with its weights
# ------------------------------------------------------------------------------------------------
def test_variant(benchmark, bench_config, call_budget, variant_name, backend, length):
    cfg = bench_config
    variant = _make_variant(variant_name, cfg)
    inputs = variant.example_inputs(cfg["batch"], length, rng=length)
    if backend == "reference":
        _materialised_fits(cfg, length, 8, 4, f"{variant_name} on the reference backend at L={length}")
    sync = device_synchronizer(backend)

    def call():
        out = variant(**inputs, backend=backend)[0]
        sync()
        return out

    call_budget.check(("variant", variant_name, backend), length)
    _call_or_skip(call)  # unsupported: skip before the benchmark fixture is used
    out = _bench(
        benchmark,
        call,
        group=_group_variants(cfg, length),
        flop=variant_flop(variant, inputs),
        budget=(call_budget, ("variant", variant_name, backend)),
        variant=variant_name,
        backend=backend,
        batch=cfg["batch"],
        L=length,
        S=length,
        embed_dim=cfg["embed_dim"],
        heads=getattr(variant, "num_heads", None),
    )
    out = np.asarray(out)
    assert out.shape[:2] == (cfg["batch"], length) and np.isfinite(out).all()
    if backend != "reference" and length <= CHECK_MAX_LENGTH:
        expected = variant(**inputs, backend="reference")[0]
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)


def test_variant_torch_mha(benchmark, bench_config, call_budget, variant_name, length):
    """Baseline: ``torch.nn.MultiheadAttention`` loaded with the variant's own weights."""
    pytest.importorskip("torch")
    cfg = bench_config
    variant = _make_variant(variant_name, cfg)
    mha, why = torch_mha_like(variant)
    if mha is None:
        pytest.skip(f"no torch equivalent: {why}")
    inputs = variant.example_inputs(cfg["batch"], length, rng=length)
    tin = as_torch_inputs(inputs)
    # causal or not: whichever reproduces the variant, checked on these inputs up to CHECK_MAX_LENGTH
    # (beyond it on the first CHECK_MAX_LENGTH positions, so the check stays cheap)
    check_length = min(length, CHECK_MAX_LENGTH)
    checked = inputs if length == check_length else variant.example_inputs(cfg["batch"], check_length, rng=length)
    expected = variant(**checked, backend="reference")[0]
    causal = next(
        (
            c
            for c in (False, True)
            if np.allclose(torch_mha_forward(mha, as_torch_inputs(checked), c).numpy(), expected, rtol=1e-3, atol=1e-4)
        ),
        None,
    )
    same = causal is not None
    out = _bench(
        benchmark,
        lambda: torch_mha_forward(mha, tin, bool(causal)).numpy(),
        group=_group_variants(cfg, length),
        flop=variant_flop(variant, inputs),
        variant=variant_name,
        budget=(call_budget, ("torch-mha", variant_name)),
        backend="torch-mha",
        batch=cfg["batch"],
        L=length,
        S=length,
        embed_dim=cfg["embed_dim"],
        heads=getattr(variant, "num_heads", None),
        same_function=same,
        same_function_checked_at_L=check_length,
        causal=bool(causal),
    )
    assert np.isfinite(out).all()
    if same and length == check_length:  # the layer benchmarked is the one that reproduced the variant
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# functional: engine.scaled_dot_product_attention per backend, plain NumPy, torch SDPA
# ------------------------------------------------------------------------------------------------
def _qkv(cfg, length):
    rng = np.random.default_rng(length)
    shape = (cfg["batch"], cfg["heads"], length, cfg["embed_dim"] // cfg["heads"])
    return tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(3))


def _sdpa_info(cfg, length, impl):
    head_dim = cfg["embed_dim"] // cfg["heads"]
    return dict(
        group=_group_sdpa(cfg, length),
        flop=sdpa_flop(cfg["batch"], cfg["heads"], length, length, head_dim),
        impl=impl,
        batch=cfg["batch"],
        heads=cfg["heads"],
        L=length,
        S=length,
        head_dim=head_dim,
    )


def test_sdpa(benchmark, bench_config, call_budget, backend, length):
    cfg = bench_config
    q, k, v = _qkv(cfg, length)
    if backend == "reference":
        _materialised_fits(cfg, length, 8, 4, f"the reference backend at L={length}")
    sync = device_synchronizer(backend)

    def call():
        out = engine.scaled_dot_product_attention(q, k, v, backend=backend)
        sync()
        return out

    call_budget.check(("sdpa", backend), length)
    _call_or_skip(call)
    out = np.asarray(
        _bench(benchmark, call, budget=(call_budget, ("sdpa", backend)), **_sdpa_info(cfg, length, backend))
    )
    assert out.shape == q.shape and np.isfinite(out).all()
    if length <= CHECK_MAX_LENGTH:
        np.testing.assert_allclose(
            out, numpy_sdpa(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)), rtol=1e-3, atol=1e-4
        )


def test_sdpa_numpy(benchmark, bench_config, call_budget, length):
    """Baseline: the textbook NumPy implementation, float32 scores materialised."""
    cfg = bench_config
    q, k, v = _qkv(cfg, length)
    _materialised_fits(cfg, length, 4, 2, f"plain NumPy at L={length}")
    out = _bench(
        benchmark, lambda: numpy_sdpa(q, k, v), budget=(call_budget, ("numpy",)), **_sdpa_info(cfg, length, "numpy")
    )
    assert out.shape == q.shape and np.isfinite(out).all()


def test_sdpa_torch(benchmark, bench_config, length):
    """Baseline: ``torch.nn.functional.scaled_dot_product_attention`` (same thread count)."""
    torch = pytest.importorskip("torch")
    cfg = bench_config
    q, k, v = _qkv(cfg, length)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

    def call():
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    out = _bench(benchmark, call, **_sdpa_info(cfg, length, "torch-sdpa")).numpy()
    assert out.shape == q.shape and np.isfinite(out).all()
    if length <= CHECK_MAX_LENGTH:
        np.testing.assert_allclose(out, numpy_sdpa(q, k, v), rtol=1e-3, atol=1e-4)


def test_sdpa_flop_matches_engine_problem(bench_config):
    """GFLOP/s in extra_info counts what the engine counts (AttentionProblem.flops)."""
    q, k, v = _qkv(bench_config, 16)
    assert (
        sdpa_flop(bench_config["batch"], bench_config["heads"], 16, 16, q.shape[-1])
        == validate_attention_args(q, k, v).flops
    )
