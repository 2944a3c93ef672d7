"""Shared fixtures. Backends and variants are parametrised from the registries, so a newly
registered one is tested without editing the tests."""
import numpy as np
import pytest

import engine


def available_backends():
    """Names of registered backends that can run on this machine (cuda is absent without a GPU)."""
    return [n for n in engine.list_backends() if engine.get_backend(n).unavailable_reason() is None]


def variant_names():
    return engine.list_variants()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randn(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)
