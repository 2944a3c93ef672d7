"""Choosing a backend: ``auto`` takes the highest-priority backend that accepts the inputs, an
explicit backend that refuses raises ``NotSupportedError`` with its reasons, and ``auto`` with no
taker raises it with every backend's reasons."""

import numpy as np
import pytest

import engine
from engine.backends.base import Backend
from engine.dispatch import not_supported_reasons, select_backend
from engine.problems.attention import validate_attention_args

Q = np.zeros((1, 2, 3, 4), np.float32)


def _problem(dtype=np.float32, E=4):
    q = Q[..., :E].astype(dtype)
    return validate_attention_args(q, q, q, scale=1.0)


def test_auto_takes_the_highest_priority_backend_that_accepts():
    backends = {n: engine.get_backend(n) for n in engine.list_backends()}
    for problem in (_problem(np.float32), _problem(np.float64), _problem(np.float16), _problem(E=0)):
        takers = [b for b in backends.values() if not b.not_supported_reasons(problem)]
        chosen = select_backend("auto", problem)
        assert chosen is max(takers, key=lambda b: b.priority), problem.dtype
    assert select_backend("auto", _problem(np.float32)).name == "cpu"  # cpu before reference
    assert select_backend("auto", _problem(E=0)).name == "reference"  # cpu refuses E = 0


def test_explicit_backend_that_refuses_raises_with_its_reasons():
    with pytest.raises(engine.NotSupportedError) as exc:
        select_backend("cpu", _problem(E=0))
    assert isinstance(exc.value, ValueError)
    assert exc.value.reasons == {"cpu": engine.get_backend("cpu").not_supported_reasons(_problem(E=0))}
    assert exc.value.reasons["cpu"] and all(r in str(exc.value) for r in exc.value.reasons["cpu"])


class _Nobody(Backend):
    name = "nobody"
    description = "refuses everything (a test plugin)"
    priority = 1000

    def not_supported_reasons(self, problem):
        return ["this backend never runs"]


class _RefuseAll:
    @engine.hookimpl
    def attention_backends(self):
        return [_Nobody]


def test_auto_with_no_taker_lists_every_backends_reasons(monkeypatch):
    engine.register_plugin(_RefuseAll(), name="refuse-all")
    try:
        for name in engine.list_backends():
            if name != "nobody":
                monkeypatch.setattr(
                    type(engine.get_backend(name)),
                    "not_supported_reasons",
                    lambda self, problem, n=name: [f"{n} says no"],
                )
        problem = _problem()
        with pytest.raises(engine.NotSupportedError) as exc:
            select_backend("auto", problem)
        assert exc.value.reasons == not_supported_reasons(problem)
        assert set(exc.value.reasons) == set(engine.list_backends()) and "nobody" in exc.value.reasons
        assert str(exc.value).startswith("no backend can run these inputs (")
        assert "nobody: this backend never runs" in str(exc.value) and "cpu: cpu says no" in str(exc.value)
    finally:
        engine.unregister_plugin("refuse-all")
    assert "nobody" not in engine.list_backends()


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; available: auto, cpu, cuda, reference"):
        engine.scaled_dot_product_attention(Q, Q, Q, backend="gpu")
    assert engine.list_backends() == sorted(engine.list_backends()) and "cpu" in engine.list_backends()
