"""The README's Python API example runs as written and prints what it says."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_api_example_runs_as_written(tmp_path):
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = [re.search(r'# "(.*)"', line).group(1) for line in block.splitlines() if '# "' in line]
    assert result.stdout.splitlines()[0] == expected[0]
