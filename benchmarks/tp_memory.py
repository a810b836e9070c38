"""Tensor-parallel load per rank: leangen's shard taking against a full state dict on every rank.

    python -m benchmarks.tp_memory [--preset llama3_2_1b] [--nproc 2] [--decode 32]

For each way of loading, one ``torchrun --nproc_per_node N`` job (gloo on CPU) whose
ranks each report their load time and their peak anonymous memory growth during the
load (RssAnon sampled every millisecond, minus its value after imports, process group
and mesh), plus VmHWM:

- ``leangen``: ``load_model(..., parallel=TensorParallel)``: each rank takes only its
  rows/columns from the mmap (row shards are views; column shards are copied).
- ``full``: what torchtune's ``dev/generate_v2_distributed`` does: its
  ``FullModelHFCheckpointer`` loads the whole state dict on every rank, then
  ``load_from_full_model_state_dict`` shards it into the same parallelized meta model.
- ``one process``: ``load_model`` without tensor parallelism, for reference.

``--decode N`` also times the generate recipe (greedy, N tokens) on one process against
N ranks. Random weights from ``benchmarks.checkpoints`` (cached in ``--cache-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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

    from leangen.convert import Geometry
    from leangen.hf_config import builder_for, parse_config
    from leangen.load import build_on_meta

    files = sorted(p.name for p in Path(checkpoint).glob("model-*.safetensors"))
    with tempfile.TemporaryDirectory() as out:
        state = FullModelHFCheckpointer(checkpoint_dir=checkpoint, checkpoint_files=files, model_type=model_type,
                                        output_dir=out).load_checkpoint()[training.MODEL_KEY]
    config = parse_config(json.loads((Path(checkpoint) / "config.json").read_text()))
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

    from leangen.parallel import TensorParallel

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


# --- the driver ---------------------------------------------------------------------------

def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return done


def measure_loads(checkpoint: Path, model_type: str, nproc: int, work: Path) -> list[dict]:
    rows = []
    for mode in ("leangen", "full", "one"):
        out = work / mode
        launcher = _torchrun(nproc) + ["-m"] if mode != "one" else [sys.executable, "-m"]
        _run(launcher + ["benchmarks.tp_memory", "--worker", mode, str(checkpoint), model_type, str(out)],
             cwd=BENCH_DIR.parent)
        for rank in range(nproc if mode != "one" else 1):
            rows.append(json.loads(Path(f"{out}.rank{rank}").read_text()))
    return rows


def measure_decode(checkpoint: Path, tokenizer: dict, nproc: int, tokens: int, work: Path) -> dict:
    """tok/s of the generate recipe on one process (1 and ``nproc`` threads) and on ``nproc``
    ranks (torchrun gives each OMP_NUM_THREADS=1)."""
    config = work / "generate.yaml"
    from omegaconf import OmegaConf

    config.write_text(OmegaConf.to_yaml({
        "model": "auto", "checkpoint": {"path": str(checkpoint)}, "tokenizer": tokenizer, "device": "cpu",
        "prompt": "one two three four five six seven eight", "max_new_tokens": tokens, "temperature": 0,
        "top_k": None}))
    out = {}
    one = [sys.executable, "-m"]
    runs = {"one process, 1 thread": (one, ["threads=1"]),
            f"one process, {nproc} threads": (one, [f"threads={nproc}"]),
            f"{nproc} ranks, 1 thread each": (_torchrun(nproc) + ["-m"], [])}
    for i, (name, (launcher, extra)) in enumerate(runs.items()):
        metrics = work / f"metrics-{i}.json"
        _run(launcher + ["leangen.generate", "--config", str(config), f"metrics_file={metrics}", *extra],
             cwd=BENCH_DIR.parent, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        m = json.loads(metrics.read_text())
        out[name] = {"tokens_per_second": m["tokens_per_second"], "threads": m["threads"],
                     "first_token_seconds": m["first_token_seconds"]}
    return out


def report(rows: list[dict], model_bytes: int, decode: dict | None, preset: str, nproc: int) -> str:
    lines = [f"Tensor-parallel load, preset {preset} ({model_bytes / GB:.2f} GB), {nproc} gloo ranks on CPU.",
             "Peak anon growth: RssAnon sampled during the load minus its value after imports, process "
             "group and mesh.", "",
             "| load | rank | seconds | peak anon growth (GB) | x model | VmHWM (GB) | params held (GB) |",
             "|---|---|---|---|---|---|---|"]
    names = {"leangen": "leangen (shard from the mmap)", "full": "full state dict per rank (torchtune)",
             "one": "one process, no TP"}
    for r in rows:
        lines.append(f"| {names[r['mode']]} | {r['rank']} | {r['load_seconds']:.2f} | "
                     f"{r['peak_anon_growth'] / GB:.3f} | {r['peak_anon_growth'] / model_bytes:.2f} | "
                     f"{r['vm_hwm'] / GB:.2f} | {r['param_bytes'] / GB:.2f} |")
    if decode:
        lines += ["", "| generate | threads a process | decode tok/s | first token (s) |", "|---|---|---|---|"]
        for name, d in decode.items():
            lines.append(f"| {name} | {d['threads']} | {d['tokens_per_second']:.2f} | "
                         f"{d['first_token_seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3_2_1b")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--decode", type=int, default=0, metavar="N", help="also time N greedy tokens")
    p.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    p.add_argument("--worker", nargs=4, metavar=("MODE", "CHECKPOINT", "MODEL_TYPE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    from benchmarks.checkpoints import checkpoint_bytes, ensure_checkpoint
    from benchmarks.presets import PRESETS
    from benchmarks.tokenizer_files import TOKENIZER_FILE

    preset = PRESETS[args.preset]
    checkpoint = ensure_checkpoint(preset, args.cache_dir)
    model_type = preset.torchtune_model_type or "LLAMA2"
    with tempfile.TemporaryDirectory() as work:
        rows = measure_loads(checkpoint, model_type, args.nproc, Path(work))
        decode = None
        if args.decode:
            tokenizer = {"_component_": preset.tokenizer_builder, "path": str(checkpoint / TOKENIZER_FILE)}
            decode = measure_decode(checkpoint, tokenizer, args.nproc, args.decode, Path(work))
    text = report(rows, checkpoint_bytes(preset), decode, preset.name, args.nproc)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"preset": preset.name, "nproc": args.nproc, "loads": rows,
                                         "decode": decode}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
