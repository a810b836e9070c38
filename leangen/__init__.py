"""leangen: load torchtune decoders from mmap'd checkpoints with no loading tax."""

import logging

# torchao (imported by torchtune) warns at import that its C++ kernels don't match this
# torch build. leangen's int8/int4 paths do not need them: CPU int8 runs through
# aten._weight_int8pack_mm (leangen.quant.int8_kernel) and int4 through torch's own packed
# kernels. Keep recipes' stderr for leangen's own summary.
logging.getLogger("torchao").setLevel(logging.ERROR)

import importlib

from leangen.errors import CheckpointError, ConfigError, ConversionError, LeangenError

# The API, imported on first use: `import leangen` stays free of torch, so that the
# recipes' entry points (leangen.recipe.console) are running before torch imports and
# a Ctrl-C during those seconds is one line, not a traceback.
_LAZY = {
    "Checkpoint": "leangen.checkpoint.view", "load_tensors": "leangen.checkpoint.view",
    "open_checkpoint": "leangen.checkpoint.view", "Generated": "leangen.decode.generation",
    "generate_text": "leangen.decode.generation", "load_model": "leangen.load.pipeline",
}

__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "ConversionError", "Generated", "LeangenError",
    "generate_text", "load_model", "load_tensors", "open_checkpoint",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:  # a subpackage, as `import leangen; leangen.load` found it when everything was imported
        return importlib.import_module(f"leangen.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'leangen' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
