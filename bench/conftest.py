"""Configuration of the pytest-benchmark suite: sizes, threads, and extra plugins to compare.

Sizes: ``--bench-size=smoke|quick|default|full`` or the environment variable
``ATTENTION_BENCH_SIZE`` (the option wins). ``smoke`` runs every case once on tiny inputs, for CI:
``pytest bench/ --bench-size=smoke --benchmark-disable``.

Threads: the engine, NumPy's BLAS and torch all use ``ATTENTION_BENCH_THREADS`` threads (default:
Numba's ``NUMBA_NUM_THREADS``, i.e. every core). BLAS reads its count from the environment when
NumPy is first imported, which is why this file sets it before importing NumPy.

Variants and backends are read from the registry when tests are collected: an installed plugin
appears without editing anything, and so does one returned by :func:`bench_plugins` below.
"""

import os
import sys

_THREADS = os.environ.get("ATTENTION_BENCH_THREADS")
if _THREADS:
    if "numpy" in sys.modules:
        import warnings

        warnings.warn(
            "ATTENTION_BENCH_THREADS: NumPy was imported before bench/conftest.py, so its BLAS "
            "keeps its own thread count",
            RuntimeWarning,
        )
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _THREADS

import pytest  # noqa: E402

import engine  # noqa: E402
from engine.benchmark import available_backends, predicted_skip  # noqa: E402

#: shapes per size: sequence lengths L (= S), batch N, embed_dim E, heads (sdpa head_dim = E / heads)
SIZES = {
    # smoke checks that every case runs: no case is ever skipped as too slow (max_call_s inf)
    "smoke": {"lengths": [16, 64], "batch": 1, "embed_dim": 32, "heads": 2, "max_call_s": float("inf")},
    "quick": {"lengths": [128, 512], "batch": 2, "embed_dim": 256, "heads": 4},
    "default": {"lengths": [128, 256, 512, 1024, 2048, 4096], "batch": 2, "embed_dim": 256, "heads": 4},
    "full": {"lengths": [128, 256, 512, 1024, 2048, 4096, 8192], "batch": 2, "embed_dim": 256, "heads": 4},
}


def bench_plugins():
    """Plugins to benchmark besides the installed ones (entry points are picked up by themselves).

    Return plugin objects or modules, for example::

        from my_package import my_plugin
        return [my_plugin]

    They are registered with ``engine.register_plugin`` before collection, so their variants get
    the same tests, groups and baselines as the built-in ones.
    """
    return []


def pytest_addoption(parser):
    group = parser.getgroup("attention-engine benchmarks")
    group.addoption(
        "--bench-max-call-s",
        type=float,
        default=None,
        metavar="SECONDS",
        help="skip a case at the lengths where one call would take longer, predicted "
        "quadratically from its previous length (default: $ATTENTION_BENCH_MAX_CALL_S, "
        "or 5; never with --bench-size=smoke; 0 or inf: never skip)",
    )
    group.addoption(
        "--bench-size",
        choices=sorted(SIZES),
        default=None,
        help="sizes to benchmark: smoke (CI, seconds), quick, default (L = 128..4096), full "
        "(L up to 8192); default: $ATTENTION_BENCH_SIZE or 'default'",
    )


def pytest_configure(config):
    size = config.getoption("--bench-size") or os.environ.get("ATTENTION_BENCH_SIZE") or "default"
    if size not in SIZES:
        raise pytest.UsageError(f"ATTENTION_BENCH_SIZE must be one of {', '.join(sorted(SIZES))}, got {size!r}")
    threads = int(_THREADS) if _THREADS else None
    engine.set_num_threads(threads)
    threads = engine.get_num_threads()
    try:
        import torch

        torch.set_num_threads(threads)  # torch defaults to physical cores; match the engine
    except ImportError:
        pass
    max_call_s = config.getoption("--bench-max-call-s")
    if max_call_s is None:
        max_call_s = float(os.environ.get("ATTENTION_BENCH_MAX_CALL_S", SIZES[size].get("max_call_s", 5)))
    config._attention_bench = {"size": size, "threads": threads, **SIZES[size], "max_call_s": max_call_s}
    config._attention_bench_plugins = [engine.register_plugin(p) for p in bench_plugins()]


def pytest_unconfigure(config):
    for name in getattr(config, "_attention_bench_plugins", ()):
        engine.unregister_plugin(name)


def pytest_report_header(config):
    cfg = getattr(config, "_attention_bench", None)
    if cfg:
        return (
            f"attention-engine bench: size={cfg['size']} lengths={cfg['lengths']} N={cfg['batch']} "
            f"E={cfg['embed_dim']} heads={cfg['heads']} threads={cfg['threads']}; variants "
            f"{engine.list_variants()}; backends {available_backends()}"
        )


def pytest_generate_tests(metafunc):
    """Parametrise from the registries at collection time."""
    cfg = metafunc.config._attention_bench
    if "variant_name" in metafunc.fixturenames:
        metafunc.parametrize("variant_name", engine.list_variants())
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", available_backends())
    if "length" in metafunc.fixturenames:
        metafunc.parametrize("length", cfg["lengths"], ids=[f"L{n}" for n in cfg["lengths"]])


@pytest.fixture
def bench_config(request):
    """The size configuration of this run (lengths, batch, embed_dim, heads, threads)."""
    return request.config._attention_bench


class CallBudget:
    """Skips a case at a length where one call is predicted to exceed ``max_call_s``.

    The prediction is the case's warm-up time at its previous length, scaled by the square of the
    length ratio (the materialising paths are quadratic). Without it the default sizes would spend
    many minutes on a slow path at L = 4096 (5 rounds at least).
    """

    def __init__(self, max_call_s: float):
        self.max_call_s = max_call_s
        self.seen: dict = {}

    def check(self, key, length: int) -> None:
        if key in self.seen:
            prev_length, seconds = self.seen[key]
            why = predicted_skip(seconds, prev_length, length, self.max_call_s)
            if why:
                pytest.skip(why.replace("--max-call-s", "--bench-max-call-s"))

    def record(self, key, length: int, seconds: float) -> None:
        self.seen[key] = (length, seconds)


@pytest.fixture(scope="session")
def call_budget(request):
    return CallBudget(request.config._attention_bench["max_call_s"])
