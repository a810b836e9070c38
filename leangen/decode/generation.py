"""Prefill then decode: a generator of one token per sequence per step
(``generate_steps``), the completions it builds (``complete``), and text in, text
out for the Python API (``generate_text``). The recipes and the lm-eval adapter all
go through ``complete``.

Prompts of different lengths are left-padded; torchtune's padding-mask helpers give
each sequence its own positions and a causal mask that hides the padding, so a
batch decodes exactly like its prompts one by one. The KV cache is sized to the
longest prompt plus ``max_new_tokens``, never to the model's maximum context.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import local_kv_cache

from leangen.decode.sampling import check_sampling, sample
from leangen.decode.text import IncrementalDecoder, tokenize
from leangen.errors import ConfigError

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [b, vocab] -> ids [b]
Forward = Callable[..., torch.Tensor]
OnStep = Callable[["Completions"], None]


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


def context_limit(model: torch.nn.Module) -> tuple[int, str]:
    """The positions a run may use, and what sets that limit.

    Past a config.json ``sliding_window`` torchtune's attention no longer matches the
    model (Mistral's sees the whole context, Gemma 2's decode differs), so a run stays
    within the window rather than silently computing another model."""
    config = getattr(getattr(model, "leangen", None), "config", None)  # None: not from load_model
    window = getattr(config, "sliding_window", None)
    if window and window < model.max_seq_len:
        return window, (f"the model's sliding window of {window} (config.json sliding_window; "
                        "past it torchtune's attention differs from the model's)")
    return model.max_seq_len, f"the model's max_seq_len of {model.max_seq_len}"


def check_fits(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Every prompt plus ``max_new_tokens`` fits the model's context."""
    limit, why = context_limit(model)
    for number, prompt in enumerate(prompts, 1):
        if len(prompt) + max_new_tokens > limit:
            raise ConfigError(
                f"prompt {number} is {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it "
                f"needs {len(prompt) + max_new_tokens} positions, more than {why}. Shorten the "
                "prompt or lower max_new_tokens."
            )


class Completions:
    """Each sequence's generated ids as the steps arrive. A sequence ends at its stop
    token, which it keeps (``text_ids`` leaves it out), or when the caller ends it."""

    def __init__(self, count: int, stop_tokens: list[int]):
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.done = [False] * count
        self.stopped = [False] * count  # ended by a stop token
        self._stops = set(stop_tokens)

    def add(self, step: Step) -> list[int]:
        """Append the step's tokens; returns the sequences that took one."""
        took = []
        for i, token in enumerate(step.tokens.tolist()):
            if not self.done[i]:
                self.tokens[i].append(token)
                self.stopped[i] = self.done[i] = token in self._stops
                took.append(i)
        return took

    def end(self, i: int) -> None:
        """End sequence ``i`` for the caller's own reason (e.g. a stop string)."""
        self.done[i] = True

    def text_ids(self, i: int) -> list[int]:
        """The ids that have text: without the final stop token."""
        return self.tokens[i][:-1] if self.stopped[i] else self.tokens[i]


def complete(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
             sampler: Sampler, stop_tokens: list[int], use_cache: bool = True,
             decode_forward: Forward | None = None, on_step: OnStep | None = None) -> Completions:
    """Generate until every sequence is done; ``on_step`` sees the completions after
    each step (to stream, time, or end sequences early)."""
    completions = Completions(len(prompts), stop_tokens)
    steps = generate_steps(model, prompts, max_new_tokens=max_new_tokens, sampler=sampler,
                           stop_tokens=stop_tokens, use_cache=use_cache, decode_forward=decode_forward)
    # closing the generator, even on an error or Ctrl-C, takes its KV cache off the model
    with contextlib.closing(steps):
        for step in steps:
            completions.add(step)
            if on_step is not None:
                on_step(completions)
            if all(completions.done):
                break
    return completions


@dataclass
class Generated:
    text: str  # the completion's text, without the stop token
    tokens: list[int]  # the generated ids, the stop token included if one ended it
    prompt_tokens: list[int]


def generate_text(model: torch.nn.Module, tokenizer, prompt: str | list[dict], *,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> Generated:
    """One completion, as the generate recipe makes it: a string is a raw completion
    (BOS + text), a list of ``{"role", "content"}`` messages goes through the
    tokenizer's chat format. Greedy by default."""
    check_sampling(temperature, top_k, top_p)
    tokens = tokenize(prompt, tokenizer).tokens
    check_fits(model, [tokens], max_new_tokens)
    sampler = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
    done = complete(model, [tokens], max_new_tokens=max_new_tokens, sampler=sampler,
                    stop_tokens=list(tokenizer.stop_tokens))
    text = IncrementalDecoder(tokenizer, tokens).text(done.text_ids(0))
    return Generated(text, done.tokens[0], tokens)
