"""The README's quick start runs as written (in a scratch folder)."""

import os
import re
import subprocess
import sys
from pathlib import Path


README = Path(__file__).parent.parent / "README.md"


def test_readme_quick_start_runs(tmp_path):
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    bash_blocks = re.findall(r"```bash\n(.*?)```", quick_start, re.S)
    python_blocks = re.findall(r"```python\n(.*?)```", quick_start, re.S)
    assert bash_blocks and python_blocks
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    for block in bash_blocks:
        run = subprocess.run(["bash", "-ec", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    for block in python_blocks:
        run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip(), "the example printed no answer"
