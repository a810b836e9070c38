"""leangen: load torchtune decoders from mmap'd checkpoints with no loading tax."""

import logging

# torchao (imported by torchtune) warns at import that its C++ kernels don't match this
# torch build; they serve quantization only, which leangen does not use. Keep recipes' stderr
# for leangen's own summary.
logging.getLogger("torchao").setLevel(logging.ERROR)

from leangen.checkpoint.view import Checkpoint, load_tensors, open_checkpoint
from leangen.decode.generation import Generated, generate_text
from leangen.errors import CheckpointError, ConfigError, ConversionError, LeangenError
from leangen.load.pipeline import load_model

__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "ConversionError", "Generated", "LeangenError",
    "generate_text", "load_model", "load_tensors", "open_checkpoint",
]
