"""``--dist loadgroup`` (the README's test command) sends the tests of one ``xdist_group`` to one
pytest-xdist worker: the Dask tests share one cluster that way. pytest 9.2 broke it silently
(pytest-xdist#1386: the tests then spread over the workers as if unmarked), so the test extra
stays below 9.2, and this test fails if grouping stops working with the installed versions."""

import os
import re
import subprocess
import sys
import textwrap

from conftest import HANG_TIMEOUT_S

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
