"""The eval recipe: ``tune run leangen/eval --config X [key=value ...]``.

Also ``python -m leangen.eval --config X`` and the ``leangen-eval`` script. X is a
YAML path or a packaged config name (``eval_demo``, ``eval_mistral7b``, ...).

Two kinds of evaluation, either or both in one run:

- ``perplexity``: sliding-window perplexity of local text files (leangen.evaluation.perplexity);
- ``lm_eval``: lm-evaluation-harness tasks, built-in or local through ``include_path``,
  scored by ``leangen.evaluation.lm_eval_adapter.LeangenLM`` (needs lm-eval: see ``leangen.evaluation.lm_eval_tasks.INSTALL_HINT``).

Data-parallel under torchrun (``torchrun --nproc_per_node N -m leangen.eval --config X``,
or ``tune run --nproc_per_node N leangen/eval --config X``): each rank loads the whole
model on its own device, the perplexity windows and the lm-eval requests are split across
the ranks in batches, and every result is gathered, so the numbers are those of one
process. Only rank 0 prints and writes ``output_file``.

Results go to stdout and to ``output_file`` as JSON (written to a temp file and renamed,
so an interrupted run never leaves half a file; its absolute path is printed on stderr as
``results: PATH``)::

    {"perplexity": {"<file>": {"ppl", "nll", "tokens"}, ..., "all": {...}} | null,
     "lm_eval": {"results": {...}, "versions": ..., "n-shot": ..., ...} | null,
     "metrics": {"threads", "load_seconds", "tokens_per_second", "peak_host_rss_bytes",
                 "quantization": {"kind", "group_size", "groups", "description", ...} | null,
                 "quantize_cache": "hit" | "written" | "off", "quantize_cache_file"}}

With several ranks, ``metrics`` also holds ``world_size`` and ``per_rank`` (each rank's
own three figures); ``load_seconds`` and ``peak_host_rss_bytes`` are then the largest of
the ranks', and ``tokens_per_second`` is all ranks' tokens over the longest rank's time.
"""

# No `from __future__ import annotations`: `tune run` executes this module as
# __main__ while sys.modules["__main__"] stays tune's own script, so OmegaConf
# would look the dataclasses' string annotations up in the wrong module.
import sys

if __name__ == "__main__":  # python -m / tune run: import and run this module through the entry
    from leangen.recipe.console import launch  # point, so that Ctrl-C during its imports is one line

    sys.exit(launch("leangen.eval"))

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, List, Optional, Union

from omegaconf import DictConfig, OmegaConf

from leangen.decode.generation import context_limit
from leangen.decode.text import resolve_add_bos, tokenize
from leangen.errors import ConfigError
from leangen.evaluation.lm_eval_tasks import load_tasks
from leangen.evaluation.perplexity import Score, Throughput, perplexity
from leangen.parallel.ranks import all_gather_object
from leangen.recipe.cli import config_key, output_path, parse_args, run_recipe
from leangen.recipe.components import (
    ModelKeys,
    model_from_config,
    quant_spec,
    tokenizer_from_config,
)
from leangen.recipe.metrics import load_metrics, peak_host_rss_bytes, summary
from leangen.recipe.outputs import write_result
from leangen.recipe.setup import Placement


@dataclass
class PerplexityConfig:
    # Any, not List[str]: OmegaConf refuses `perplexity.files=/x.txt` for a list field,
    # and one path is a fine answer. _text_files turns it into a list of paths.
    files: Any = config_key([], "text files (one path, or a list); not folders", cli_type=Union[str, List[str]])
    stride: Optional[int] = config_key(None, "tokens between windows (null: max_seq_len, disjoint)")


@dataclass
class LmEvalConfig:
    tasks: List[str] = config_key([], "task, group or tag names; globs work")
    include_path: Optional[str] = config_key(None, "a folder of your own task YAMLs")
    num_fewshot: Optional[int] = config_key(None, "null: each task's own default")
    limit: Optional[float] = config_key(None, "documents per task: a count, or a fraction below 1")
    apply_chat_template: bool = config_key(False, "format prompts with the tokenizer's chat template")


@dataclass
class EvalConfig(ModelKeys):
    """The recipe's keys; docs/configuration.md#eval-keys documents each, --help lists them."""

    RECIPE: ClassVar[str] = "eval"  # --help and --list-configs show this recipe's configs

    add_bos: str = config_key("auto", "BOS before each text and lm-eval request: auto (as "
                                      "transformers' tokenizer(text) for the folder) | true | false")
    max_seq_len: int = config_key(2048, "tokens per window or request, at most the model's own")
    batch_size: int = config_key(8, "windows or requests scored together")
    perplexity: Optional[PerplexityConfig] = config_key(None, "{files, stride} or null")
    lm_eval: Optional[LmEvalConfig] = config_key(None, "{tasks, include_path, num_fewshot, limit, "
                                                       "apply_chat_template} or null")
    output_file: Optional[str] = config_key("results.json", "JSON with every result (null: print only)")


class EvalRecipe:
    def __init__(self, cfg: DictConfig):
        placement = Placement.from_config(cfg)
        self.ranks, self.device = placement.ranks, placement.device
        if not self.ranks.is_main:
            _quiet_progress()
        self.throughput = Throughput()
        self.metrics: dict[str, Any] = {"threads": placement.threads}

    def setup(self, cfg: DictConfig) -> None:
        """Everything that can fail on the user's input fails here, before any scoring starts."""
        _reject_bad_options(cfg, writes=self.ranks.is_main)
        texts = {path: _read_text(path) for path in cfg.perplexity.files} if cfg.perplexity else {}
        self.tokenizer = tokenizer_from_config(cfg)
        resolve_add_bos(cfg.add_bos, self.tokenizer)  # a bad value fails before the load
        self.sequences = {path: _tokenize(path, text, self.tokenizer, cfg.add_bos)
                          for path, text in texts.items()}
        # the tasks' datasets load now, so a missing one fails before the model loads
        block = cfg.lm_eval
        self.task_dict = (load_tasks(list(block.tasks), include_path=block.include_path,
                                     num_fewshot=block.num_fewshot) if block else None)
        self.model = model_from_config(cfg, self.device, positions=cfg.max_seq_len)  # windows, requests
        self.metrics.update(load_metrics(self.model))
        limit, why = context_limit(self.model)
        if cfg.max_seq_len > limit:
            raise ConfigError(f"max_seq_len={cfg.max_seq_len} is more than {why}; set "
                              f"max_seq_len={limit} or less.")

    def evaluate(self, cfg: DictConfig) -> dict:
        # 1. perplexity on local text
        ppl = self._perplexity(cfg) if self.sequences else None
        # 2. lm-evaluation-harness tasks
        harness = self._lm_eval(cfg) if self.task_dict else None
        # 3. report: stdout, the JSON file, the metrics line on stderr
        self._record_metrics()
        results = {"perplexity": ppl, "lm_eval": harness, "metrics": self.metrics}
        if not self.ranks.is_main:  # every rank holds the results; rank 0 reports them
            return results
        _print_results(results)
        if cfg.output_file:
            path = output_path("output_file", cfg.output_file).resolve()
            write_result(path, json.dumps(results, indent=2, default=str) + "\n")
            print(f"results: {path}", file=sys.stderr)
        print(summary(self.metrics), file=sys.stderr)
        return results

    def _perplexity(self, cfg: DictConfig) -> dict:
        scores = perplexity(self.model, list(self.sequences.values()), max_seq_len=cfg.max_seq_len,
                            stride=cfg.perplexity.stride, batch_size=cfg.batch_size,
                            throughput=self.throughput, ranks=self.ranks)
        total = Score()
        for score in scores:
            total.add(score)
        report = {path: score.as_dict() for path, score in zip(self.sequences, scores)}
        report["all"] = total.as_dict()
        return report

    def _lm_eval(self, cfg: DictConfig) -> dict:
        # `evaluate`, not `simple_evaluate`: the tasks were loaded in setup, before the model,
        # and simple_evaluate's results metadata runs `git describe`, which prints
        # "fatal: not a git repository" outside a git folder. The arguments are the ones
        # simple_evaluate passes (fewshot_as_multiturn is True there, False in evaluate).
        from lm_eval.evaluator import evaluate

        from leangen.evaluation.lm_eval_adapter import LeangenLM

        block = cfg.lm_eval
        lm = LeangenLM(self.model, self.tokenizer, max_length=cfg.max_seq_len,
                       batch_size=cfg.batch_size, throughput=self.throughput, add_bos=cfg.add_bos,
                       ranks=self.ranks)
        out = evaluate(lm=lm, task_dict=self.task_dict, limit=block.limit,
                       apply_chat_template=block.apply_chat_template, fewshot_as_multiturn=True,
                       log_samples=False)
        keys = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")
        return {key: out[key] for key in keys if key in out}

    def _record_metrics(self) -> None:
        """Tokens the model read (padding excluded) per second of model time, all parts
        together; and the process's peak RSS, as generate records it. Several ranks: the
        job's figures (module docstring), and each rank's own under ``per_rank``."""
        self.metrics["tokens_per_second"] = self.throughput.tokens_per_second
        self.metrics["peak_host_rss_bytes"] = peak_host_rss_bytes()
        if not self.ranks.distributed:
            return
        own = {key: self.metrics[key] for key in ("load_seconds", "tokens_per_second", "peak_host_rss_bytes")}
        parts = all_gather_object((own, self.throughput.tokens, self.throughput.seconds), "gathering the metrics")
        seconds = max(s for _, _, s in parts)
        self.metrics.update(
            world_size=self.ranks.world_size,
            load_seconds=max(p["load_seconds"] for p, _, _ in parts),
            tokens_per_second=sum(t for _, t, _ in parts) / seconds if seconds > 0 else None,
            peak_host_rss_bytes=max(p["peak_host_rss_bytes"] for p, _, _ in parts),
            per_rank=[p for p, _, _ in parts],
        )


def _quiet_progress() -> None:
    """Progress bars and lm-eval's notes from rank 0 only; the other ranks still print
    their errors (prefixed with their rank) and Python's warnings."""
    import logging
    import os

    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads its defaults from TQDM_* variables
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _reject_bad_options(cfg: DictConfig, writes: bool = True) -> None:
    if cfg.perplexity:  # one path or a list of them; a list from here on
        cfg.perplexity.files = _text_files(cfg.perplexity.files)
    if cfg.model is None or cfg.tokenizer is None:
        raise ConfigError("the config needs a 'model' and a 'tokenizer' block.")
    for key, least in (("max_seq_len", 2), ("batch_size", 1)):
        if cfg[key] < least:
            raise ConfigError(f"{key}={cfg[key]}: give at least {least}.")
    if not (cfg.perplexity and cfg.perplexity.files) and not (cfg.lm_eval and cfg.lm_eval.tasks):
        raise ConfigError("nothing to evaluate: set perplexity.files and/or lm_eval.tasks.")
    stride = cfg.perplexity.stride if cfg.perplexity else None
    if stride is not None and not 1 <= stride <= cfg.max_seq_len:
        raise ConfigError(f"perplexity.stride={stride} must be between 1 and max_seq_len="
                          f"{cfg.max_seq_len} (null: max_seq_len).")
    if writes:  # only rank 0 writes: another node need not have the folder
        output_path("output_file", cfg.output_file)  # fails now, not after the scoring
    quant_spec(cfg)  # so does a bad quantize value


def _text_files(value: Any) -> list[str]:
    """perplexity.files as a list of paths: one path or a list of them."""
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else value
    if not OmegaConf.is_list(paths) and not isinstance(paths, list):
        raise ConfigError(f"perplexity.files: give a text file or a list of them, not {value!r}.")
    for path in paths:
        if not isinstance(path, str):
            raise ConfigError(f"perplexity.files: {path!r} is not a file path; give paths of text files.")
    return list(paths)


def _read_text(path: str) -> str:
    file = Path(path).expanduser()
    if file.is_dir():
        raise ConfigError(f"perplexity.files: '{path}' is a folder; give the text files in it, "
                          f"e.g. perplexity.files=[{path.rstrip('/')}/a.txt,{path.rstrip('/')}/b.txt].")
    if not file.is_file():
        raise ConfigError(f"perplexity.files: '{path}' does not exist.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"perplexity.files: '{path}' is not UTF-8 text ({e.reason}).") from e
    except OSError as e:  # e.g. no read permission
        raise ConfigError(f"perplexity.files: cannot read '{path}': {e.strerror}.") from e
    if not text:
        raise ConfigError(f"perplexity.files: '{path}' is empty.")
    return text


def _tokenize(path: str, text: str, tokenizer, add_bos: str) -> list[int]:
    """The text as one sequence, BOS as ``add_bos`` says, no EOS: what
    docs/evaluation.md#perplexity promises."""
    tokens = tokenize(text, tokenizer, add_bos=add_bos).tokens
    if len(tokens) < 2:
        raise ConfigError(
            f"perplexity.files: '{path}' is {len(tokens)} token(s); perplexity needs at "
            "least two (a context and a token to score)."
        )
    return tokens


def _print_results(results: dict) -> None:
    if results["perplexity"]:
        width = max(map(len, results["perplexity"]))
        for name, r in results["perplexity"].items():
            print(f"{name:<{width}}  ppl {r['ppl']:10.4f}  nll {r['nll']:.4f}  tokens {r['tokens']}")
    if results["lm_eval"]:
        from lm_eval.utils import make_table

        print(make_table(results["lm_eval"]))


@run_recipe
def main(argv: list[str]) -> None:
    cfg = parse_args(argv, EvalConfig)
    recipe = EvalRecipe(cfg)
    recipe.setup(cfg)
    recipe.evaluate(cfg)

