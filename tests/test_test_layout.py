"""Test modules share helpers through tests/tiny_models.py and conftest.py only."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another():
    offenders = [f"{path.name}:{n}" for path in sorted(TESTS.glob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.match(r"\s*(from|import)\s+test_\w+", line)]
    assert offenders == []
