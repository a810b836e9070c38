"""Perplexity of a decoder on token sequences, scored in sliding windows.

The definition (the sliding-window method of transformers' perplexity guide):

- the model sees windows of at most ``max_seq_len`` tokens, starting every
  ``stride`` tokens, until a window reaches the end of the sequence;
- a window scores the tokens no earlier window scored, except its own first
  token, which has no context inside the window. With ``stride == max_seq_len``
  that is every token but each window's first; with a smaller stride it is the
  window's last ``stride`` tokens (fewer in the final, partial window);
- ``ppl = exp(sum NLL / scored tokens)``, the NLL from a float32 log-softmax.

Windows from all sequences are batched together, right-padded, with no KV cache:
causal attention means a real position never sees the padding after it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from leangen.parallel.ranks import Ranks, all_gather_object

# Positions per float32 log-softmax call: bounds the float32 copy of the logits
# (1024 x a 128k vocabulary is 0.5 GB) whatever the window and batch sizes.
_LOGSOFTMAX_CHUNK = 1024


class Window(NamedTuple):
    """Tokens [begin, end) of sequence ``seq`` go in; tokens [first, end) are scored."""

    seq: int
    begin: int
    end: int
    first: int


@dataclass
class Score:
    """Summed NLL (nats) over ``tokens`` scored tokens."""

    nll_sum: float = 0.0
    tokens: int = 0

    def add(self, other: "Score") -> None:
        self.nll_sum += other.nll_sum
        self.tokens += other.tokens

    def as_dict(self) -> dict:
        """ppl, mean NLL per scored token (so ppl = exp(nll)), and the scored-token count."""
        mean = self.nll_sum / self.tokens
        return {"ppl": math.exp(mean), "nll": mean, "tokens": self.tokens}


@dataclass
class Throughput:
    """Tokens the model read (padding excluded) and the seconds spent reading them.

    ``with throughput:`` around model work adds its time; callers add the tokens.
    """

    tokens: int = 0
    seconds: float = 0.0
    _start: float = field(default=0.0, init=False, repr=False)

    def __enter__(self) -> "Throughput":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._start

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


def windows(n_tokens: int, max_seq_len: int, stride: int, seq: int = 0) -> list[Window]:
    """The windows of one sequence; a window that would score nothing is left out."""
    if not 1 <= stride <= max_seq_len:
        raise ValueError(f"stride must be in [1, max_seq_len={max_seq_len}], got {stride}")
    spans, scored_until = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_seq_len, n_tokens)
        first = max(begin + 1, scored_until)
        if first < end:
            spans.append(Window(seq, begin, end, first))
        scored_until = end
        if end == n_tokens:
            break
    return spans


@torch.inference_mode()
def perplexity(model: torch.nn.Module, sequences: list[list[int]], *, max_seq_len: int,
               stride: int | None = None, batch_size: int = 8, progress: bool = True,
               throughput: Throughput | None = None, ranks: Ranks = Ranks()) -> list[Score]:
    """One ``Score`` per sequence; ``stride=None`` means ``max_seq_len``.

    Data-parallel under torchrun: every rank plans the same batches and scores every
    ``world_size``-th one (so each batch holds the windows it holds in one process), the
    window NLLs are gathered, and every rank sums them in plan order, as one process does.
    """
    stride = stride or max_seq_len
    plan = [w for i, seq in enumerate(sequences) for w in windows(len(seq), max_seq_len, stride, i)]
    batches = list(_batches(list(enumerate(plan)), batch_size))[ranks.rank::ranks.world_size]
    throughput = throughput if throughput is not None else Throughput()
    nll: dict[int, float] = {}  # window index in the plan -> summed NLL of its scored tokens
    total = sum(map(len, batches))
    with tqdm(total=total, desc="perplexity", unit="window", disable=not progress or not ranks.is_main) as bar:
        for batch in batches:
            rows = [sequences[w.seq][w.begin:w.end] for _, w in batch]
            with throughput:
                logits = padded_logits(model, rows)
                for (index, w), row_logits in zip(batch, logits):
                    # logits at position p predict token p + 1 of the window
                    targets = torch.tensor(sequences[w.seq][w.first:w.end], device=row_logits.device)
                    predicting = row_logits[w.first - w.begin - 1:w.end - w.begin - 1]
                    nll[index] = -float(token_logprobs(predicting, targets).sum())
            throughput.tokens += sum(len(r) for r in rows)
            bar.update(len(batch))
    if ranks.distributed:
        for part in all_gather_object(nll, "gathering the perplexity windows' scores"):
            nll.update(part)
    scores = [Score() for _ in sequences]
    for index, w in enumerate(plan):  # Python floats: float64 sums, in one fixed order
        scores[w.seq].add(Score(nll[index], w.end - w.first))
    return scores


def padded_logits(model: torch.nn.Module, rows: list[list[int]]) -> torch.Tensor:
    """Logits [batch, longest row, vocab] for rows right-padded with token 0.

    Without a KV cache torchtune's decoder applies plain causal attention, so the
    padding after a row never reaches that row's real positions.
    """
    device = next(model.parameters()).device
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, device=device)
    return model(tokens)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, [n, vocab] x [n] -> [n], via a float32 log-softmax."""
    out = [
        F.log_softmax(logits[i:i + _LOGSOFTMAX_CHUNK].float(), dim=-1)
        .gather(-1, targets[i:i + _LOGSOFTMAX_CHUNK, None]).squeeze(-1)
        for i in range(0, len(targets), _LOGSOFTMAX_CHUNK)
    ]
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
