"""dtype names: the ones a config may give, and the one leangen writes for a dtype."""

from __future__ import annotations

import torch

# torch dtypes by the names leangen accepts for them (the first of each is the short name).
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    """torch's own name without the module: ``torch.bfloat16`` -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")
