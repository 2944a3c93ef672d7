"""CI entry point of the ``cuda`` backend without a GPU: the tests marked ``simulator`` of each folder
run in a child pytest under Numba's CUDA simulator (``tests/simulator.py``), the capability
specifications for ``cuda`` and this folder's cuda-only tests. One child per folder, so that
pytest-xdist spreads them over its workers; each fails if anything in it fails, if it selects
nothing, or if a test skips for any reason but needing a real GPU."""

import os

import pytest

from conftest import HANG_TIMEOUT_S, TESTS
from simulator import SIMULATOR, run_under_the_cuda_simulator

#: the folders with tests marked ``simulator``
FOLDERS = ["forward", "decode", "cuda"]


@pytest.mark.skipif(SIMULATOR, reason="already under the simulator")
@pytest.mark.parametrize("folder", FOLDERS)
def test_under_the_cuda_simulator(folder):
    run_under_the_cuda_simulator(os.path.join(TESTS, folder), HANG_TIMEOUT_S)


def test_every_folder_with_simulator_tests_is_run():
    """A ``simulator`` mark in a folder that is not listed would never run for cuda."""
    marked = set()
    for folder in sorted(os.listdir(TESTS)):
        path = os.path.join(TESTS, folder)
        if os.path.isdir(path):
            for name in os.listdir(path):
                if name.startswith("test_") and name.endswith(".py"):
                    with open(os.path.join(path, name)) as f:
                        if "mark.simulator" in f.read():
                            marked.add(folder)
    assert marked == set(FOLDERS)
