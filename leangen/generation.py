"""Prefill then decode, as a generator of one token per sequence per step.

Prompts of different lengths are left-padded; torchtune's padding-mask helpers give
each sequence its own positions and a causal mask that hides the padding, so a
batch decodes exactly like its prompts one by one. The KV cache is sized to the
longest prompt plus ``max_new_tokens``, never to the model's maximum context.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import local_kv_cache

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [b, vocab] -> ids [b]
Forward = Callable[..., torch.Tensor]


@dataclass
class Step:
    tokens: torch.Tensor  # [batch] the ids chosen at this step
    active: torch.Tensor  # [batch] False for sequences that had already stopped


class Batch:
    """Left-padded token buffer with its positions and causal/padding mask."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, device: torch.device):
        self.prompt_len = max(len(p) for p in prompts)
        self.total_len = self.prompt_len + max_new_tokens
        size = (len(prompts), self.total_len)
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        real = torch.zeros(size, dtype=torch.bool, device=device)
        for i, prompt in enumerate(prompts):
            start = self.prompt_len - len(prompt)
            self.tokens[i, start:self.prompt_len] = torch.tensor(prompt, device=device)
            real[i, start:] = True  # generated positions count as real tokens
        self.mask = get_causal_mask_from_padding_mask(real, target_seq_len=self.total_len)
        self.positions = get_position_ids_from_padding_mask(real)


@torch.inference_mode()
def generate_steps(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
                   sampler: Sampler, stop_tokens: list[int], use_cache: bool = True,
                   decode_forward: Forward | None = None) -> Iterator[Step]:
    """Yield each step's tokens until every sequence stops or ``max_new_tokens`` is reached.

    ``decode_forward`` replaces ``model`` for the one-token decode calls (e.g. a
    ``torch.compile``d model); prefill always runs eagerly.
    """
    device = next(model.parameters()).device
    batch = Batch(prompts, max_new_tokens, device)
    stops = torch.tensor(stop_tokens, dtype=torch.long, device=device)
    active = torch.ones(len(prompts), dtype=torch.bool, device=device)
    with _caches(model, use_cache, len(prompts), batch.total_len, device):
        decode = model if decode_forward is None else decode_forward
        end = batch.prompt_len
        logits = _forward(model, batch, 0, end, use_cache)
        for _ in range(max_new_tokens):
            tokens = sampler(logits)
            batch.tokens[:, end] = tokens
            yield Step(tokens, active.clone())
            active &= ~torch.isin(tokens, stops)
            end += 1
            if not active.any() or end == batch.total_len:
                return
            logits = _forward(decode, batch, end - 1 if use_cache else 0, end, use_cache)


def _forward(model: Forward, batch: Batch, start: int, end: int, use_cache: bool) -> torch.Tensor:
    """Logits of the last position for tokens [start, end); with a cache, keys span it all."""
    keys = batch.total_len if use_cache else end
    out = model(batch.tokens[:, start:end], input_pos=batch.positions[:, start:end],
                mask=batch.mask[:, start:end, :keys])
    return out[:, -1]


def _caches(model: torch.nn.Module, use_cache: bool, batch_size: int, length: int, device):
    if not use_cache:
        return contextlib.nullcontext()
    dtype = next(model.parameters()).dtype
    return local_kv_cache(model, batch_size=batch_size, device=device, dtype=dtype,
                          decoder_max_seq_len=length)
