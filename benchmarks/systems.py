"""The systems: how each is started, and how its figures are read back.

leangen, torchtune and transformers in bf16; leangen and transformers quantized
with torchao (``-int8``, ``-int4``: weight-only, int4 in groups of 32, leangen's default and Q4_0's); llama.cpp
through llama-cpp-python on GGUF files made by llama.cpp's own converter and
quantizer (``llama.cpp-bf16``, ``-Q8_0``, ``-Q4_0``; see ``gguf_files.py``).
llama.cpp is given the same number of threads as torch uses, the same prompt ids,
and decodes the same number of tokens greedily.

Boundaries (seconds are wall time):
- first token: from spawning the process to the first generated token, so imports
  count. leangen and transformers are observed from outside: the arrival of the
  first streamed stdout bytes (a leading token whose text is empty prints
  nothing; leangen's time then steps back over it at its decode rate).
  torchtune's recipe does not stream, so its first
  token is derived from its log: arrival of "Time for inference: T sec total",
  minus T, plus T / N (one average step stands in for the prefill).
- load: as each system reports it, imports excluded. leangen: its metrics
  ``load_seconds`` (``load_model``: meta build, mmap, assign, buffers). transformers:
  around ``from_pretrained``. torchtune: between its log lines "Running
  InferenceRecipe" (start of ``main``) and "Model is initialized" (checkpoint read,
  conversion, model build, ``load_state_dict``), stamped on arrival.
  llama.cpp: around ``Llama(model_path=...)`` (mmap of the GGUF, plus repacking
  Q4_0 weights for its CPU kernels). Quantized leangen and transformers: the load
  includes quantizing (leangen streams it layer by layer while loading;
  transformers quantizes the loaded bf16 model), and the quantize time is recorded
  separately where the system reports it.
- decode tokens/s: leangen, transformers and llama.cpp: (N - 1) / (time from the
  first to the last token), prefill excluded. torchtune: its own N / T, prefill
  included. llama.cpp's first token is observed like transformers': its driver
  prints a line the moment ``Llama.generate`` yields the first token.
- transformers is handed the prompt ids, so unlike the other two it loads no
  tokenizer before its first token (for Llama 3's 128k-rank file that is about
  0.5 s and 0.05 GB of anonymous memory in leangen and torchtune).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks import gguf_files
from benchmarks.checkpoints import shard_files
from benchmarks.measure import ProcessRun
from benchmarks.workload import DTYPE, SEED, Workload

REPO_ROOT = Path(__file__).resolve().parent.parent
_TORCHTUNE_TIMING = re.compile(r"Time for inference: ([\d.]+) sec total, ([\d.]+) tokens/sec")


class System:
    name = ""
    # The weight format its decode reads, for the roofline (report.BYTES_PER_WEIGHT).
    weights = "bf16"

    def unavailable(self) -> str | None:
        """Why this system cannot run here (it is then skipped with a note), or None."""
        return None

    def prepare(self, w: Workload) -> None:
        """Write whatever config files the system reads (once per benchmark run)."""

    def argv(self, w: Workload, run_dir: Path) -> list[str]:
        raise NotImplementedError

    def parse(self, run: ProcessRun, w: Workload, run_dir: Path) -> dict:
        raise NotImplementedError

    def cleanup(self, run_dir: Path) -> None:
        """Remove what one run wrote outside ``run_dir``."""


class Leangen(System):
    name = "leangen"
    quantize = None
    # recipe keys on top of the shared config (prepack, quantize_cache)
    extra: dict = {}

    def prepare(self, w: Workload) -> None:
        config = {
            "model": w.model_block,
            "checkpoint": {"path": str(w.checkpoint_dir), "model_type": "auto"},
            "tokenizer": w.tokenizer_block,
            "device": w.device,
            "dtype": DTYPE,
            "seed": SEED,
            "prompt": w.prompt_block,
            "max_new_tokens": w.new_tokens,
            "temperature": 0.0,
            "top_k": None,
            "top_p": None,
            "enable_kv_cache": True,
            "compile": False,
        }
        if self.quantize:
            # null: every run quantizes (a first load); leangen-int4-cached sets a folder
            config.update(quantize=self.quantize, quantize_cache=None)
        config.update(self.extra)
        _write_yaml(self.config_path(w), config, "leangen generate recipe")

    def config_path(self, w: Workload) -> Path:
        return w.work_dir / f"{self.name.replace('-', '_')}_generate.yaml"

    def argv(self, w: Workload, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "leangen.generate", "--config", str(self.config_path(w)),
                f"output_file={run_dir / 'output.jsonl'}", f"metrics_file={run_dir / 'metrics.json'}"]

    def parse(self, run: ProcessRun, w: Workload, run_dir: Path) -> dict:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        record = json.loads((run_dir / "output.jsonl").read_text().splitlines()[0])
        rate = metrics.get("tokens_per_second")
        silent = _silent_leading_tokens(w, record["tokens"])
        first = None
        if run.first_stdout_seconds is not None and silent is not None:
            # Tokens whose text is empty print nothing; step back over them.
            first = run.first_stdout_seconds - (silent / rate if silent and rate else 0.0)
        return {
            "load_seconds": metrics["load_seconds"],
            "quantize_cache": metrics.get("quantize_cache"),
            # leangen quantizes while loading; a separate figure only if it reports one
            "quantize_seconds": metrics.get("quantize_seconds"),
            "model_bytes": metrics.get("model_bytes"),
            "first_token_seconds": first,
            "decode_tokens_per_second": rate,
            "generated_tokens": metrics["generated_tokens"],
            "prompt_tokens": record["prompt_tokens"],
            "tokens": record["tokens"],
            "reported": metrics,
        }


class Torchtune(System):
    name = "torchtune"

    def prepare(self, w: Workload) -> None:
        config = {
            "output_dir": "???",  # mandatory: each run passes a fresh temp dir
            "model": w.model_block,
            "checkpointer": {
                "_component_": "torchtune.training.FullModelHFCheckpointer",
                "checkpoint_dir": str(w.checkpoint_dir),
                "checkpoint_files": shard_files(w.checkpoint_dir),
                "output_dir": "${output_dir}",
                "model_type": w.preset.torchtune_model_type,
            },
            "device": w.device,
            "dtype": DTYPE,
            "seed": SEED,
            "tokenizer": w.tokenizer_block,
            "prompt": w.prompt_block,
            "max_new_tokens": w.new_tokens,
            # The recipe divides by max(temperature, 1e-5): 0 is greedy.
            "temperature": 0.0,
            "top_k": None,
            "enable_kv_cache": True,
            "quantizer": None,
        }
        _write_yaml(self.config_path(w), config, "torchtune 0.6.1 `tune run generate`")

    def config_path(self, w: Workload) -> Path:
        return w.work_dir / "torchtune_generation.yaml"

    def argv(self, w: Workload, run_dir: Path) -> list[str]:
        # The checkpointer creates output_dir; a fresh temp dir per run, never the checkpoint's.
        output_dir = tempfile.mkdtemp(prefix="tt-out-", dir=run_dir)
        return [_tune_executable(), "run", "generate", "--config", str(self.config_path(w)),
                f"output_dir={output_dir}"]

    def parse(self, run: ProcessRun, w: Workload, run_dir: Path) -> dict:
        started = run.find_line("Running InferenceRecipe")
        ready = run.find_line("Model is initialized")
        timing = run.find_line("Time for inference")
        match = _TORCHTUNE_TIMING.search(timing.text)
        seconds, rate = float(match.group(1)), float(match.group(2))
        generated = _torchtune_token_count(seconds, rate, w.new_tokens)
        return {
            "load_seconds": ready.seconds - started.seconds,
            "first_token_seconds": timing.seconds - seconds + seconds / generated,
            "decode_tokens_per_second": rate,
            "generated_tokens": generated,
            "prompt_tokens": w.prompt_tokens,  # the runner computed them with the recipe's call
            "tokens": None,
            "reported": {"inference_seconds": seconds, "tokens_per_second": rate},
        }

    def cleanup(self, run_dir: Path) -> None:
        for out in run_dir.glob("tt-out-*"):
            shutil.rmtree(out, ignore_errors=True)


class LeangenQuantized(Leangen):
    """leangen's recipe with ``quantize: int8 | int4``, quantizing on every load."""

    def __init__(self, kind: str):
        self.quantize = self.weights = kind
        self.name = f"leangen-{kind}"


class LeangenPrepacked(Leangen):
    """bf16 with ``prepack: true``: oneDNN-packed Linears, a copy in RAM for faster decode."""

    name = "leangen-prepack"
    extra = {"prepack": True}


class LeangenCached(LeangenQuantized):
    """int4 from leangen's quantized cache: ``prepare`` runs the recipe once to write the
    entry, so every measured run is a cache hit (its metrics say so)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.name = f"leangen-{kind}-cached"

    def prepare(self, w: Workload) -> None:
        self.extra = {"quantize_cache": str(w.work_dir / "quant_cache")}
        super().prepare(w)
        warm = [sys.executable, "-m", "leangen.generate", "--config", str(self.config_path(w)),
                "max_new_tokens=1"]
        done = subprocess.run(warm, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:  # the runner skips the system with this line as the reason
            raise RuntimeError(f"writing the quantized cache failed: {done.stderr.strip()[-500:]}")


class Transformers(System):
    name = "transformers"
    quantize = None

    def argv(self, w: Workload, run_dir: Path) -> list[str]:
        argv = [sys.executable, str(REPO_ROOT / "benchmarks" / "hf_driver.py"), str(w.checkpoint_dir),
                "--prompt-ids", ",".join(map(str, w.prompt_tokens)), "--new-tokens", str(w.new_tokens),
                "--device", w.device]
        return argv + (["--quantize", self.quantize] if self.quantize else [])

    def parse(self, run: ProcessRun, w: Workload, run_dir: Path) -> dict:
        return _driver_figures(run, w)


class TransformersQuantized(Transformers):
    """transformers with torchao weight-only quantization (``hf_driver.py --quantize``)."""

    def __init__(self, kind: str):
        self.quantize = self.weights = kind
        self.name = f"transformers-{kind}"


class LlamaCpp(System):
    """llama.cpp through llama-cpp-python (the ``bench`` extra) on a GGUF file."""

    def __init__(self, kind: str):
        self.kind = self.weights = kind
        self.name = f"llama.cpp-{kind}"

    def unavailable(self) -> str | None:
        if gguf_files.installed_version() is None:
            return ("llama-cpp-python is not installed (it is in the bench extra: "
                    "pip install -e '.[bench]')")
        return None

    def prepare(self, w: Workload) -> None:
        # One call makes every GGUF the run needs (bf16 first, then the quantized ones).
        self.path = gguf_files.ensure_ggufs(w.checkpoint_dir, w.cache_dir, w.preset.name,
                                            w.gguf_kinds, w.threads, log=_progress)[self.kind]

    def argv(self, w: Workload, run_dir: Path) -> list[str]:
        return [sys.executable, str(REPO_ROOT / "benchmarks" / "llamacpp_driver.py"), "run",
                str(self.path), "--prompt-ids", ",".join(map(str, w.prompt_tokens)),
                "--new-tokens", str(w.new_tokens), "--threads", str(w.threads)]

    def parse(self, run: ProcessRun, w: Workload, run_dir: Path) -> dict:
        return _driver_figures(run, w)


SYSTEMS = {s.name: s for s in (
    Leangen(), LeangenPrepacked(), LeangenQuantized("int8"), LeangenQuantized("int4"),
    LeangenCached("int4"), LeangenCached("int8"), Torchtune(), Transformers(),
    TransformersQuantized("int8"), TransformersQuantized("int4"),
    LlamaCpp("bf16"), LlamaCpp("Q8_0"), LlamaCpp("Q4_0"),
)}


def _driver_result(run: ProcessRun) -> dict:
    line = run.find_line("RESULT ")
    return json.loads(line.text.split("RESULT ", 1)[1])


def _driver_figures(run: ProcessRun, w: Workload) -> dict:
    """The figures of a driver script (transformers, llama.cpp) that prints one RESULT line
    and streams its tokens, so its first token is observed from outside."""
    result = _driver_result(run)
    return {
        "load_seconds": result["load_seconds"],
        "quantize_seconds": result.get("quantize_seconds"),
        "model_bytes": result.get("model_bytes"),
        "first_token_seconds": run.first_stdout_seconds,
        "decode_tokens_per_second": result["tokens_per_second"],
        "generated_tokens": result["generated_tokens"],
        "prompt_tokens": w.prompt_tokens,
        "tokens": result["tokens"],
        "reported": {k: v for k, v in result.items() if k != "tokens"},
    }


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _silent_leading_tokens(w: Workload, tokens: list[int]) -> int | None:
    """How many generated tokens leangen streamed before any text showed, or None if none did."""
    from leangen.decode.text import IncrementalDecoder

    decoder = IncrementalDecoder(w.tokenizer, w.prompt_tokens)
    stops = set(w.tokenizer.stop_tokens)
    for i in range(len(tokens)):
        shown = tokens[:i + 1]
        if shown[-1] in stops:
            shown = shown[:-1]
        if decoder.new_text(shown):
            return i
    return None


def _torchtune_token_count(seconds: float, rate: float, asked: int) -> int:
    """N from the recipe's "T sec total, R tokens/sec", both printed to 0.01.

    T * R is too coarse for short runs, so when ``asked`` is consistent with the
    rounding it is taken (the recipe only stops early on a stop token).
    """
    lo, hi = (rate - 0.005) * (seconds - 0.005), (rate + 0.005) * (seconds + 0.005)
    return asked if lo <= asked <= hi else round(seconds * rate)


def _tune_executable() -> str:
    beside = Path(sys.executable).with_name("tune")
    return str(beside) if beside.exists() else shutil.which("tune") or "tune"


def _write_yaml(path: Path, config: dict, what: str) -> None:
    header = f"# Generated by benchmarks/run.py for {what}; rewritten on every run.\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
