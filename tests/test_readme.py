"""The README's Python examples run as written (in order, in one namespace, in a child process so
the plugins they register do not leak into other tests)."""
import os
import re
import subprocess
import sys

from conftest import HANG_TIMEOUT_S

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert len(blocks) >= 5
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks) + "\nprint('README OK')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=HANG_TIMEOUT_S)
    assert res.returncode == 0 and "README OK" in res.stdout, res.stderr[-3000:]
