"""The Python examples of the README and of every documentation page run as written: each file's
blocks in order, in one namespace, in a child process of its own (so the plugins they register do
not leak into other tests). The site itself is built by ``mkdocs build --strict`` in ``.ci/run``."""

import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT_S, ROOT

PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
WITH_CODE = [p for p in PAGES if "```python\n" in open(os.path.join(ROOT, p)).read()]
#: pages whose examples must not dwindle (the README's are checked below)
MIN_BLOCKS = {"docs/training.md": 2}


def test_pages_with_a_minimum_of_examples_are_run():
    assert set(MIN_BLOCKS) <= set(WITH_CODE)


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` runs the README's test command as written, which prints the slowest tests."""
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
    commands = [ln for ln in readme if ln.startswith("python3 -m venv") and " pytest " in ln]
    assert len(commands) == 1 and "--durations=25" in commands[0], commands
    assert commands[0] in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()


def test_readme_has_the_five_examples():
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    assert len(blocks) >= 4 and len(open(os.path.join(ROOT, "README.md")).read().splitlines()) <= 250


@pytest.mark.parametrize("page", WITH_CODE)
def test_python_blocks_run(page, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, page)).read(), re.S)
    assert len(blocks) >= MIN_BLOCKS.get(page, 1), f"{page} has {len(blocks)} Python examples"
    script = tmp_path / "examples.py"
    script.write_text("\n".join(blocks) + "\nprint('EXAMPLES OK')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    res = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S
    )
    assert res.returncode == 0 and "EXAMPLES OK" in res.stdout, f"{page}: {res.stderr[-3000:]}"
