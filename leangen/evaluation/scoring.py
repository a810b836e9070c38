"""Token log-probabilities of a decoder without its full logits, and the data-parallel
split of scoring work; shared by perplexity and the lm-eval adapter.

A batch of right-padded rows runs through the decoder once, up to its final hidden
states ``[batch, seq, dim]``. The output projection then runs only on the positions
that predict a scored token, a few at a time, each chunk followed by its float32
log-softmax. So the ``[batch, seq, vocab]`` logits never exist: at a 128k vocabulary
they are 8.4 GB for 8 windows of 2048 tokens, against 64 MB per chunk here.

torchtune's own ``set_num_output_chunks`` does not help: ``chunked_output`` returns all
the chunks at once, which together are the full logits.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from leangen.errors import LeangenError
from leangen.parallel.ranks import Ranks, all_gather_object

# Logits per chunk of positions (float32: 64 MB, and as much again for their log-softmax):
# 128 positions of a 128k vocabulary, still enough rows for an efficient matmul.
_LOGIT_ELEMENTS = 1 << 24


class Targets(NamedTuple):
    """Tokens ``tokens`` of a row, scored from the logits at positions ``start``,
    ``start + 1``, ...: the logits at position p predict the row's token p + 1."""

    start: int
    tokens: list[int]


class TokenScores(NamedTuple):
    logprobs: torch.Tensor  # float32 [len(tokens)]: log p(token | the row before it)
    greedy: bool  # every token was the most likely one


def score_rows(model: torch.nn.Module, rows: list[list[int]], targets: list[Targets]) -> list[TokenScores]:
    """One ``TokenScores`` per row; the rows are scored together, right-padded with token 0.

    Without a KV cache torchtune's decoder applies plain causal attention, so the
    padding after a row never reaches that row's real positions.
    """
    device = next(model.parameters()).device
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, device=device)
    output = model.output
    hidden = final_hidden_states(model, tokens)
    # the chunk size only bounds memory; the embedding's row count is the vocabulary
    # for every decoder leangen builds, tied or not, quantized or not
    positions = max(1, _LOGIT_ELEMENTS // model.tok_embeddings.num_embeddings)
    return [_score(output, hidden[i], want, positions) for i, want in enumerate(targets)]


def final_hidden_states(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The decoder's forward up to its output projection: the final norm's output
    ``[batch, seq, dim]``, in the model's dtype.

    The model's own forward runs (masks, embedding scaling, Gemma's norms), with the
    projection swapped for a stand-in that keeps its input and returns nothing.
    """
    kept = _KeepInput()
    with _output_replaced(model, kept):
        model(tokens)
    return kept.input


def _score(output: Callable, hidden: torch.Tensor, want: Targets, positions: int) -> TokenScores:
    """``hidden``: one row's final hidden states [seq, dim]."""
    targets = torch.tensor(want.tokens, device=hidden.device)
    parts, greedy = [], True
    for i in range(0, len(targets), positions):
        chunk = targets[i:i + positions]
        # .float() as torchtune's unembed does: soft-capping and quantized outputs included
        logits = output(hidden[want.start + i:want.start + i + len(chunk)]).float()
        greedy = greedy and bool((logits.argmax(-1) == chunk).all())
        parts.append(F.log_softmax(logits, dim=-1).gather(-1, chunk[:, None]).squeeze(-1))
    logprobs = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return TokenScores(logprobs, greedy)


class _KeepInput:
    """A stand-in output projection: keeps what it is given, computes no logits."""

    input: torch.Tensor

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        self.input = h
        return h.new_empty(0)  # the caller's .float() of this costs nothing


@contextmanager
def _output_replaced(model: torch.nn.Module, stand_in: Callable) -> Iterator[None]:
    """``model.output`` is ``stand_in`` inside the block. The output is a child module
    (nn.Linear, a quantized Linear) or a plain attribute (torchtune's TiedLinear, Gemma 2's
    soft-capped one); an entry in the instance's ``__dict__`` shadows either, and setting
    it directly skips nn.Module's check that a child module is replaced by a module."""
    own = vars(model)
    had, before = "output" in own, own.get("output")
    own["output"] = stand_in
    try:
        yield
    finally:
        if had:
            own["output"] = before
        else:
            del own["output"]


# -- data-parallel ranks ------------------------------------------------------------


def my_share(batches: list, ranks: Ranks) -> list:
    """This rank's batches: every ``world_size``-th, starting at its rank. Every rank
    plans the same batches, so each batch holds what it holds in one process."""
    return batches[ranks.rank::ranks.world_size]


def gather_answers(answers: dict[int, Any], ranks: Ranks, what: str,
                   inputs: Callable[[], Any]) -> dict[int, Any]:
    """Every rank's answers, by index, on every rank. ``inputs()`` (called only on several
    ranks) gives what the answers depend on: the ranks must have planned the same work in
    the same order, or they would hand back each other's answers."""
    if not ranks.distributed:
        return answers
    digest = hashlib.sha256(repr(inputs()).encode()).hexdigest()
    parts = all_gather_object((digest, answers), f"gathering the {what}")
    differ = [rank for rank, (d, _) in enumerate(parts) if d != parts[0][0]]
    if differ:
        raise LeangenError(f"{what}: ranks {differ} built other inputs than rank 0; "
                           "every rank must see the same texts, tasks, data and config.")
    merged: dict[int, Any] = {}
    for _, part in parts:
        merged.update(part)
    return merged
