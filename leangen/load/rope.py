"""Stage (right after the meta build): a RoPE that takes q/k rows as the checkpoint stores them.

HF checkpoints store q/k rows for RoPE that rotates halves (element i pairs with
i + head_dim/2); torchtune's ``RotaryPositionalEmbeddings`` and ``Llama3ScaledRoPE``
rotate interleaved pairs (2i, 2i+1). Rather than permuting every q/k weight (a copy
of those rows), ``match_stored_layout`` wraps the built RoPE module in ``RotateHalf``:
same ``rope_init()``, same ``cache`` buffer (so every torchtune scaling is inherited
and the builder is not forked), same arithmetic, on the other pairing. The q/k
weights then stay the checkpoint's mmap.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.phi3._position_embeddings import Phi3RotaryPositionalEmbeddings
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import RotaryPositionalEmbeddings

from leangen.checkpoint.convert import INTERLEAVED, ROTATE_HALF


class RotateHalf(nn.Module):
    """A torchtune interleaved RoPE applied to rotate-half q/k rows.

    ``rope`` keeps its ``rope_init()`` and its ``cache`` of shape
    ``[positions, head_dim // 2, 2]`` (cos, sin of position p times frequency i);
    frequency i rotates elements (i, i + head_dim/2) here instead of (2i, 2i+1).
    With q/k rows permuted accordingly, the result is bit-identical to ``rope``'s.
    """

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope  # a submodule: its buffers move with the model

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: [b, s, n_h, h_d]; ``input_pos``: [b, s] positions, or None for 0..s-1."""
        seq_len, cache = x.size(1), self.rope.cache
        rope_cache = cache[:seq_len] if input_pos is None else cache[input_pos]
        cos, sin = rope_cache.view(-1, seq_len, 1, x.size(-1) // 2, 2).unbind(-1)
        x1, x2 = x.float().chunk(2, dim=-1)  # fp32, as torchtune's RoPE computes
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


# The q/k row layout each RoPE module rotates. A type not listed here gets None:
# the q/k rows then come in torchtune's layout for the family, as torchtune converts them.
LAYOUTS: dict[type, str] = {
    RotateHalf: ROTATE_HALF,
    Qwen2RotaryPositionalEmbeddings: ROTATE_HALF,
    Phi3RotaryPositionalEmbeddings: ROTATE_HALF,
    RotaryPositionalEmbeddings: INTERLEAVED,
    Llama3ScaledRoPE: INTERLEAVED,
}

# Interleaved modules whose cache RotateHalf can read: [positions, head_dim // 2, (cos, sin)].
WRAPPABLE = (RotaryPositionalEmbeddings, Llama3ScaledRoPE)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """torchtune's attention modules: each holds a reference to the (shared) RoPE."""
    return [m for m in model.modules() if getattr(m, "pos_embeddings", None) is not None]


def qk_layout(model: nn.Module) -> str | None:
    """The q/k row layout the model's RoPE rotates; None without RoPE or for an unknown module."""
    layouts = {LAYOUTS.get(type(m.pos_embeddings)) for m in _attention_modules(model)}
    return layouts.pop() if len(layouts) == 1 else None


def match_stored_layout(model: nn.Module, stored: str | None) -> None:
    """Where the checkpoint stores rotate-half q/k rows and the model's RoPE rotates
    interleaved pairs, put a ``RotateHalf`` around that RoPE on every attention module
    (a RoPE shared by all layers stays one shared instance). Call it on the meta-built
    model, before ``rope_init()``: the wrapper reads the wrapped module's cache lazily."""
    if stored != ROTATE_HALF:
        return
    wrappers: dict[int, RotateHalf] = {}
    for attn in _attention_modules(model):
        rope = attn.pos_embeddings
        if isinstance(rope, WRAPPABLE):
            attn.pos_embeddings = wrappers.setdefault(id(rope), RotateHalf(rope))
