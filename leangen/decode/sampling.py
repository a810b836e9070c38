"""Next-token choice as small pure functions: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: give 0 (greedy) or more.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: give at least 1, or null for no top-k.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: give a number in (0, 1], or null for no top-p.")


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Probabilities over the last dim after temperature, top-k and top-p (temperature > 0)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        pivot = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < pivot, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        probs = _keep_top_p(probs, top_p)
    return probs


def _keep_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def candidates(logits: torch.Tensor, temperature: float, top_k: int | None = None,
               top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, ids), each [batch, k]: the tokens ``logits_to_probs`` leaves non-zero, most
    likely first, with their probabilities; k is the largest such set in the batch.

    Why not ``logits_to_probs``: on a 128k vocabulary, masking, a full softmax, a full sort
    (top-p) and a multinomial over every token cost a CPU decode step of a 1B model
    5-25% (measured: top_k=300 7 ms, top_p=0.9 26 ms, greedy 0.3 ms). Here only
    ``torch.topk`` and a logsumexp touch the whole vocabulary."""
    logits = logits.float() / temperature
    vocab = logits.size(-1)
    if top_k is not None and top_k < vocab:
        values, ids = torch.topk(logits, top_k)
        log_norm = torch.logsumexp(values, -1, keepdim=True)  # top-k renormalises
    else:
        values, ids, log_norm = _nucleus_prefix(logits, top_p)
    probs = (values - log_norm).exp()
    if top_p is not None and top_p < 1:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, ids


def _nucleus_prefix(logits: torch.Tensor, top_p: float | None):
    """The most likely tokens, sorted, enough to reach ``top_p`` of the mass in every row
    (all of them, unsorted, without top_p): topk with a doubling k instead of a full sort."""
    vocab = logits.size(-1)
    log_norm = torch.logsumexp(logits, -1, keepdim=True)
    if top_p is None or top_p >= 1:  # every token, in vocabulary order: nothing to sort
        return logits, torch.arange(vocab, device=logits.device).expand_as(logits), log_norm
    k = 64
    while 16 * k <= vocab:  # past that, one sort is cheaper than more topk calls
        values, ids = torch.topk(logits, k)
        if ((values - log_norm).exp().sum(-1) >= top_p).all():
            return values, ids, log_norm
        k *= 2
    values, ids = torch.sort(logits, dim=-1, descending=True)  # a flat distribution
    return values, ids, log_norm


def sample(logits: torch.Tensor, temperature: float, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` ([batch, vocab] -> [batch]); greedy at temperature 0.
    Draws from ``logits_to_probs``'s distribution, over its non-zero tokens only."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs, ids = candidates(logits, temperature, top_k, top_p)
    return ids.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
