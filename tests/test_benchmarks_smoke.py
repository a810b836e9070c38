"""The benchmark runner works end to end: ``small`` preset, one repetition, leangen only.

Timings are not asserted; this only shows that the checkpoint, tokenizer, configs,
process measurement and report writer fit together. Nor is the number of runs:
the runner repeats a run that other processes disturbed, so how many attempts it
makes depends on how busy the machine is, and the test must pass either way.
"""

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("leangen.generate")

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
RUNNER = [sys.executable, str(BENCH_DIR / "run.py")]
# benchmarks/ is not an installed package, and plain `pytest` puts only tests/ on the path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.report import DISTURBED  # noqa: E402

SMOKE_ARGS = ["--preset", "small", "--reps", "1", "--systems", "leangen",
              "--new-tokens", "8", "--idle-wait", "0"]
# One intra-op thread for every process the runner starts: timings are not asserted,
# and on a busy machine OpenMP threads spinning against other work slow each run
# several times over (the same reason conftest.py sets one thread).
SMOKE_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One random checkpoint for both runs: the runner reuses it if the preset matches."""
    return tmp_path_factory.mktemp("bench-cache")


@contextlib.contextmanager
def cpu_hogs(count: int):
    """``count`` busy-looping processes for the duration of the block."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def tracked_results() -> dict[str, str]:
    """sha256 of the published results in benchmarks/, which a test run must not touch."""
    files = sorted(BENCH_DIR.glob("RESULTS*.md")) + sorted(BENCH_DIR.glob("results*.json"))
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# Enough hogs to fill a small machine's cores, so the runner sees a busy machine (the
# case of issue 8); capped so that a big CI machine is not flooded.
@pytest.mark.parametrize("hogs", [0, min(os.cpu_count() or 2, 4)], ids=["quiet", "cpu-hog"])
def test_small_preset_runs_leangen(tmp_path, cache_dir, hogs):
    results_dir = tmp_path / "results"
    before = tracked_results()
    with cpu_hogs(hogs):
        proc = subprocess.run(
            [*RUNNER, *SMOKE_ARGS, "--results-dir", str(results_dir), "--cache-dir", str(cache_dir)],
            cwd=REPO, env=SMOKE_ENV, capture_output=True, text=True, timeout=600,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tracked_results() == before
    assert sorted(p.name for p in results_dir.iterdir()) == ["RESULTS_small.md", "results_small.json"]
    assert "| leangen |" in (results_dir / "RESULTS_small.md").read_text()

    results = json.loads((results_dir / "results_small.json").read_text())
    # Repetition 1 ends in exactly one kept attempt; any before it were repeated
    # because others used the CPUs, and are marked so.
    *repeated, final = results["runs"]
    assert all((r["rep"], r["system"]) == (1, "leangen") for r in results["runs"])
    assert final["status"] == "ok", final["status"]
    assert all(r["status"].startswith(DISTURBED) for r in repeated), [r["status"] for r in repeated]
    assert final["generated_tokens"] >= 1
    assert results["summary"]["leangen"]["ok"] == results["summary"]["leangen"]["runs"] == 1

    # --render-only finds the JSON in the same --results-dir and rewrites only there.
    (results_dir / "RESULTS_small.md").unlink()
    rendered = subprocess.run([*RUNNER, "--preset", "small", "--results-dir", str(results_dir),
                               "--render-only"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert "| leangen |" in (results_dir / "RESULTS_small.md").read_text()
    assert tracked_results() == before


def test_runner_help():
    """argparse %-formats help strings; a bare percent sign once made --help crash."""
    proc = subprocess.run([*RUNNER, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")
    text = " ".join(proc.stdout.split())  # argparse wraps to the terminal's width
    assert "% of the CPUs" in text and "%%" not in text


def test_runner_writes_tracked_results_only_when_asked():
    """A results folder of benchmarks/ itself is refused without --update-tracked."""
    before = tracked_results()
    proc = subprocess.run([*RUNNER, "--preset", "small", "--results-dir", str(BENCH_DIR)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--update-tracked" in proc.stderr.strip().splitlines()[-1]
    assert tracked_results() == before
