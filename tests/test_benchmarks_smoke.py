"""The benchmark runner works end to end: ``small`` preset, one repetition, leangen only.

Timings are not asserted; this only shows that the checkpoint, tokenizer, configs,
process measurement and report writer fit together.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("leangen.generate")

REPO = Path(__file__).resolve().parent.parent


def test_small_preset_runs_leangen(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--preset", "small", "--reps", "1",
         "--systems", "leangen", "--new-tokens", "8", "--idle-wait", "0",
         "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    assert "| leangen |" in table
    results = json.loads((tmp_path / "results.json").read_text())
    [run] = results["runs"]
    assert run["status"] == "ok"
    assert run["generated_tokens"] >= 1
