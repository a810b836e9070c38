"""The eval recipe: ``tune run leangen/eval --config X [key=value ...]``.

Also ``python -m leangen.eval --config X`` and the ``leangen-eval`` script. X is a
YAML path or a packaged config name (``eval_demo``, ``eval_mistral7b``, ...).

Two kinds of evaluation, either or both in one run:

- ``perplexity``: sliding-window perplexity of local text files (leangen.perplexity);
- ``lm_eval``: lm-evaluation-harness tasks, built-in or local through ``include_path``,
  scored by ``leangen.lm_eval_adapter.LeangenLM`` (needs ``pip install 'leangen[eval]'``).

Results go to stdout and to ``output_file`` as JSON::

    {"perplexity": {"<file>": {"ppl", "nll", "tokens"}, ..., "all": {...}} | null,
     "lm_eval": {"results": {...}, "versions": ..., "n-shot": ..., ...} | null,
     "metrics": {"load_seconds", "tokens_per_second"}}
"""

# No `from __future__ import annotations`: `tune run` executes this module as
# __main__ while sys.modules["__main__"] stays tune's own script, so OmegaConf
# would look the dataclasses' string annotations up in the wrong module.
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig

from leangen.components import ModelKeys, model_from_config, tokenizer_from_config
from leangen.config import output_path, parse_args, run_recipe
from leangen.errors import ConfigError
from leangen.load import resolve_device
from leangen.metrics import summary
from leangen.perplexity import Score, Throughput, perplexity

INSTALL_HINT = "pip install 'leangen[eval]'"


@dataclass
class PerplexityConfig:
    files: List[str] = field(default_factory=list)
    stride: Optional[int] = None  # null: max_seq_len (non-overlapping windows)


@dataclass
class LmEvalConfig:
    tasks: List[str] = field(default_factory=list)  # names or globs
    include_path: Optional[str] = None  # a folder of local task YAMLs
    num_fewshot: Optional[int] = None  # null: each task's own default
    limit: Optional[float] = None  # documents per task: a count, or a fraction below 1
    apply_chat_template: bool = False


@dataclass
class EvalConfig(ModelKeys):
    """The recipe's keys; README "Evaluate" documents each."""

    max_seq_len: int = 2048  # tokens per window / request, at most the model's own
    batch_size: int = 8
    perplexity: Optional[PerplexityConfig] = None
    lm_eval: Optional[LmEvalConfig] = None
    output_file: Optional[str] = "results.json"


class EvalRecipe:
    def __init__(self, cfg: DictConfig):
        self.device = resolve_device(cfg.device)
        self.throughput = Throughput()
        self.metrics: dict[str, Any] = {}

    def setup(self, cfg: DictConfig) -> None:
        """Everything that can fail on the user's input fails here, before any scoring starts."""
        _reject_bad_options(cfg)
        texts = {path: _read_text(path) for path in cfg.perplexity.files} if cfg.perplexity else {}
        self.tokenizer = tokenizer_from_config(cfg)
        self.sequences = {path: _tokenize(path, text, self.tokenizer) for path, text in texts.items()}
        self.tasks, self.task_manager = _resolve_tasks(cfg.lm_eval) if cfg.lm_eval else ([], None)
        start = time.perf_counter()
        self.model = model_from_config(cfg, self.device)
        self.metrics["load_seconds"] = time.perf_counter() - start
        if cfg.max_seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"max_seq_len={cfg.max_seq_len} is more than the model's max_seq_len of "
                f"{self.model.max_seq_len}; set max_seq_len={self.model.max_seq_len} or less."
            )

    def evaluate(self, cfg: DictConfig) -> dict:
        # 1. perplexity on local text
        ppl = self._perplexity(cfg) if self.sequences else None
        # 2. lm-evaluation-harness tasks
        harness = self._lm_eval(cfg) if self.tasks else None
        # 3. report: stdout, the JSON file, the metrics line on stderr
        self._record_metrics()
        results = {"perplexity": ppl, "lm_eval": harness, "metrics": self.metrics}
        _print_results(results)
        if cfg.output_file:
            output_path("output_file", cfg.output_file).write_text(
                json.dumps(results, indent=2, default=str) + "\n")
        print(summary(self.metrics), file=sys.stderr)
        return results

    def _perplexity(self, cfg: DictConfig) -> dict:
        scores = perplexity(self.model, list(self.sequences.values()), max_seq_len=cfg.max_seq_len,
                            stride=cfg.perplexity.stride, batch_size=cfg.batch_size,
                            throughput=self.throughput)
        total = Score()
        for score in scores:
            total.add(score)
        report = {path: score.as_dict() for path, score in zip(self.sequences, scores)}
        report["all"] = total.as_dict()
        return report

    def _lm_eval(self, cfg: DictConfig) -> dict:
        from lm_eval import simple_evaluate

        from leangen.lm_eval_adapter import LeangenLM

        block = cfg.lm_eval
        lm = LeangenLM(self.model, self.tokenizer, max_length=cfg.max_seq_len,
                       batch_size=cfg.batch_size, throughput=self.throughput)
        out = simple_evaluate(model=lm, tasks=self.tasks, task_manager=self.task_manager,
                              num_fewshot=block.num_fewshot, limit=block.limit,
                              apply_chat_template=block.apply_chat_template, log_samples=False)
        keys = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")
        return {key: out[key] for key in keys if key in out}

    def _record_metrics(self) -> None:
        """Tokens the model read (padding excluded) per second of model time, all parts together."""
        self.metrics["tokens_per_second"] = self.throughput.tokens_per_second


def _reject_bad_options(cfg: DictConfig) -> None:
    if cfg.model is None or cfg.tokenizer is None:
        raise ConfigError("the config needs a 'model' and a 'tokenizer' block.")
    if cfg.max_seq_len < 2 or cfg.batch_size < 1:
        raise ConfigError("max_seq_len must be at least 2 and batch_size at least 1.")
    if not (cfg.perplexity and cfg.perplexity.files) and not (cfg.lm_eval and cfg.lm_eval.tasks):
        raise ConfigError("nothing to evaluate: set perplexity.files and/or lm_eval.tasks.")
    stride = cfg.perplexity.stride if cfg.perplexity else None
    if stride is not None and not 1 <= stride <= cfg.max_seq_len:
        raise ConfigError(f"perplexity.stride={stride} must be between 1 and max_seq_len="
                          f"{cfg.max_seq_len} (null: max_seq_len).")
    output_path("output_file", cfg.output_file)  # fails now, not after the scoring


def _read_text(path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"perplexity.files: '{path}' does not exist.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"perplexity.files: '{path}' is not UTF-8 text ({e.reason}).") from e
    if not text:
        raise ConfigError(f"perplexity.files: '{path}' is empty.")
    return text


def _tokenize(path: str, text: str, tokenizer) -> list[int]:
    tokens = tokenizer.encode(text, add_bos=True, add_eos=False)
    if len(tokens) < 2:
        raise ConfigError(
            f"perplexity.files: '{path}' is {len(tokens)} token(s) with BOS; perplexity needs at "
            "least two (a context and a token to score)."
        )
    return tokens


def _resolve_tasks(block: DictConfig) -> tuple[list[str], Any]:
    """The task names (globs expanded) and the lm-eval TaskManager that knows them.

    Indexing lm-eval's ~15k built-in task YAMLs takes seconds, so when every name
    is a task in ``include_path`` only that folder is indexed; local tasks take
    precedence over built-in ones anyway.
    """
    TaskManager = _import_lm_eval()
    if not block.tasks:
        raise ConfigError("lm_eval.tasks is empty: name at least one task.")
    include = None
    if block.include_path:
        include = str(Path(block.include_path).expanduser())
        if not Path(include).is_dir():
            raise ConfigError(f"lm_eval.include_path: '{block.include_path}' is not a folder.")
        local = TaskManager(include_path=include, include_defaults=False)
        names = local.match_tasks(list(block.tasks))
        # a local group or tag may name built-in tasks: those need the full index
        if all(local.match_tasks([name]) for name in block.tasks) and set(names) <= set(local.all_subtasks):
            return names, local
    manager = TaskManager(include_path=include)
    for name in block.tasks:
        if not manager.match_tasks([name]):
            where = f"in include_path '{include}' nor " if include else ""
            raise ConfigError(f"lm_eval.tasks: unknown task '{name}': not {where}among lm-eval's "
                              f"{len(manager.all_tasks)} built-in tasks, groups and tags.")
    return manager.match_tasks(list(block.tasks)), manager


def _import_lm_eval():
    """lm-eval is an optional extra; import it only when a config asks for it."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(
            f"lm_eval: this config runs lm-evaluation-harness tasks, which need lm-eval ({e}). "
            f"Install it with: {INSTALL_HINT}"
        ) from e
    return TaskManager


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


if __name__ == "__main__":
    sys.exit(main())
