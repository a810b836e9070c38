"""lm-evaluation-harness tasks for the eval recipe: found, loaded (datasets included)
and set up before the model loads, as ``simple_evaluate`` would set them up.

The recipe then calls lm-eval's ``evaluate`` itself: loading first means a missing
dataset fails before a long model load, and ``simple_evaluate``'s results metadata
runs ``git describe``, which prints "fatal: not a git repository" outside a git folder.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Optional

from leangen.errors import ConfigError

# The `eval` extra of pyproject.toml, spelled as a plain requirement: leangen is not on
# PyPI, so `pip install 'leangen[eval]'` finds no leangen. A test keeps the two in step.
LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"
INSTALL_HINT = (f"pip install {LM_EVAL_REQUIREMENT} (or, in a clone of leangen, "
                "pip install -e '.[eval]', which does the same)")


def load_tasks(tasks: list[str], *, include_path: str | None = None,
               num_fewshot: int | None = None) -> dict:
    """lm-eval's task dict ({"tasks", "groups", ...}) for the task names (globs allowed),
    every task's dataset loaded, set up as simple_evaluate sets it up: seeded before the
    load, few-shot overrides after. ``include_path``: a folder of the user's task YAMLs."""
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"lm_eval.num_fewshot={num_fewshot}: give 0 or more, or null for each task's own.")
    names, manager = _resolve_tasks(list(tasks), include_path)
    _seed_like_simple_evaluate()
    task_dict = _load_datasets(names, manager)
    _set_fewshot(task_dict["tasks"], num_fewshot)
    return task_dict


def _resolve_tasks(tasks: list[str], include_path: str | None) -> tuple[list[str], Any]:
    """The task names (globs expanded) and the lm-eval TaskManager that knows them.

    Indexing lm-eval's ~15k built-in task YAMLs takes seconds, so when every name
    is a task in ``include_path`` only that folder is indexed; local tasks take
    precedence over built-in ones anyway.
    """
    TaskManager = _import_lm_eval()
    if not tasks:
        raise ConfigError("lm_eval.tasks is empty: name at least one task.")
    include = None
    if include_path:
        include = str(Path(include_path).expanduser())
        if not Path(include).is_dir():
            raise ConfigError(f"lm_eval.include_path: '{include_path}' is not a folder.")
        local = TaskManager(include_path=include, include_defaults=False)
        names = local.match_tasks(tasks)
        # a local group or tag may name built-in tasks: those need the full index
        if all(local.match_tasks([name]) for name in tasks) and set(names) <= set(local.all_subtasks):
            return names, local
    manager = TaskManager(include_path=include)
    for name in tasks:
        if not manager.match_tasks([name]):
            where = f"in include_path '{include}' nor " if include else ""
            raise ConfigError(f"lm_eval.tasks: unknown task '{name}': not {where}among lm-eval's "
                              f"{len(manager.all_tasks)} built-in tasks, groups and tags.")
    return manager.match_tasks(tasks), manager


def _seed_like_simple_evaluate() -> None:
    """simple_evaluate's default seeds (python 0, numpy and torch 1234), so that results
    match lm-eval's own runs even for tasks that draw from the global generators."""
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)


def _load_datasets(names: list[str], manager: Any) -> dict:
    """``manager.load``, which builds every task and loads its dataset (``datasets.load_dataset``)."""
    from datasets.exceptions import DatasetsError

    try:
        return manager.load(names)
    # datasets' and huggingface_hub's errors (offline, not found, gated) are all
    # OSErrors; DatasetsError covers the rest, e.g. a data file that fails to parse
    except (OSError, DatasetsError) as e:
        raise _dataset_error(e, names) from e


def _dataset_error(e: Exception, names: list[str]) -> ConfigError:
    task, dataset = _failing_task(e)
    who = f"task '{task}'" if task else f"one of the tasks {names}"
    data = f"dataset '{dataset}'" if dataset else "dataset"
    if isinstance(e, ConnectionError):  # datasets' "Couldn't reach '...' on the Hub"
        import datasets

        why = ("offline mode is on (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE)"
               if datasets.config.HF_HUB_OFFLINE else "the Hugging Face Hub could not be reached")
        return ConfigError(
            f"lm_eval.tasks: {who} needs its {data}, which is not in the `datasets` cache, and "
            f"{why}. Run once online so that `datasets` caches it, then set HF_DATASETS_OFFLINE=1 "
            "to stay offline; or evaluate a local task through lm_eval.include_path."
        )
    # run_recipe prints the message on one line
    return ConfigError(f"lm_eval.tasks: {who} could not load its {data}: {type(e).__name__}: {e}")


def _failing_task(e: Exception) -> tuple[Optional[str], Optional[str]]:
    """(task name, dataset path) of the task whose loading raised ``e``, or Nones.

    lm-eval lets datasets' error through without saying whose dataset it was: the
    task is the innermost lm-eval ``Task`` on the traceback (its ``download``).
    """
    from lm_eval.api.task import Task

    task = None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, Task):
            task = owner
    if task is None:
        return None, None
    return getattr(task.config, "task", None), getattr(task, "DATASET_PATH", None)


def _set_fewshot(tasks: dict, num_fewshot: Optional[int]) -> None:
    """simple_evaluate's per-task few-shot overrides, which `evaluate` leaves to its caller."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    for task in tasks.values():
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default != 0:  # a task's own 0 is never overridden
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif num_fewshot is None and default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)


def _import_lm_eval():
    """lm-eval is an optional extra; import it only when a config asks for it."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(
            f"lm_eval: this config runs lm-evaluation-harness tasks, which need lm-eval ({e}). "
            f"Install it with: {INSTALL_HINT}."
        ) from e
    return TaskManager
