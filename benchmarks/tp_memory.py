"""Tensor parallelism on CPU: what each rank costs, and N gloo ranks against one process.

    python benchmarks/run.py --preset llama3_2_1b --nproc 2 --reps 2

``run.py --nproc N`` interleaves these measurements like its other systems (each a fresh
process, after waiting for an idle machine, repeated when others took the CPUs) and
writes ``RESULTS_<preset>_nprocN.md`` with ``render()``. Loads, each one ``torchrun
--nproc_per_node N`` job (gloo) whose ranks report their load time and their peak
anonymous memory growth during the load (RssAnon sampled every millisecond, minus its
value after imports, process group and mesh), plus VmHWM:

- ``load-leangen-tp``: ``load_model(..., parallel=TensorParallel)``: each rank takes only
  its rows/columns from the mmap (row shards are views; column shards are copied).
- ``load-full-state-dict``: what torchtune's ``dev/generate_v2_distributed`` does: its
  ``FullModelHFCheckpointer`` loads the whole state dict on every rank, then
  ``load_from_full_model_state_dict`` shards it into the same parallelized meta model.
- ``load-one-process``: ``load_model`` without tensor parallelism, for reference.

And the generate recipe on the run's workload (same prompt, greedy, ``--new-tokens``):
``generate-one-process`` (torch's threads, as run.py's ``leangen``),
``generate-one-process-1-thread``, and ``generate-ranks`` (N ranks; torchrun gives each
``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.measure import IDLE_SHARE, ProcessRun
from benchmarks.report import json_path
from benchmarks.systems import Leangen, System
from benchmarks.workload import Workload

BENCH_DIR = Path(__file__).resolve().parent
GB = 1e9


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _PeakAnon:
    def __enter__(self):
        self.peak, self._stop = _status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


# --- one rank (run under torchrun) ---------------------------------------------------------

def _load_leangen(checkpoint: str, parallel):
    from leangen import load_model

    return load_model("auto", checkpoint, parallel=parallel)


def _load_full(checkpoint: str, parallel, model_type: str):
    """torchtune's generate_v2_distributed: the checkpointer's full state dict on every rank."""
    import torch
    from torchtune import training
    from torchtune.training import FullModelHFCheckpointer

    from leangen.checkpoint import read_config
    from leangen.checkpoint.convert import Geometry
    from leangen.hf.config import parse_config
    from leangen.hf.families import builder_for
    from leangen.load.pipeline import build_on_meta

    files = sorted(p.name for p in Path(checkpoint).glob("model-*.safetensors"))
    with tempfile.TemporaryDirectory() as out:
        state = FullModelHFCheckpointer(checkpoint_dir=checkpoint, checkpoint_files=files, model_type=model_type,
                                        output_dir=out).load_checkpoint()[training.MODEL_KEY]
    config = parse_config(read_config(Path(checkpoint)))
    builder, kwargs = builder_for(config)
    dtype = next(iter(state.values())).dtype
    with training.set_default_dtype(dtype):
        model = build_on_meta(builder, **kwargs)
    parallel.parallelize(model, builder, Geometry.from_model(model))  # the same plan as leangen's
    with torch.device("cpu"):
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    training.load_from_full_model_state_dict(model, state, torch.device("cpu"), strict=True)
    return model


def worker(mode: str, checkpoint: str, model_type: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from leangen.parallel.tensor_parallel import TensorParallel

    parallel = None
    if mode != "one":
        dist.init_process_group("gloo")
        parallel = TensorParallel.start(torch.device("cpu"))
    before = _status("RssAnon")
    start = time.perf_counter()
    with _PeakAnon() as peak:
        if mode == "full":
            model = _load_full(checkpoint, parallel, model_type)
        else:
            model = _load_leangen(checkpoint, parallel)
    seconds = time.perf_counter() - start
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                for p in model.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = {"mode": mode, "rank": rank, "load_seconds": seconds, "peak_anon_growth": peak.peak - before,
              "baseline_anon": before, "vm_hwm": _status("VmHWM"), "param_bytes": local}
    Path(f"{out}.rank{rank}").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --- the measurements run.py interleaves (``System``s, so run.py's loop runs them) -------------

def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]


class RankLoad(System):
    """One load in ``ranks`` processes (torchrun when more than one); every rank writes its figures."""

    def __init__(self, name: str, mode: str, ranks: int):
        self.name, self.mode, self.ranks = name, mode, ranks

    def argv(self, w: Workload, run_dir: Path) -> list[str]:
        launcher = torchrun(self.ranks) if self.ranks > 1 else [sys.executable]
        return launcher + ["-m", "benchmarks.tp_memory", "--worker", self.mode, str(w.checkpoint_dir),
                           w.preset.torchtune_model_type, str(run_dir / "load")]

    def parse(self, run: ProcessRun, w: Workload, run_dir: Path) -> dict:
        ranks = [json.loads((run_dir / f"load.rank{r}").read_text()) for r in range(self.ranks)]
        # run.py's progress line wants these; the report reads "ranks".
        return {"load_seconds": max(r["load_seconds"] for r in ranks), "first_token_seconds": None,
                "decode_tokens_per_second": None, "ranks": ranks}


class RankGenerate(Leangen):
    """run.py's leangen system (same config, same figures), on one process or under torchrun."""

    def __init__(self, name: str, ranks: int, threads: int | None = None):
        self.name, self.ranks, self.threads = name, ranks, threads

    def argv(self, w: Workload, run_dir: Path) -> list[str]:
        argv = super().argv(w, run_dir)
        if self.ranks > 1:
            argv = torchrun(self.ranks) + argv[1:]  # [python] -m leangen.generate ...
        return argv + ([f"threads={self.threads}"] if self.threads else [])


# name -> factory(nproc); run.py's --systems picks from these under --nproc, in this order.
MEASUREMENTS = {
    "load-leangen-tp": lambda n: RankLoad("load-leangen-tp", "leangen", n),
    "load-full-state-dict": lambda n: RankLoad("load-full-state-dict", "full", n),
    "load-one-process": lambda n: RankLoad("load-one-process", "one", 1),
    "generate-one-process": lambda n: RankGenerate("generate-one-process", 1),
    "generate-one-process-1-thread": lambda n: RankGenerate("generate-one-process-1-thread", 1, threads=1),
    "generate-ranks": lambda n: RankGenerate("generate-ranks", n),
}
LOAD_LABELS = {"load-leangen-tp": "leangen TP (its shard from the mmap)",
               "load-full-state-dict": "full state dict per rank (torchtune's generate_v2_distributed)",
               "load-one-process": "one process, no TP (reference)"}


# --- the report -------------------------------------------------------------------------------

def write_results(path_md: Path, document: dict) -> None:
    """The markdown and, beside it, the JSON (run.py's naming: R.md -> r.json)."""
    path_md.parent.mkdir(parents=True, exist_ok=True)
    path_md.write_text(render(document))
    json_path(path_md).write_text(json.dumps(document, indent=2) + "\n")


def _ok(runs: list[dict], name: str) -> list[dict]:
    return [r for r in runs if r["system"] == name and r["status"] == "ok"]


def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict]) -> dict:
    """Medians over the completed runs: per load and rank, and per generate run."""
    loads = {}
    for name in LOAD_LABELS:
        per_rank: dict[int, list[dict]] = {}
        for run in _ok(runs, name):
            for rank in run["ranks"]:
                per_rank.setdefault(rank["rank"], []).append(rank)
        loads[name] = {rank: {key: _stats([r[key] for r in rows]) for key in
                              ("load_seconds", "peak_anon_growth", "vm_hwm", "param_bytes")}
                       for rank, rows in sorted(per_rank.items())}
    generate = {name: {key: _stats([r.get(key) for r in _ok(runs, name)]) for key in
                       ("load_seconds", "first_token_seconds", "decode_tokens_per_second", "peak_anon_bytes")}
                | {"threads": sorted({r["reported"]["threads"] for r in _ok(runs, name)})}
                for name in MEASUREMENTS if name.startswith("generate") and _ok(runs, name)}
    return {"loads": {k: v for k, v in loads.items() if v}, "generate": generate}


def _cell(stats: dict | None, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    if not stats:
        return "—"
    median, low, high = (stats[k] / scale for k in ("median", "min", "max"))
    return f"{fmt.format(median)} ({fmt.format(low)}–{fmt.format(high)})"


def _ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['median'] / b['median']:.2f}x" if a and b and b["median"] else "—"


def load_table(loads: dict, model_bytes: int) -> str:
    lines = ["| load | rank | load (s) | peak anon growth (GB) | × model | VmHWM (GB) | params held (GB) |",
             "|---|---|---|---|---|---|---|"]
    for name, ranks in loads.items():
        for rank, s in ranks.items():
            growth = s["peak_anon_growth"]["median"] / model_bytes
            lines.append(f"| {LOAD_LABELS[name]} | {rank} | {_cell(s['load_seconds'])} | "
                         f"{_cell(s['peak_anon_growth'], GB, '{:.3f}')} | {growth:.2f} | "
                         f"{_cell(s['vm_hwm'], GB)} | {s['param_bytes']['median'] / GB:.3f} |")
    return "\n".join(lines)


def load_ratio_table(loads: dict) -> str:
    lean, full = loads.get("load-leangen-tp", {}), loads.get("load-full-state-dict", {})
    lines = ["| rank | load: full / leangen | peak anon growth: full / leangen | "
             "peak anon growth: full − leangen (GB) |", "|---|---|---|---|"]
    for rank in sorted(set(lean) & set(full), key=int):
        a, b = full[rank]["peak_anon_growth"], lean[rank]["peak_anon_growth"]
        lines.append(f"| {rank} | {_ratio(full[rank]['load_seconds'], lean[rank]['load_seconds'])} | "
                     f"{_ratio(a, b)} | {(a['median'] - b['median']) / GB:.3f} |")
    return "\n".join(lines)


def generate_table(generate: dict, nproc: int) -> str:
    one = generate.get("generate-one-process", {})
    lines = ["| run | processes × threads | load (s) | first token, whole process (s) | decode (tok/s) | "
             "peak anon, all processes (GB) | load vs 1 process | decode vs 1 process |",
             "|---|---|---|---|---|---|---|---|"]
    for name, g in generate.items():
        procs = nproc if name == "generate-ranks" else 1
        lines.append(f"| {GENERATE_LABELS[name].format(n=nproc)} | {procs} × {'/'.join(map(str, g['threads']))} | "
                     f"{_cell(g['load_seconds'])} | {_cell(g['first_token_seconds'])} | "
                     f"{_cell(g['decode_tokens_per_second'])} | {_cell(g['peak_anon_bytes'], GB)} | "
                     f"{_ratio(g['load_seconds'], one.get('load_seconds'))} | "
                     f"{_ratio(g['decode_tokens_per_second'], one.get('decode_tokens_per_second'))} |")
    return "\n".join(lines)


GENERATE_LABELS = {"generate-one-process": "1 process (torch's threads)",
                   "generate-one-process-1-thread": "1 process, 1 thread",
                   "generate-ranks": "{n} gloo ranks (torchrun)"}

WHY_SLOWER = """\
On this machine the {n} ranks add no hardware: they run on the same {cores} cores and read
their weights through the same memory bus as the one process, and decode is bound by that
bus, not by arithmetic. {threads_sentence} Splitting each matmul across {n} processes halves
the weights each rank reads, but both halves still go through the same bandwidth on the
same cores. What tensor parallelism adds is overhead: every layer ends its attention and
its MLP with an all-reduce, and the logits are gathered at the end, so each decoded token
waits for about 2 × layers + 1 gloo exchanges between processes (over TCP loopback, tens of
microseconds or more each, and a rank that the scheduler delays holds up the others). Each
rank also pays for its own imports and torchrun's start-up. Tensor parallelism is for a
model that does not fit one device; on one CPU machine it only checks the sharded path.
In bf16 the ranks also add each layer's partial sums in another order than one process,
so the greedy tokens can leave one process's at a near-tie of the random weights (see
Checks)."""


def threads_sentence(threads: list[int], cores: int, n: int) -> str:
    """The one process's threads, as measured: all cores (the default) or fewer (OMP_NUM_THREADS)."""
    t = max(threads)
    if t >= cores:
        return f"The one process already uses every core for its matmuls ({t} threads on {cores} cores)."
    return (f"The one process ran with {t} thread(s) here (OMP_NUM_THREADS), as each rank did, so "
            f"the {n} ranks together had {n * t} threads against its {t}.")


def busy_note(runs: list[dict]) -> str:
    """How much of the CPUs others took while the summarised runs ran (run.py measures it)."""
    ok = [r for r in runs if r["status"] == "ok" and r.get("background_cpu_share") is not None]
    busy = [f"rep {r['rep']} {r['system']} ({r['background_cpu_share']:.0%})" for r in ok
            if r["background_cpu_share"] > IDLE_SHARE]
    repeated = len(runs) - len([r for r in runs if r["status"] == "ok"])
    text = (f"The machine is shared with other jobs: {repeated} attempt(s) were repeated because "
            f"others used over {IDLE_SHARE:.0%} of the CPUs during them. ")
    if not busy:
        return text + f"Others used under {IDLE_SHARE:.0%} during every summarised run."
    return text + (f"Others used under {IDLE_SHARE:.0%} during {len(ok) - len(busy)} of the {len(ok)} "
                   f"summarised runs, and more, even after the retries, in {', '.join(busy)}: treat "
                   "those timings as rough (the memory figures do not depend on it).")


def runs_table(runs: list[dict]) -> str:
    """Every attempt, disturbed and failed ones included."""
    lines = ["| rep | measurement | status | others' CPU | wall (s) | load (s, slowest rank) | decode (tok/s) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        share, ok = r.get("background_cpu_share"), r["status"] == "ok"
        cells = [r["rep"], r["system"], r["status"], "—" if share is None else f"{share:.0%}",
                 f"{r['wall_seconds']:.1f}" if r.get("wall_seconds") else "—",
                 f"{r['load_seconds']:.2f}" if ok else "—",
                 f"{r['decode_tokens_per_second']:.2f}" if ok and r["decode_tokens_per_second"] else "—"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def measured_line(generate: dict, n: int) -> str:
    """The figures the paragraph below explains, from this run (medians)."""
    rate = {name: (g["decode_tokens_per_second"] or {}).get("median") for name, g in generate.items()}
    one, ranks = rate.get("generate-one-process"), rate.get("generate-ranks")
    if not (one and ranks):
        return ""
    single = rate.get("generate-one-process-1-thread")
    return (f"Here {n} ranks decoded {ranks:.2f} tok/s against {one:.2f} for one process "
            f"({ranks / one:.2f}x)" + (f" and {single:.2f} for one process with 1 thread" if single else "")
            + f"; the recipe's load took {generate['generate-ranks']['load_seconds']['median']:.2f} s "
            f"against {generate['generate-one-process']['load_seconds']['median']:.2f} s.")


def render(doc: dict) -> str:
    meta, w, n = doc["meta"], doc["workload"], doc["nproc"]
    summary = summarise(doc["runs"])
    threads = summary["generate"].get("generate-one-process", {}).get("threads") or [w["threads"]]
    parts = [
        f"# Tensor parallelism on CPU: `{w['preset']}` preset, {n} gloo ranks against 1 process",
        "",
        f"Measured {meta['date']} on {meta['machine']}. {meta['software']}.",
        "",
        f"Random-weight `{w['preset']}` checkpoint ({w['model_bytes'] / GB:.2f} GB bf16). "
        f"{meta['reps']} repetition(s), the measurements interleaved, each a fresh process (one "
        f"`torchrun --nproc_per_node {n} --standalone` job, gloo, for the ranks), page cache warm. "
        "Each cell: median (min–max) over the completed runs.",
        "",
        busy_note(doc["runs"]),
        "",
        "## Per rank: leangen's tensor-parallel load against a full state dict on every rank",
        "",
        "The baseline does what torchtune's `dev/generate_v2_distributed` does: its "
        "`FullModelHFCheckpointer` reads the whole state dict on every rank, then "
        "`load_from_full_model_state_dict` shards it into the same parallelized model. leangen "
        "takes each rank's rows or columns straight from the mmap (row shards are views of the "
        "page cache; column shards are copied). Peak anon growth: RssAnon sampled every "
        "millisecond during the load, minus its value after imports, process group and mesh; "
        "× model is that over the checkpoint's bytes. Params held: the rank's own parameter bytes.",
        "",
        load_table(summary["loads"], w["model_bytes"]),
        "",
        load_ratio_table(summary["loads"]),
        "",
        f"## 1 process against {n} gloo ranks: the generate recipe",
        "",
        f"leangen's generate recipe, {w['prompt_token_count']} prompt tokens, greedy, "
        f"{w['new_tokens']} new tokens, bf16, the same config as run.py's `leangen` system; the "
        "ranks decode in lockstep. Load: the recipe's `load_seconds` (rank 0's under torchrun). "
        "Peak anon: summed over the process tree from outside (every rank, and torchrun's launcher).",
        "",
        generate_table(summary["generate"], n),
        "",
        f"## Why {n} gloo ranks are slower here",
        "",
        measured_line(summary["generate"], n),
        "",
        WHY_SLOWER.format(n=n, cores=w["cores"], threads_sentence=threads_sentence(threads, w["cores"], n)),
    ]
    parts += ["", "## Checks", ""] + [f"- {c}" for c in doc["checks"]]
    if doc.get("notes"):
        parts += ["", "## Notes", ""] + [f"- {note}" for note in doc["notes"]]
    parts += ["", "## Runs", "", runs_table(doc["runs"]), "", "## Commands", "", "```",
              *doc["commands"], "```", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Worker for run.py --nproc; run benchmarks/run.py instead.")
    p.add_argument("--worker", nargs=4, metavar=("MODE", "CHECKPOINT", "MODEL_TYPE", "OUT"))
    args = p.parse_args(argv)
    if not args.worker:
        # The measurement moved into the runner, to be interleaved and reported like the others.
        print("use: python benchmarks/run.py --preset llama3_2_1b --nproc 2 [--reps N]", file=sys.stderr)
        return 2
    worker(*args.worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
