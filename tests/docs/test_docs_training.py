"""docs/training.md's Python examples run as written (in order, in one namespace, in a child
process), as the README's do."""

import os
import re
import subprocess
import sys

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "training.md")


def test_training_doc_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", open(DOC).read(), re.S)
    assert len(blocks) >= 2
    script = tmp_path / "training_examples.py"
    script.write_text("\n".join(blocks) + "\nprint('DOC OK')\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "DOC OK" in res.stdout, res.stderr[-3000:]
