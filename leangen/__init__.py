"""leangen: load torchtune decoders from mmap'd checkpoints with no loading tax."""

from leangen.errors import CheckpointError, ConfigError, ConversionError, LeangenError
from leangen.load import load_model
from leangen.view import Checkpoint, load_tensors, open_checkpoint

__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "ConversionError", "LeangenError",
    "load_model", "load_tensors", "open_checkpoint",
]
