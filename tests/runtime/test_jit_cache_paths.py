"""Where the JIT cache looks first: beside the kernel modules, as Numba itself caches."""

import os

import numba

import engine  # noqa: F401
import engine.kernels
from engine.runtime import jit_cache


def test_the_first_folder_tried_is_the_kernels_own_pycache(monkeypatch):
    asked = []

    def writable(path):
        asked.append(path)
        return True

    monkeypatch.setattr(jit_cache, "_enabled", None)
    monkeypatch.setattr(jit_cache, "_writable", writable)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")  # no NUMBA_CACHE_DIR: the engine chooses
    assert jit_cache.cache_enabled()
    kernels = os.path.dirname(os.path.abspath(engine.kernels.__file__))
    assert asked[0] == os.path.join(kernels, "__pycache__")
    assert os.path.isdir(os.path.dirname(asked[0]))  # a real package folder, not one made up next to runtime/
