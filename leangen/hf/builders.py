"""Builders torchtune lacks, made of torchtune's own modules (named by ``HF_FAMILIES``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leangen.load.output import OutputWrapper

# ---------------------------------------------------------------------------------------
# builders torchtune lacks, made of torchtune's own modules


def llama2_tied(**kwargs: Any) -> nn.Module:
    """torchtune's llama2 (plain RoPE, any base) with the output tied to the embedding,
    as in SmolLM-style Llama checkpoints. llama3_2 ties but always scales its RoPE."""
    from torchtune.models.llama2 import llama2
    from torchtune.modules import TiedLinear

    model = llama2(**kwargs)
    del model.output
    model.output = TiedLinear(model.tok_embeddings)
    return model


class SoftCappedOutput(OutputWrapper):
    """Gemma 2's output: the tied projection, then ``cap * tanh(logits / cap)``.

    A module, so that a quantized or packed copy of the projection put in its place is
    a child like any other Linear (its bytes counted, its weight cached); while tied,
    the projection is torchtune's ``TiedLinear``, a plain attribute with no parameters."""

    def __init__(self, tied_module: nn.Module, cap: float | None):
        from torchtune.modules import TiedLinear

        super().__init__()
        self.projection = TiedLinear(tied_module)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.projection(x)
        return logits if self.cap is None else torch.tanh(logits / self.cap) * self.cap


def gemma2(final_capping_value: float | None = 30.0, **kwargs: Any) -> nn.Module:
    """torchtune's gemma2 with the final soft-capping on the logits, as transformers does.

    torchtune 0.6.1 caps the final norm's output (the hidden state) instead, which
    changes every logit (1e-3 on a tiny model)."""
    from torchtune.models.gemma2 import gemma2 as tune_gemma2

    model = tune_gemma2(final_capping_value=final_capping_value or 30.0, **kwargs)
    model.norm.logit_capping = nn.Identity()
    model.output = SoftCappedOutput(model.tok_embeddings, final_capping_value)
    return model


