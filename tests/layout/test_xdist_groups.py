"""``--dist loadgroup`` (the README's test command) sends the tests of one ``xdist_group`` to one
pytest-xdist worker: the Dask tests share one cluster that way. pytest 9.2 broke it silently
(pytest-xdist#1386: the tests then spread over the workers as if unmarked), so the test extra
stays below 9.2, and this test fails if grouping stops working with the installed versions."""

import configparser
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import HANG_TIMEOUT_S, ROOT

MODULE = """
    import pytest

    pytestmark = pytest.mark.xdist_group("together")


    @pytest.mark.parametrize("i", range(8))
    def test_grouped(i):
        pass
"""


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-v"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    workers = re.findall(r"\[(gw\d+)\].*PASSED .*test_grouped\[", res.stdout)
    assert len(workers) == 8 and len(set(workers)) == 1, res.stdout[-3000:]


CRASHING = """
    import ctypes
    import os

    import pytest


    @pytest.mark.xdist_group("hangs")
    def test_hangs():
        ctypes.PyDLL(None).sleep(600)  # native code holding the GIL, as a Numba kernel does


    @pytest.fixture
    def hangs_in_teardown():
        yield
        ctypes.PyDLL(None).sleep(600)


    @pytest.mark.xdist_group("teardown")
    def test_teardown(hangs_in_teardown):
        assert False  # pytest stops its own watchdog at a failure: tests/hang_guard.py restarts it


    @pytest.mark.xdist_group("aborts")
    def test_aborts():
        os.write(2, b"written to fd 2 before the abort\\n")  # as glibc or LLVM would
        os.abort()


    @pytest.mark.parametrize("i", range(4))
    def test_fine(i):
        pass
"""


def _readme_pytest_options() -> list:
    """The options of the README's test command (``.ci/run`` runs it as written)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    command = next(ln for ln in readme.splitlines() if ln.startswith("python3 -m venv") and " pytest " in ln)
    return command.split(" -m pytest ", 1)[1].split()


@pytest.mark.parametrize("case", ["hangs", "teardown", "aborts"])
def test_a_hung_or_crashed_worker_ends_the_run_as_a_failure(tmp_path, case):
    """A worker that dies (a native crash, or faulthandler ending a hung test) must stop the run
    as a failure: under ``--dist loadgroup`` pytest-xdist 3.8 can wait forever for a replaced
    worker (pytest-xdist#1323, #1378; a CI run hung until its 90-minute limit), so the README's
    command does not replace workers. ``setup.cfg``'s timeout must end a hang that holds the GIL
    (a Python timer thread never runs then), and native code's stderr must reach the log."""
    options = _readme_pytest_options()
    assert "--max-worker-restart=0" in options and "loadgroup" in options, options
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    ini = cfg["tool:pytest"]
    (tmp_path / "test_crashing.py").write_text(textwrap.dedent(CRASHING))
    (tmp_path / "conftest.py").write_text("from hang_guard import *  # noqa: F403\n")  # as tests/conftest.py
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nfaulthandler_timeout = 8\n"  # the hang guard watches the controller's session end too
        f"faulthandler_exit_on_timeout = {ini['faulthandler_exit_on_timeout']}\naddopts = {ini['addopts']}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "tests"), env.get("PYTHONPATH")]))
    res = subprocess.run(
        [sys.executable, "-m", "pytest", *options, "-k", f"{case} or fine"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,  # 10-20 s; without --max-worker-restart=0 it hangs here
    )
    out = res.stdout + res.stderr
    assert res.returncode not in (0, 5), out[-3000:]
    assert f"crashed while running 'test_crashing.py::test_{case}" in out, out[-3000:]
    assert "replacing crashed worker" not in out, out[-3000:]
    if case == "hangs":  # faulthandler's report: the hung test's stack
        assert "Timeout (0:00:08)!" in out and "in test_hangs" in out, out[-3000:]
    elif case == "teardown":  # the same after the test failed, in its fixture's teardown
        assert "Timeout (0:00:08)!" in out and "in hangs_in_teardown" in out, out[-3000:]
    else:  # native code's last words reach the log (not a capture file that dies with the worker)
        assert "written to fd 2 before the abort" in out, out[-3000:]
