"""Shared fixtures. Backends and variants are parametrised from the registries, so a newly
registered one is tested without editing the tests.

No test may depend on the machine's speed or load. Two rules serve that here:

* BLAS and OpenMP threads are pinned per test process to the cores divided among the pytest-xdist
  workers (OpenBLAS's threads spin while they wait: two workers each running a 2-thread BLAS on 2
  cores ran NumPy at 0.1 GFLOP/s). Child processes inherit the limits through the environment.
* A child process gets :data:`HANG_TIMEOUT_S`, which only turns a hang into a failure: it is far
  beyond what any child takes on a machine many times slower than the development machines.
"""

import os
import textwrap

# the cpu backend's measured tiles and GEMM provider (engine.runtime.tuning) depend on this machine
# and on what earlier runs stored: the suite runs the fixed rules, and tests/forward/test_cpu_prefill.py
# turns tuning on where it tests it (child processes inherit this)
os.environ["ATTENTION_ENGINE_AUTOTUNE"] = "0"

import numpy as np
import pytest
import threadpoolctl

import engine
from engine.kernels.specialise import CACHED_MODS_ENV

from hang_guard import pytest_collection, pytest_exception_interact, pytest_sessionfinish  # noqa: F401
from simulator import SIMULATOR, use_simulator_tiles

#: the tests folder (shared helpers: this file, tolerances.py, grad_cases.py) and the repository root
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

#: seconds a child process or thread may take before a test calls it hung
HANG_TIMEOUT_S = 900

# kernels specialised on the tests' mods (tests/testmods.py) are disk-cached as the built-in
# variants' are, so that every pytest-xdist worker, child process and later run loads them instead
# of compiling them again; child processes inherit the setting
os.environ[CACHED_MODS_ENV] = ",".join(filter(None, [os.environ.get(CACHED_MODS_ENV), "testmods"]))

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
#: BLAS/OpenMP threads for this test process: its share of the cores
THREADS_PER_WORKER = max(1, (os.cpu_count() or 1) // max(1, _WORKERS))
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS_PER_WORKER)  # for child processes
threadpoolctl.threadpool_limits(THREADS_PER_WORKER)  # for this one (BLAS is already loaded)
try:  # torch's intra-op threads spin too; every test module imports it anyway
    import torch

    torch.set_num_threads(THREADS_PER_WORKER)
except ImportError:
    pass


def available_backends():
    """Names of registered backends that can run on this machine (cuda is absent without a GPU),
    narrowed to those ``ATTENTION_ENGINE_TEST_BACKENDS`` lists when it is set (comma-separated):
    the simulator run (``tests/simulator.py``) and ``bench/gpu_check.sh`` specify ``cuda`` against
    the ``reference`` oracle, the other backends ran in the ordinary run."""
    names = [n for n in engine.list_backends() if engine.get_backend(n).unavailable_reason() is None]
    wanted = os.environ.get("ATTENTION_ENGINE_TEST_BACKENDS")
    return [n for n in names if n in wanted.split(",")] if wanted else names


if SIMULATOR:
    # compile_ptx needs the real CUDA target; the ordinary run compiles the PTX
    collect_ignore_glob = ["cuda/test_*ptx.py"]


@pytest.fixture(autouse=True, scope="session")
def _simulator_tiles():
    """Under the simulator, the registered cuda backend runs with the simulator's tiny tiles."""
    undo = use_simulator_tiles() if SIMULATOR else None
    yield
    if undo:
        undo()


#: the cpu backends' size thresholds, as engine.runtime.config sets them: a test that changes one
#: without monkeypatch (a task "for a worker process" run by the in-process Dask cluster did) makes
#: every later test of its pytest-xdist worker take other kernels
_THRESHOLDS = ("CPU_SERIAL_MAX_WORK", "CPU_QUIET_OPENMP_MIN_WORK")


@pytest.fixture(autouse=True)
def _thresholds_restored():
    yield  # autouse fixtures set up first, so this runs after monkeypatch has undone its changes
    from engine.backends.cpu import forward
    from engine.runtime import config

    changed = [n for n in _THRESHOLDS if getattr(forward, n) != getattr(config, n)]
    assert not changed, f"the test left engine.backends.cpu.forward.{changed} changed"


def variant_names():
    return engine.list_variants()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randn(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


#: source of an installable test plugin: multi-head attention with its output halved
HALVED_PLUGIN = """
    import engine
    from variants.multi_head import MultiHeadAttention

    class Halved(MultiHeadAttention):
        name = "halved"
        description = "multi-head attention, output halved (an installed test plugin)"

        def forward(self, *args, **kwargs):
            out, w = super().forward(*args, **kwargs)
            return out / 2, w

    @engine.hookimpl
    def attention_variants():
        return [Halved]
"""


def make_distribution(root, dist, module, source, entry_points):
    """A throw-away installed distribution under ``root``: a *.dist-info folder with METADATA and
    entry_points.txt (lines "name = module" in the group attention_engine), plus the module."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[attention_engine]\n" + "\n".join(entry_points) + "\n")
    if source:
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def _local_cluster_client(processes: bool):
    # dask.distributed, not distributed: tests/ is on sys.path, where tests/distributed/ would
    # import as a namespace package and hide a missing extra
    pytest.importorskip("dask.distributed", reason="the dask extra is not installed")
    import logging

    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def dask_client():
    """A ``distributed.LocalCluster`` of 2 workers x 1 thread, inside this process, for the whole
    session: what a task computes does not depend on the process it runs in, and worker processes
    would each import the engine and compile or load its kernels again. Tests where processes are
    the point (a killed worker, pickling to another process, per-process thread limits) take
    ``dask_process_client``."""
    yield from _local_cluster_client(processes=False)


@pytest.fixture(scope="session")
def dask_process_client():
    """A ``distributed.LocalCluster`` of 2 worker *processes* x 1 thread for the whole session.

    Only the modules marked ``pytest.mark.xdist_group("dask")`` use the clusters, and ``--dist
    loadgroup`` (the README's test command) sends them all to one pytest-xdist worker, so one
    cluster serves them all; a test that kills a worker waits for its nanny to bring it back."""
    yield from _local_cluster_client(processes=True)
