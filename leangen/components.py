"""Model, checkpoint and tokenizer from a recipe config (shared by generate and eval).

A torchtune ``checkpointer:`` block is read, never instantiated: leangen takes its
directory, files and model_type and loads through the lean path, so nothing is
ever written to the checkpointer's ``output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from leangen.errors import ConfigError
from leangen.load import load_model

# The checkpointer classes whose blocks leangen reads; any other is refused.
CHECKPOINTERS = {
    "torchtune.training.FullModelHFCheckpointer",
    "torchtune.training.FullModelMetaCheckpointer",
    "torchtune.training.FullModelTorchTuneCheckpointer",
    "torchtune.training.checkpointing.FullModelHFCheckpointer",
    "torchtune.training.checkpointing.FullModelMetaCheckpointer",
    "torchtune.training.checkpointing.FullModelTorchTuneCheckpointer",
}


@dataclass
class ModelKeys:
    """The config keys every recipe shares: what to load, and where to run it."""

    model: Any = None
    tokenizer: Any = None
    checkpoint: Optional[Any] = None
    checkpointer: Optional[Any] = None  # a torchtune checkpointer block, read not instantiated
    device: str = "auto"  # cuda when available, else cpu
    dtype: str = "auto"  # the stored dtype: zero copy on CPU


def checkpoint_source(cfg: DictConfig) -> tuple[Any, str]:
    """(path or list of files, model_type) from ``checkpoint:`` or ``checkpointer:``."""
    if cfg.get("checkpoint") is not None and cfg.get("checkpointer") is not None:
        raise ConfigError("set either 'checkpoint' or 'checkpointer', not both.")
    if cfg.get("checkpoint") is not None:
        block = cfg.checkpoint
        if block.get("path") is None:
            raise ConfigError("checkpoint.path is not set: give a directory, a file or a list of files.")
        path = OmegaConf.to_object(block.path) if OmegaConf.is_list(block.path) else block.path
        return path, str(block.get("model_type", "auto"))
    if cfg.get("checkpointer") is not None:
        return _from_checkpointer(cfg.checkpointer)
    raise ConfigError("no checkpoint: set checkpoint.path (or a torchtune checkpointer block).")


def _from_checkpointer(block: DictConfig) -> tuple[list[str], str]:
    from torchtune.training import FormattedCheckpointFiles

    if block.get("_component_") not in CHECKPOINTERS:
        raise ConfigError(
            f"checkpointer._component_ '{block.get('_component_')}' is not supported; use one of "
            f"{', '.join(sorted(c for c in CHECKPOINTERS if c.count('.') == 2))}."
        )
    missing = [k for k in ("checkpoint_dir", "checkpoint_files") if block.get(k) is None]
    if missing:
        raise ConfigError(f"checkpointer.{missing[0]} is not set.")
    directory = Path(block.checkpoint_dir).expanduser()
    files = block.checkpoint_files
    if OmegaConf.is_dict(files):  # {filename_format, max_filename}
        files = FormattedCheckpointFiles.from_dict(OmegaConf.to_container(files)).build_checkpoint_filenames()
    paths = [str(directory / f) for f in files]
    return paths, str(block.get("model_type", "auto"))


def model_from_config(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    path, model_type = checkpoint_source(cfg)
    return load_model(cfg.model, path, device=device, dtype=cfg.dtype, model_type=model_type)


def tokenizer_from_config(cfg: DictConfig):
    from torchtune import config as tt_config

    path = cfg.tokenizer.get("path")
    overrides = {}
    if path is not None:
        overrides["path"] = str(Path(path).expanduser())
        if not Path(overrides["path"]).exists():
            raise ConfigError(f"tokenizer.path: '{path}' does not exist. Point it at the model's tokenizer file.")
    try:
        return tt_config.instantiate(cfg.tokenizer, **overrides)
    except Exception as e:  # torchtune wraps builder errors in its own InstantiationError
        raise ConfigError(f"tokenizer '{cfg.tokenizer.get('_component_')}' failed: {e}") from e
