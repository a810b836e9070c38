"""The benchmark runner works end to end: ``small`` preset, one repetition, leangen
(plus leangen int8 once, and llama.cpp where llama-cpp-python is absent, to see it skipped).

Timings are not asserted; this only shows that the checkpoint, tokenizer, configs,
process measurement and report writer fit together. Nor is the number of runs:
the runner repeats a run that other processes disturbed, so how many attempts it
makes depends on how busy the machine is, and the test must pass either way.
"""

import contextlib
import hashlib
import importlib.util
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

SMOKE_ARGS = ["--preset", "small", "--reps", "1", "--new-tokens", "8", "--idle-wait", "0"]
# llama.cpp is in the bench extra, which CI does not install: there the runner must
# skip it with a note. Where it is installed, the smoke run leaves it out (it would
# fetch llama-cpp-python's sdist for the GGUF converter).
LLAMA_CPP_INSTALLED = importlib.util.find_spec("llama_cpp") is not None
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


# Enough hogs to fill a small machine's cores, so the runner sees a busy machine (it must
# still finish and report); capped so that a big CI machine is not flooded.
@pytest.mark.parametrize("hogs", [0, min(os.cpu_count() or 2, 4)], ids=["quiet", "cpu-hog"])
@pytest.mark.slow
def test_small_preset_runs_leangen(tmp_path, cache_dir, hogs):
    results_dir = tmp_path / "results"
    before = tracked_results()
    # The quantized system costs one more short process: on the quiet machine only.
    systems = ["leangen"] if hogs else ["leangen", "leangen-int8"]
    skips_llama_cpp = not hogs and not LLAMA_CPP_INSTALLED
    if skips_llama_cpp:
        systems.append("llama.cpp-Q8_0")
    with cpu_hogs(hogs):
        proc = subprocess.run(
            [*RUNNER, *SMOKE_ARGS, "--systems", ",".join(systems), "--results-dir", str(results_dir),
             "--cache-dir", str(cache_dir)],
            cwd=REPO, env=SMOKE_ENV, capture_output=True, text=True, timeout=600,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tracked_results() == before
    assert sorted(p.name for p in results_dir.iterdir()) == ["RESULTS_small.md", "results_small.json"]
    markdown = (results_dir / "RESULTS_small.md").read_text()
    assert "| leangen |" in markdown

    results = json.loads((results_dir / "results_small.json").read_text())
    ran = [s for s in systems if not s.startswith("llama.cpp")]
    assert sorted({r["system"] for r in results["runs"]}) == sorted(ran)
    for system in ran:
        # Repetition 1 ends in exactly one kept attempt; any before it were repeated
        # because others used the CPUs, and are marked so.
        *repeated, final = [r for r in results["runs"] if r["system"] == system]
        assert all(r["rep"] == 1 for r in results["runs"])
        assert final["status"] == "ok", final["status"]
        assert all(r["status"].startswith(DISTURBED) for r in repeated), [r["status"] for r in repeated]
        assert final["generated_tokens"] >= 1
        assert results["summary"][system]["ok"] == results["summary"][system]["runs"] == 1
    if "leangen-int8" in ran:
        assert "| leangen-int8 |" in markdown and "## Decode by weight format" in markdown
        assert results["quantize_profile"]["int8"]["posthoc"]["counts"]["quantized"] > 0
    if skips_llama_cpp:
        assert "not installed" in results["skipped"]["llama.cpp-Q8_0"]
        assert "- llama.cpp-Q8_0 skipped: llama-cpp-python is not installed" in markdown

    # --render-only finds the JSON in the same --results-dir and rewrites only there.
    (results_dir / "RESULTS_small.md").unlink()
    rendered = subprocess.run([*RUNNER, "--preset", "small", "--results-dir", str(results_dir),
                               "--render-only"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert "| leangen |" in (results_dir / "RESULTS_small.md").read_text()
    assert tracked_results() == before


def test_missing_llama_cpp_is_skipped_with_a_note(monkeypatch):
    """Without the bench extra, llama.cpp systems are left out with a note, not an error."""
    from benchmarks import gguf_files, run, systems

    monkeypatch.setattr(gguf_files, "installed_version", lambda: None)
    notes: list[str] = []
    kept, skipped = run.available_systems(
        [systems.SYSTEMS["leangen"], systems.SYSTEMS["llama.cpp-Q4_0"]], notes)
    assert [s.name for s in kept] == ["leangen"]
    assert list(skipped) == ["llama.cpp-Q4_0"]
    assert notes == [f"llama.cpp-Q4_0 skipped: {skipped['llama.cpp-Q4_0']}."]
    assert "pip install -e '.[bench]'" in notes[0]


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


def test_cuda_checks_stager_on_cpu(cache_dir):
    """The GPU script's Stager check, on CPU (where its copy path runs without events):
    a failed copy would raise, and the figures it reports are there."""
    from benchmarks.checkpoints import ensure_checkpoint
    from benchmarks.cuda_checks import check_stager
    from benchmarks.presets import PRESETS

    checkpoint = ensure_checkpoint(PRESETS["small"], cache_dir)
    result = check_stager(checkpoint, "cpu")
    # the largest tensor of the preset (1024 x 256, untied: either one), under torchtune's name
    assert result["tensor"] in ("tok_embeddings.weight", "output.weight")
    assert result["pinned"] is False  # pinning is for CUDA targets only


def test_cuda_results_render_from_their_json():
    """benchmarks/RESULTS_cuda.md's table is rendered from results_cuda.json: every
    system measured there gets a row, and a failed check its error."""
    from benchmarks.cuda_checks import render

    report = json.loads((BENCH_DIR / "results_cuda.json").read_text())
    text = render(report)
    for name in report["checks"]["systems"]["runs"]:
        assert f"| {name} |" in text
    assert "**failed**" not in text or any(not c["ok"] for c in report["checks"].values())


@pytest.mark.distributed
def test_nproc_reports_each_rank_of_both_loaders(tmp_path, cache_dir):
    """run.py --nproc 2: per-rank rows for leangen's sharded load and the
    full-state-dict baseline, and 2 gloo ranks' generate run, in the markdown and the JSON.

    Trimmed to the three torchrun launches (each ~10 s here) and no repeats, so that a
    busy machine does not triple it; the one-process runs are the ordinary leangen path."""
    results_dir = tmp_path / "results"
    before = tracked_results()
    proc = subprocess.run(
        [*RUNNER, *SMOKE_ARGS, "--nproc", "2", "--retries", "0", "--results-dir", str(results_dir),
         "--cache-dir", str(cache_dir), "--systems", "load-leangen-tp,load-full-state-dict,generate-ranks"],
        cwd=REPO, env=SMOKE_ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tracked_results() == before
    assert sorted(p.name for p in results_dir.iterdir()) == ["RESULTS_small_nproc2.md", "results_small_nproc2.json"]
    markdown = (results_dir / "RESULTS_small_nproc2.md").read_text()
    # (loader, rank) of every row of the per-rank table
    rows = {(line.split("|")[1].split(" (")[0].strip(), line.split("|")[2].strip())
            for line in markdown.splitlines() if line.startswith(("| leangen TP", "| full state dict"))}
    assert rows == {(loader, rank) for loader in ("leangen TP", "full state dict per rank") for rank in "01"}
    assert "| 2 gloo ranks (torchrun) | 2 × 1 |" in markdown
    assert "## Why 2 gloo ranks are slower here" in markdown

    results = json.loads((results_dir / "results_small_nproc2.json").read_text())
    assert results["nproc"] == 2
    loads = {r["system"]: r for r in results["runs"] if r["system"].startswith("load-")}
    for name in ("load-leangen-tp", "load-full-state-dict"):
        assert loads[name]["status"] == "ok", loads[name]["status"]
        assert [r["rank"] for r in loads[name]["ranks"]] == [0, 1]
        for rank in loads[name]["ranks"]:
            assert rank["load_seconds"] > 0 and rank["param_bytes"] > 0 and rank["vm_hwm"] > 0
    # Each rank holds its shard, not the whole model: under the one process's bytes.
    model = results["workload"]["model_bytes"]
    assert all(r["param_bytes"] < model for r in loads["load-leangen-tp"]["ranks"])
    ranks = next(r for r in results["runs"] if r["system"] == "generate-ranks")
    assert ranks["status"] == "ok" and ranks["reported"]["tensor_parallel"]["ranks"] == 2
    assert ranks["generated_tokens"] == 8 and ranks["decode_tokens_per_second"] > 0

    # --render-only rewrites the --nproc report from its JSON, in the same folder.
    (results_dir / "RESULTS_small_nproc2.md").unlink()
    rendered = subprocess.run([*RUNNER, "--preset", "small", "--nproc", "2", "--results-dir", str(results_dir),
                               "--render-only"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert (results_dir / "RESULTS_small_nproc2.md").read_text() == markdown


@pytest.mark.slow
def test_nproc_refuses_what_it_cannot_measure():
    """--nproc takes its own measurements: a cap, one rank or a llama.cpp system is refused in one line."""
    for extra, message in ((["--nproc", "2", "--memory-cap-gb", "3"], "--memory-cap-gb"),
                           (["--nproc", "1"], ">= 2"),
                           (["--nproc", "2", "--systems", "llama.cpp-Q4_0"], "unknown ['llama.cpp-Q4_0'] with --nproc")):
        proc = subprocess.run([*RUNNER, "--preset", "small", *extra], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], (extra, proc.stderr)
