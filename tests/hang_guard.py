"""A hang anywhere in a test worker ends it with every thread's stack, not only inside a test.

pytest's faulthandler plugin (``faulthandler_timeout`` and ``faulthandler_exit_on_timeout`` in
``setup.cfg``) watches each test's setup, call and teardown, but it stops its watchdog when a test
fails or errors (``pytest_exception_interact``, meant for ``--pdb``), so a teardown that hangs
after a failure (a Dask cluster that does not close) was unwatched, and so are collection and
``pytest_sessionfinish``. These hooks start the same watchdog again there. ``tests/conftest.py``
imports them; ``tests/layout/test_xdist_groups.py`` checks them in a child run.
"""

from __future__ import annotations

import faulthandler
import sys

import pytest

__all__ = ["pytest_exception_interact", "pytest_collection", "pytest_sessionfinish"]


def _arm(config) -> None:
    """Start faulthandler's watchdog (one per process) with the configured timeout and exit."""
    timeout = float(config.getini("faulthandler_timeout") or 0)
    if timeout > 0 and not config.getoption("usepdb", False):
        exit_ = bool(config.getini("faulthandler_exit_on_timeout"))
        faulthandler.dump_traceback_later(timeout, exit=exit_, file=sys.__stderr__)


@pytest.hookimpl(trylast=True)  # after pytest's own implementation, which stops the watchdog
def pytest_exception_interact(node, call, report):
    if isinstance(node, pytest.Item):  # the test's remaining teardown is watched again
        _arm(node.config)


def _watched(config):
    """The body of a hook wrapper whose hook runs under the watchdog."""
    _arm(config)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_collection(session):
    return (yield from _watched(session.config))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    return (yield from _watched(session.config))
