"""Model, checkpoint and tokenizer from a recipe config (shared by generate and eval).

A torchtune ``checkpointer:`` block is read, never instantiated: leangen takes its
directory, files and model_type and loads through the lean path, so nothing is
ever written to the checkpointer's ``output_dir``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from leangen.errors import ConfigError
from leangen.load.pipeline import load_model
from leangen.quant.quantize import DEFAULT_GROUP
from leangen.recipe.cli import config_key
from leangen.recipe.overrides import unknown_key

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

    model: Any = config_key(None, "auto (from the folder's config.json) | {_component_: a torchtune "
                                  "builder, its kwargs...}")
    tokenizer: Any = config_key(None, "auto (from the folder's tokenizer files) | {_component_: a "
                                      "torchtune tokenizer builder, path: ...}")
    checkpoint: Optional[Any] = config_key(None, "{path: dir, file or list of files, model_type: auto, "
                                                 "strict_config: true}")
    checkpointer: Optional[Any] = config_key(None, "a torchtune checkpointer block: read, never instantiated")
    device: str = config_key("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    dtype: str = config_key("auto", "auto (the stored dtype: zero copy on CPU) | bf16 | fp16 | fp32")
    threads: Optional[int] = config_key(None, "CPU threads (null: torch's choice, which follows OMP_NUM_THREADS)")
    quantize: Optional[str] = config_key(None, "null | int8 | int4: weight-only (torchao), "
                                               "quantized layer by layer while loading")
    # why 32: the measurements beside leangen.quant.quantize.DEFAULT_GROUP
    quantize_group_size: int = config_key(DEFAULT_GROUP, "int4: inputs sharing a scale and zero point "
                                          "(32 | 64 | 128; 256 on CUDA only). 32 (default, as llama.cpp's "
                                          "Q4_0): 5 bits per weight, CPU decode within ~1.1x of 128's, and "
                                          "on a 135M model +5% perplexity where 64 cost +53%. A layer it "
                                          "does not divide falls back to 64, 32 (a note on stderr says so)")
    prepack: bool = config_key(False, "CPU: copy full-precision Linear weights into oneDNN's layout: "
                                      "faster decode, but the weights then take RAM instead of the mmap")
    quantize_cache: Optional[str] = config_key("auto", "with quantize: auto ($XDG_CACHE_HOME/leangen, else "
                                                      "~/.cache/leangen) | a folder | null: quantize on "
                                                      "every load")


def checkpoint_source(cfg: DictConfig) -> tuple[Any, str]:
    """(path or list of files, model_type) from ``checkpoint:`` or ``checkpointer:``."""
    if cfg.get("checkpoint") is not None and cfg.get("checkpointer") is not None:
        raise ConfigError("set either 'checkpoint' or 'checkpointer', not both.")
    if cfg.get("checkpoint") is not None:
        block = cfg.checkpoint
        if not OmegaConf.is_dict(block):
            raise ConfigError(f"checkpoint: '{block}' is not a block; set checkpoint.path=/path/to/model "
                              "(a directory, a file or a list of files).")
        _check_checkpoint_block(block)
        path = OmegaConf.to_object(block.path) if OmegaConf.is_list(block.path) else block.path
        return path, str(block.get("model_type", "auto"))
    if cfg.get("checkpointer") is not None:
        return _from_checkpointer(cfg.checkpointer)
    raise ConfigError("no checkpoint: set checkpoint.path (or a torchtune checkpointer block).")


CHECKPOINT_KEYS = {"path": "a directory, a file or a list of files",
                   "model_type": "auto, or a family name (llama, mistral, qwen2, ...)",
                   "strict_config": "true | false"}


def _check_checkpoint_block(block: DictConfig) -> None:
    """The ``checkpoint:`` block's keys: a typo such as ``strict_confg`` must not be
    ignored, and ``strict_config`` must be a boolean, not any truthy text."""
    for key in block:
        if key not in CHECKPOINT_KEYS:
            raise ConfigError(unknown_key(["checkpoint"], str(key), list(CHECKPOINT_KEYS)))
    if block.get("path") is None:
        raise ConfigError("checkpoint.path is not set: give a directory, a file or a list of files.")
    strict = block.get("strict_config", True)
    if not isinstance(strict, bool):
        raise ConfigError(f"checkpoint.strict_config={strict}: give true or false.")


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


# torchtune's `quantizer:` blocks (its generation configs carry one), as leangen's
# weight-only spec: (kind, the class's default group, what differs, if anything).
TORCHTUNE_QUANTIZERS = {
    "torchtune.training.quantization.Int4WeightOnlyQuantizer": ("int4", 128, None),
    "torchtune.training.quantization.Int8DynActInt4WeightQuantizer": (
        "int4", 256, "its int8 activations are not quantized: leangen quantizes weights only"),
}


def quant_spec(cfg: DictConfig):
    """The QuantSpec from ``quantize:`` (and ``quantize_group_size``), or from a torchtune
    ``quantizer:`` block; None for full precision."""
    from leangen.quant.quantize import QuantSpec

    block, kind = cfg.get("quantizer"), cfg.get("quantize")  # get: a config without the schema works too
    if block is None:
        return QuantSpec(kind, cfg.get("quantize_group_size", DEFAULT_GROUP)) if kind else None
    if kind:
        raise ConfigError("set either 'quantize' or a torchtune 'quantizer' block, not both.")
    name = block.get("_component_") if OmegaConf.is_dict(block) else block
    if name not in TORCHTUNE_QUANTIZERS:
        raise ConfigError(f"quantizer: '{name}' is not supported; use quantize: int8 | int4, or one of "
                          f"{', '.join(TORCHTUNE_QUANTIZERS)}.")
    kind, group, differs = TORCHTUNE_QUANTIZERS[name]
    if differs:
        warnings.warn(f"quantizer: {name.rsplit('.', 1)[-1]} runs as {kind} weight-only; {differs}.")
    return QuantSpec(kind, block.get("groupsize", group))


def model_from_config(cfg: DictConfig, device: torch.device, *,
                      positions: Optional[int] = None, parallel=None) -> torch.nn.Module:
    """``model: auto`` (the builder config.json describes) or a builder block, which is
    checked against config.json; ``checkpoint.strict_config: false`` only warns.
    ``positions``: the most positions the run will use, so that the RoPE cache holds
    those rather than the builder's whole context (131072 for Llama 3). ``parallel``: a
    ``leangen.parallel.tensor_parallel.TensorParallel``, for a tensor-parallel rank's shard."""
    path, model_type = checkpoint_source(cfg)
    strict = cfg.checkpoint.get("strict_config", True) if cfg.get("checkpoint") is not None else True
    return load_model(cfg.model, path, device=device, dtype=cfg.dtype, model_type=model_type,
                      strict_config=bool(strict), rope_positions=positions, quantize=quant_spec(cfg),
                      prepack=bool(cfg.get("prepack", False)),
                      quantize_cache=cfg.get("quantize_cache", "auto"), parallel=parallel)


def compile_decode(model: torch.nn.Module):
    """``torch.compile`` for the decode step (never with ``prepack``: see the recipe's check).

    inductor's CPU levers were measured on the 1B benchmark checkpoint, bf16, 2 threads,
    one process per variant, steady state (tok/s): eager 5.2-5.7, compiled 5.3-6.5, with
    ``freezing`` 5.4-6.3, with ``max_autotune`` and the CPP GEMM backend 5.4-5.5, eager with
    ``prepack`` 7.1-8.6. So the default options stay."""
    return torch.compile(model)


def tokenizer_from_config(cfg: DictConfig):
    """``tokenizer: auto``: the checkpoint folder's own tokenizer (leangen.hf.tokenizer);
    ``tokenizer: auto`` with ``tokenizer.path=X`` on the command line (the override
    torchtune's docs teach): the tokenizer in X; else a torchtune ``_component_`` block."""
    from torchtune import config as tt_config

    from leangen.hf.tokenizer import tokenizer_from_folder

    if cfg.tokenizer == "auto":
        return tokenizer_from_folder(_checkpoint_folder(cfg))
    if not OmegaConf.is_dict(cfg.tokenizer):
        raise ConfigError(f"tokenizer: '{cfg.tokenizer}' is neither 'auto' nor a {{_component_: ...}} block.")
    if cfg.tokenizer.get("_component_") is None:
        return _auto_tokenizer_at(cfg.tokenizer)
    path = cfg.tokenizer.get("path")
    overrides = {}
    if path is not None:
        overrides["path"] = str(Path(path).expanduser())
        if not Path(overrides["path"]).exists():
            _missing_checkpoint_first(cfg)
            raise ConfigError(f"tokenizer.path: '{path}' does not exist. Point it at the model's tokenizer file.")
    try:
        return tt_config.instantiate(cfg.tokenizer, **overrides)
    except Exception as e:  # torchtune wraps builder errors in its own InstantiationError
        raise ConfigError(f"tokenizer '{cfg.tokenizer.get('_component_')}' failed: {e}") from e


def _auto_tokenizer_at(block: DictConfig):
    """``tokenizer: auto`` read from ``tokenizer.path``: a model folder, or one of the
    tokenizer files ``tokenizer: auto`` reads (its folder gives the chat template and
    stop tokens, as for the checkpoint's own folder)."""
    from leangen.hf.tokenizer import TOKENIZER_FILES, tokenizer_from_folder

    names = sorted({name for files in TOKENIZER_FILES for name in files})
    other = sorted(set(block) - {"path", "max_seq_len"})
    if other or block.get("path") is None:
        raise ConfigError(
            f"tokenizer.{other[0] if other else 'path'}: without a _component_, the tokenizer block takes "
            f"path (a model folder or {', '.join(names)}) and max_seq_len; for a torchtune "
            "tokenizer set tokenizer._component_ too.")
    path, max_seq_len = Path(block.path).expanduser(), block.get("max_seq_len")
    if path.is_dir():
        return tokenizer_from_folder(path, max_seq_len=max_seq_len)
    if not path.is_file():
        raise ConfigError(f"tokenizer.path: '{block.path}' does not exist. Give the model's folder or its "
                          f"{' / '.join(names)}.")
    build = next((build for files, build in TOKENIZER_FILES.items() if path.name in files), None)
    if build is None:
        raise ConfigError(f"tokenizer.path: '{block.path}' is not a file tokenizer: auto reads "
                          f"({', '.join(names)}); give one of those or the folder holding it.")
    return build(path.parent, max_seq_len)


def _checkpoint_folder(cfg: DictConfig) -> Path:
    """The folder of the checkpoint: its path if a directory, else its (first) file's parent."""
    path, _ = checkpoint_source(cfg)
    first = Path(path[0] if isinstance(path, (list, tuple)) else path).expanduser()
    if not first.exists():
        raise ConfigError(f"checkpoint.path: '{first}' does not exist (tokenizer: auto reads its folder).")
    return first if first.is_dir() else first.parent


def _missing_checkpoint_first(cfg: DictConfig) -> None:
    """A packaged config's tokenizer path follows checkpoint.path; when the checkpoint is
    missing too, that is the real cause."""
    block = cfg.get("checkpoint")
    path = block.get("path") if block is not None else None
    if isinstance(path, str) and not Path(path).expanduser().exists():
        raise ConfigError(
            f"checkpoint.path: '{path}' does not exist (and the tokenizer path follows it). "
            "Set checkpoint.path=/path/to/your/download, e.g. on the command line."
        )
