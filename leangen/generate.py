"""The generate recipe: ``tune run leangen/generate --config X [key=value ...]``.

Also ``python -m leangen.generate --config X`` and the ``leangen-generate`` script.
X is a YAML path or a packaged config name (``demo``, ``mistral7b``, ...).

Under torchrun (``tune run --nproc_per_node N leangen/generate ...`` or ``torchrun
--nproc_per_node N -m leangen.generate ...``) the model is tensor-parallel over the N
ranks (``leangen.parallel.tensor_parallel``): each rank loads only its shard, all ranks decode the same
tokens, and only rank 0 prints and writes files.
"""


import sys

if __name__ == "__main__":  # python -m / tune run: import and run this module through the entry
    from leangen.recipe.console import launch  # point, so that Ctrl-C during its imports is one line

    sys.exit(launch("leangen.generate"))

import functools
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from leangen.decode.generation import Completions, check_fits, complete
from leangen.decode.sampling import check_sampling, sample
from leangen.decode.text import IncrementalDecoder, Prompt, prompts_for
from leangen.errors import ConfigError, Interrupted
from leangen.parallel.ranks import Ranks
from leangen.recipe.cli import config_key, output_path, parse_args, run_recipe
from leangen.recipe.components import (
    ModelKeys,
    compile_decode,
    model_from_config,
    quant_spec,
    tokenizer_from_config,
)
from leangen.recipe.metrics import (
    load_metrics,
    model_bytes,
    peak_device_bytes,
    peak_host_rss_bytes,
    summary,
)
from leangen.recipe.outputs import ResultFile, write_result
from leangen.recipe.setup import Placement


@dataclass
class GenerateConfig(ModelKeys):
    """The recipe's keys; docs/configuration.md#generate-keys documents each, --help lists them."""

    RECIPE: ClassVar[str] = "generate"

    seed: Optional[int] = config_key(1234, "random seed for sampling (null: not seeded)")
    prompt: Optional[Any] = config_key(None, "a string (raw completion after BOS) or {system, user} (chat)",
                                       cli_type=Optional[Union[str, Dict[str, Optional[str]]]])
    add_bos: str = config_key("auto", "BOS before a raw prompt: auto (as transformers' "
                                      "tokenizer(text) for the folder) | true | false")
    prompts_file: Optional[str] = config_key(None, ".txt (a prompt a line) or .jsonl ({prompt} or "
                                             "{messages}); overrides prompt")
    batch_size: int = config_key(8, "prompts from prompts_file decoded together")
    max_new_tokens: int = config_key(300, "tokens to generate at most per prompt")
    temperature: float = config_key(0.6, "0 = greedy")
    top_k: Optional[int] = config_key(300, "sample from the k most likely tokens (null: all)")
    top_p: Optional[float] = config_key(None, "nucleus sampling mass (null: off)")
    enable_kv_cache: bool = config_key(True, "decode with a KV cache sized to need")
    compile: bool = config_key(False, "torch.compile the decode step")
    output_file: Optional[str] = config_key(None, "jsonl, a record a prompt; each saved as it finishes, "
                                           "renamed into place at the end")
    metrics_file: Optional[str] = config_key(None, "JSON with the run's figures")
    # Accepted so that torchtune's own generation configs run unchanged:
    output_dir: Optional[str] = config_key(None, "accepted from torchtune configs; never written to")
    quantizer: Optional[Any] = config_key(None, "a torchtune quantizer block: runs as quantize: int4")
    log_level: Optional[str] = config_key(None, "accepted from torchtune configs; ignored")
    tensor_parallel_plan: Optional[Any] = config_key(
        None, "under torchrun: {_component_: a torchtune plan} (null: the model family's, "
              "e.g. torchtune.models.llama3.base_llama_tp_plan); one process ignores it")


class GenerateRecipe:
    def __init__(self, cfg: DictConfig):
        placement = Placement.from_config(cfg)
        self.ranks, self.device = placement.ranks, placement.device
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        self.started = time.perf_counter()
        self.metrics: dict[str, Any] = {"threads": placement.threads}

    def setup(self, cfg: DictConfig) -> None:
        """Everything that can fail on the user's input fails here, before decoding starts."""
        self.outputs = _reject_bad_options(cfg, self.ranks)
        self.tokenizer = tokenizer_from_config(cfg)
        prompt = cfg.prompt
        if OmegaConf.is_config(prompt):  # {system, user}; resolved, so an escaped ${ stays literal
            prompt = OmegaConf.to_container(prompt, resolve=True)
        self.prompts = prompts_for(prompt, self.tokenizer, prompts_file=cfg.prompts_file,
                                   add_bos=cfg.add_bos)  # bad prompts fail before the load
        parallel = None
        if self.ranks.distributed:
            from leangen.parallel.tensor_parallel import TensorParallel

            parallel = TensorParallel.start(self.device, cfg.tensor_parallel_plan)
        longest = max(len(p.tokens) for p in self.prompts) + cfg.max_new_tokens  # the largest KV cache
        self.model = model_from_config(cfg, self.device, positions=longest, parallel=parallel)
        self.metrics.update(load_metrics(self.model))
        check_fits(self.model, [p.tokens for p in self.prompts], cfg.max_new_tokens)
        self.decode_forward = compile_decode(self.model) if cfg.compile else None
        self.sampler = functools.partial(sample, temperature=cfg.temperature, top_k=cfg.top_k,
                                         top_p=cfg.top_p)
        if parallel is not None:
            self.sampler = parallel.same_tokens(self.sampler)  # rank 0's tokens on every rank
            self.metrics["tensor_parallel"] = {"ranks": parallel.size, "notes": parallel.notes}

    def generate(self, cfg: DictConfig) -> list[dict]:
        # 1. the prompts, tokenized and checked in setup
        prompts, (output_file, metrics_file) = self.prompts, self.outputs
        main = self.ranks.is_main  # the other ranks compute the same tokens, silently
        stream = len(prompts) == 1 and main
        records, timing = [], {"decode_seconds": 0.0, "decode_steps": 0}
        # 2-4. prefill, decode and print, one batch at a time; each record is saved as it is done
        with ResultFile(output_file) if output_file and main else nullcontext() as out, \
                _progress(prompts, main) as bar:
            try:
                for i in range(0, len(prompts), cfg.batch_size):
                    batch = prompts[i:i + cfg.batch_size]
                    finished = self._generate_batch(cfg, batch, stream, timing)
                    for record in finished:  # saved before it is shown: what was printed is kept
                        records.append(record)
                        if out:
                            out.add_line(json.dumps(record))
                    if not stream and main:
                        _print_batch(finished, batch)
                    bar.update(len(batch))
            except KeyboardInterrupt as e:
                saved = f"; they are in {output_file}" if out and out.lines else ""
                raise Interrupted(f"{len(records)} of {len(prompts)} completions were finished{saved}.") from e
        # 5. metrics
        self._record_metrics(sum(len(r["tokens"]) for r in records), len(prompts), **timing)
        if main:
            if metrics_file:
                write_result(metrics_file, json.dumps(self.metrics, indent=2) + "\n")
            print(summary(self.metrics), file=sys.stderr)
        return records

    def _generate_batch(self, cfg: DictConfig, batch: list[Prompt], stream: bool,
                        timing: dict) -> list[dict]:
        decoders = [IncrementalDecoder(self.tokenizer, p.tokens) for p in batch]
        if stream and batch[0].raw:
            print(batch[0].source, end="", flush=True)
        clock: dict[str, Any] = {"steps": 0, "decode_start": None}

        def on_step(completions: Completions) -> None:
            if clock["decode_start"] is None:  # the first token closes the prefill
                clock["decode_start"] = time.perf_counter()
                self.metrics.setdefault("first_token_seconds", clock["decode_start"] - self.started)
            clock["steps"] += 1
            if stream:
                print(decoders[0].new_text(completions.text_ids(0)), end="", flush=True)

        done = complete(self.model, [p.tokens for p in batch], max_new_tokens=cfg.max_new_tokens,
                        sampler=self.sampler, stop_tokens=list(self.tokenizer.stop_tokens),
                        use_cache=cfg.enable_kv_cache, decode_forward=self.decode_forward,
                        on_step=on_step)
        if clock["decode_start"] is not None:
            timing["decode_seconds"] += time.perf_counter() - clock["decode_start"]
            timing["decode_steps"] += max(clock["steps"] - 1, 0)
        records = [_record(p, done.tokens[i], decoders[i].text(done.text_ids(i)))
                   for i, p in enumerate(batch)]
        if stream:
            print(flush=True)
        return records

    def _record_metrics(self, generated: int, sequences: int, decode_steps: int,
                        decode_seconds: float) -> None:
        """Decode figures exclude the first token of each sequence, which prefill made."""
        nbytes = model_bytes(self.model)
        rate = decode_seconds > 0 and decode_steps > 0
        self.metrics.update(
            generated_tokens=generated,
            tokens_per_second=(generated - sequences) / decode_seconds if rate else None,
            model_bytes=nbytes,
            # every decode step reads all weights once, whatever the batch size
            bandwidth_gb_per_s=nbytes * decode_steps / decode_seconds / 1e9 if rate else None,
            peak_host_rss_bytes=peak_host_rss_bytes(),
            peak_device_bytes=peak_device_bytes(self.device),
            quantized=self.model.leangen.quantized,  # {quantized, skipped} Linear counts, or None
            prepacked=self.model.leangen.prepacked,  # Linears in oneDNN's layout, or None
        )


def _print_batch(records: list[dict], batch: list[Prompt]) -> None:
    """Each completion (after its prompt, for raw prompts) and a blank line; tqdm.write
    keeps a progress bar on a terminal's stderr intact."""
    for record, prompt in zip(records, batch):
        tqdm.write((prompt.source if prompt.raw else "") + record["text"] + "\n", file=sys.stdout)
    sys.stdout.flush()


def _progress(prompts: list[Prompt], main: bool = True) -> tqdm:
    """done/total on stderr, for a prompts file and only on a terminal (and rank 0): a
    log or a pipe must hold only the summary."""
    shown = len(prompts) > 1 and sys.stderr.isatty() and main
    return tqdm(total=len(prompts), desc="prompts", unit="prompt", file=sys.stderr,
                disable=not shown, leave=False)


def _reject_bad_options(cfg: DictConfig, ranks: Ranks = Ranks()
                        ) -> tuple[Optional[Path], Optional[Path]]:
    """Rejects bad option combinations early; returns the checked output and metrics paths."""
    try:
        check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    for key in ("max_new_tokens", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]}: give at least 1.")
    quant_spec(cfg)  # a bad quantize/quantizer value fails before the load
    if ranks.distributed:
        unsupported = [k for k in ("prepack", "compile") if cfg.get(k)]  # quantize: per rank
        if unsupported:
            raise ConfigError(f"{unsupported[0]} with tensor parallelism ({ranks.world_size} ranks) is not "
                              "supported yet: run it on one process, or drop it.")
    if cfg.get("prepack") and cfg.compile:
        # inductor cannot lower PrepackedLinear, and its own freezing did not pack the
        # Linears of a decode step (its code keeps plain mm): compiling would drop the gain
        raise ConfigError("prepack and compile do not combine: torch.compile cannot compile the "
                          "packed Linears, and compiling unpacked loses prepack's speed. "
                          "Use prepack: true alone for CPU decode speed, or compile: true alone.")
    if cfg.model is None or cfg.tokenizer is None:
        raise ConfigError("the config needs a 'model' and a 'tokenizer' block.")
    return output_path("output_file", cfg.output_file), output_path("metrics_file", cfg.metrics_file)


def _record(prompt: Prompt, tokens: list[int], text: str) -> dict:
    return {"prompt": prompt.source, "prompt_tokens": prompt.tokens, "tokens": tokens, "text": text}


@run_recipe
def main(argv: list[str]) -> None:
    cfg = parse_args(argv, GenerateConfig)
    recipe = GenerateRecipe(cfg)
    recipe.setup(cfg)
    recipe.generate(cfg)

