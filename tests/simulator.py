"""How the suite runs the ``cuda`` backend without a GPU: under Numba's CUDA simulator.

``NUMBA_ENABLE_CUDASIM=1`` must be set before Numba is imported, so the simulator runs in a child
pytest (``run_under_the_cuda_simulator``, called by ``tests/cuda/test_simulator.py``). That run
selects the tests marked ``simulator``: the capability specifications (``tests/forward``,
``tests/decode``), whose backend parameter is then ``cuda`` (``ATTENTION_ENGINE_TEST_BACKENDS``,
read by ``conftest.available_backends``),
and the tests of what only the cuda backend has (``tests/cuda``). Every GPU thread is a Python
thread there, so the registered cuda backend runs with tiny tiles (``SIM_TILES``,
``SIM_DECODE_TILES``) and the specifications give it shapes around those (``simulated``): several
tiles, partial tiles and skipped tiles on inputs of a few dozen rows.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

#: True in the child pytest that runs under the simulator
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
#: the registered cuda backend's tiles under the simulator: 4 query rows x 8 keys...
SIM_TILES = (4, 8)
#: ...and for decoding, 16 threads, 4 query rows and 8 keys per block
SIM_DECODE_TILES = dict(threads=16, block_rows=4, block_k=8)
#: the one reason a test may skip under the simulator
NEEDS_GPU = "needs a real CUDA GPU"
#: the GIL switch interval of the simulator run, in seconds (Python's default: 0.005)
SWITCH_INTERVAL_S = 2e-5

if SIMULATOR:
    # Numba's simulator runs each GPU thread of a block as a Python thread, and the launching thread
    # polls them for syncthreads in a loop that holds the GIL: with the default interval, each hand-over
    # of the GIL to a simulated thread waited up to 5 ms while that loop spun (about half the run's
    # CPU time and more of its wall time). A shorter interval changes no simulated result: the
    # threads still meet at every barrier, and they interleave more often, not less.
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    import traceback

    import numpy as np
    from numba.cuda.simulator.kernelapi import FakeCUDAShared, numpy_support, types

    def _shared_array(self, shape, dtype, alignment=None):
        """Numba's ``FakeCUDAShared.array`` with its check-then-insert made one step: two threads
        of a block that both found no array for a declaration each allocated one, so they used
        different "shared" arrays (uninitialised values; seen once the threads switch often).
        The declaration is still keyed by the caller's file and line, as Numba keys it."""
        if shape == 0 or alignment is not None:  # dynamic shared memory, or Numba's own error
            return _numba_shared_array(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]
        return self._allocations.setdefault(caller, np.empty(shape, dtype))  # atomic under the GIL

    _numba_shared_array = FakeCUDAShared.array
    FakeCUDAShared.array = _shared_array


def simulated(backend: str) -> bool:
    """True when ``backend`` runs under the simulator: give it the small shapes."""
    return SIMULATOR and backend == "cuda"


_undo = []  # how to give the cuda backend its own tiles back, while the simulator's are in use


def use_simulator_tiles():
    """Run the registered cuda backend with the simulator's tiles; returns a function that undoes it."""
    import engine
    from engine.backends.cuda import decode

    cuda = engine.get_backend("cuda")
    tiles, run = (cuda.block_q, cuda.block_k), decode.CudaDecode.run
    cuda.block_q, cuda.block_k = SIM_TILES
    decode.CudaDecode.run = lambda self, problem: decode.run_decode(problem, **SIM_DECODE_TILES)

    def undo():
        cuda.block_q, cuda.block_k = tiles
        decode.CudaDecode.run = run
        _undo.clear()

    _undo[:] = [undo]
    return undo


@contextlib.contextmanager
def default_tiles():
    """Within it, the registered cuda backend runs with its own tiles (as on a GPU)."""
    if not _undo:
        yield
        return
    _undo[0]()
    try:
        yield
    finally:
        use_simulator_tiles()


def run_under_the_cuda_simulator(path: str, timeout: float) -> None:
    """Run the ``simulator``-marked tests under ``path`` (a folder or file) in a child pytest with
    the simulator on; fail if anything there fails, if nothing is selected, or if a test is skipped
    for any reason but needing a real GPU."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", ATTENTION_ENGINE_TEST_BACKENDS="cuda,reference")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "simulator", path],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=path if os.path.isdir(path) else os.path.dirname(path),
    )
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, tail  # 5 when nothing was selected
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, tail
    skipped = [ln for ln in res.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert all(NEEDS_GPU in ln for ln in skipped), tail
