"""The generate recipe: ``tune run leangen/generate --config X [key=value ...]``.

Also ``python -m leangen.generate --config X`` and the ``leangen-generate`` script.
X is a YAML path or a packaged config name (``demo``, ``mistral7b``, ...).
"""


import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from leangen.components import ModelKeys, model_from_config, tokenizer_from_config
from leangen.config import output_path, parse_args, run_recipe
from leangen.errors import ConfigError
from leangen.generation import generate_steps
from leangen.load import resolve_device
from leangen.metrics import model_bytes, peak_device_bytes, peak_host_rss_bytes, summary
from leangen.sampling import check_sampling, sample
from leangen.text import IncrementalDecoder, Prompt, prompts_from_config


@dataclass
class GenerateConfig(ModelKeys):
    """The recipe's keys; README "Configuration" documents each."""

    seed: Optional[int] = 1234
    prompt: Optional[Any] = None
    prompts_file: Optional[str] = None
    batch_size: int = 8  # prompts from prompts_file decoded together
    max_new_tokens: int = 300
    temperature: float = 0.6
    top_k: Optional[int] = 300
    top_p: Optional[float] = None
    enable_kv_cache: bool = True
    compile: bool = False
    output_file: Optional[str] = None
    metrics_file: Optional[str] = None
    # Accepted so that torchtune's own generation configs run unchanged:
    output_dir: Optional[str] = None  # never written to
    quantizer: Optional[Any] = None
    log_level: Optional[str] = None


class GenerateRecipe:
    def __init__(self, cfg: DictConfig):
        self.device = resolve_device(cfg.device)
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        self.started = time.perf_counter()
        self.metrics: dict[str, Any] = {}

    def setup(self, cfg: DictConfig) -> None:
        """Everything that can fail on the user's input fails here, before decoding starts."""
        self.outputs = _reject_bad_options(cfg)
        self.tokenizer = tokenizer_from_config(cfg)
        self.prompts = prompts_from_config(cfg, self.tokenizer)  # bad prompts fail before the load
        start = time.perf_counter()
        self.model = model_from_config(cfg, self.device)
        self.metrics["load_seconds"] = time.perf_counter() - start
        self._check_lengths(self.prompts, cfg.max_new_tokens)
        self.decode_forward = torch.compile(self.model) if cfg.compile else None
        self.sampler = functools.partial(sample, temperature=cfg.temperature, top_k=cfg.top_k,
                                         top_p=cfg.top_p)

    def generate(self, cfg: DictConfig) -> list[dict]:
        # 1. the prompts, tokenized and checked in setup
        prompts = self.prompts
        # 2-4. prefill, decode and print, one batch at a time
        stream = len(prompts) == 1
        records, decode_seconds, decode_steps, generated = [], 0.0, 0, 0
        for i in range(0, len(prompts), cfg.batch_size):
            batch = prompts[i:i + cfg.batch_size]
            result = self._generate_batch(cfg, batch, stream)
            records += result["records"]
            decode_seconds += result["decode_seconds"]
            decode_steps += result["decode_steps"]
            generated += sum(len(r["tokens"]) for r in result["records"])
        # 5. outputs and metrics
        self._record_metrics(generated, decode_steps, decode_seconds, len(prompts))
        _write_outputs(*self.outputs, records, self.metrics)
        print(summary(self.metrics), file=sys.stderr)
        return records

    def _generate_batch(self, cfg: DictConfig, batch: list[Prompt], stream: bool) -> dict:
        decoders = [IncrementalDecoder(self.tokenizer, p.tokens) for p in batch]
        outputs: list[list[int]] = [[] for _ in batch]
        if stream and batch[0].raw:
            print(batch[0].source, end="", flush=True)
        steps = generate_steps(
            self.model, [p.tokens for p in batch], max_new_tokens=cfg.max_new_tokens,
            sampler=self.sampler,
            stop_tokens=list(self.tokenizer.stop_tokens), use_cache=cfg.enable_kv_cache,
            decode_forward=self.decode_forward,
        )
        step_count, decode_start = 0, None
        for step in steps:
            if decode_start is None:  # the first token closes the prefill
                decode_start = time.perf_counter()
                self.metrics.setdefault("first_token_seconds", decode_start - self.started)
            step_count += 1
            for out, token, active in zip(outputs, step.tokens.tolist(), step.active.tolist()):
                if active:
                    out.append(token)
            if stream:
                print(decoders[0].new_text(_text_ids(outputs[0], self.tokenizer)), end="", flush=True)
        elapsed = time.perf_counter() - decode_start if decode_start else 0.0
        records = [_record(p, out, d.text(_text_ids(out, self.tokenizer)))
                   for p, out, d in zip(batch, outputs, decoders)]
        if stream:
            print(flush=True)
        else:
            for r, p in zip(records, batch):
                print((p.source if p.raw else "") + r["text"], end="\n\n", flush=True)
        return {"records": records, "decode_seconds": elapsed, "decode_steps": max(step_count - 1, 0)}

    def _check_lengths(self, prompts: list[Prompt], max_new_tokens: int) -> None:
        limit = self.model.max_seq_len
        for number, prompt in enumerate(prompts, 1):
            if len(prompt.tokens) + max_new_tokens > limit:
                raise ConfigError(
                    f"prompt {number} is {len(prompt.tokens)} tokens; with max_new_tokens="
                    f"{max_new_tokens} it needs {len(prompt.tokens) + max_new_tokens} positions, "
                    f"more than the model's max_seq_len of {limit}. Shorten the prompt or lower "
                    "max_new_tokens."
                )

    def _record_metrics(self, generated: int, decode_steps: int, decode_seconds: float,
                        sequences: int) -> None:
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
        )


def _reject_bad_options(cfg: DictConfig) -> tuple[Optional[Path], Optional[Path]]:
    """Rejects bad option combinations early; returns the checked output and metrics paths."""
    try:
        check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise ConfigError("max_new_tokens and batch_size must be at least 1.")
    if cfg.quantizer is not None:
        raise ConfigError("quantizer: leangen does not quantize yet; remove the key or set it to null.")
    if cfg.model is None or cfg.tokenizer is None:
        raise ConfigError("the config needs a 'model' and a 'tokenizer' block.")
    return output_path("output_file", cfg.output_file), output_path("metrics_file", cfg.metrics_file)


def _text_ids(generated: list[int], tokenizer) -> list[int]:
    """Generated ids without a final stop token, which has no text."""
    if generated and generated[-1] in tokenizer.stop_tokens:
        return generated[:-1]
    return generated


def _record(prompt: Prompt, tokens: list[int], text: str) -> dict:
    return {"prompt": prompt.source, "prompt_tokens": prompt.tokens, "tokens": tokens, "text": text}


def _write_outputs(output_file: Optional[Path], metrics_file: Optional[Path], records: list[dict],
                   metrics: dict) -> None:
    if output_file:
        output_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    if metrics_file:
        metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")


@run_recipe
def main(argv: list[str]) -> None:
    cfg = parse_args(argv, GenerateConfig)
    recipe = GenerateRecipe(cfg)
    recipe.setup(cfg)
    recipe.generate(cfg)


if __name__ == "__main__":
    sys.exit(main())
