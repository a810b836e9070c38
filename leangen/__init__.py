"""leangen: load torchtune decoders from mmap'd checkpoints with no loading tax."""

import logging

# torchao (imported by torchtune) warns at import that its C++ kernels don't match this
# torch build. leangen's int8/int4 paths do not need them: CPU int8 runs through
# aten._weight_int8pack_mm (leangen.quant.int8_kernel) and int4 through torch's own packed
# kernels. Keep recipes' stderr for leangen's own summary.
logging.getLogger("torchao").setLevel(logging.ERROR)

from leangen.checkpoint.view import Checkpoint, load_tensors, open_checkpoint
from leangen.decode.generation import Generated, generate_text
from leangen.errors import CheckpointError, ConfigError, ConversionError, LeangenError
from leangen.load.pipeline import load_model

__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "ConversionError", "Generated", "LeangenError",
    "generate_text", "load_model", "load_tensors", "open_checkpoint",
]
