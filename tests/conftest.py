"""Shared fixtures. Backends and variants are parametrised from the registries, so a newly
registered one is tested without editing the tests."""
import textwrap

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
