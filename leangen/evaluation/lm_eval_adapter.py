"""lm-evaluation-harness on a leangen-loaded torchtune decoder, offline.

``LeangenLM`` is an ``lm_eval`` ``TemplateLM``: lm-eval turns task documents into
token requests, this class scores them with the model already in memory. Nothing
is downloaded (torchtune's wrapper initialises ``HFLM(pretrained="gpt2")``, which
does). Scoring batches right-padded requests with the KV cache off; generation
goes through ``leangen.decode.generation.complete``, as in the generate recipe.

Data-parallel under torchrun (``ranks``): every rank runs lm-eval's ``evaluate`` on all
documents, and the adapter splits the model work. The requests are batched exactly as in
one process, rank r runs every ``world_size``-th batch, and all results are gathered on
every rank. lm-eval's own split (``lm.rank``/``lm.world_size``, one document in
``world_size`` per rank) draws each rank's few-shot examples from a fresh random
generator (``TODO: need to offset doc_id by rank`` in lm-eval 0.4.13's ``Task.
build_all_requests``). Its results then differ from one process whenever
``num_fewshot > 0``, so the adapter reports rank 0 of 1 to lm-eval, which
``lm_eval.api.model.LM`` allows: "model methods receive all requests and can handle
distribution internally".

lm-eval is optional (``pip install lm-eval==0.4.13``, the ``eval`` extra): import this
module only once ``lm_eval`` is known to import.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from leangen.decode.generation import Completions, complete
from leangen.decode.sampling import sample
from leangen.decode.text import IncrementalDecoder, resolve_add_bos, tokenize
from leangen.errors import ConfigError
from leangen.evaluation.perplexity import Throughput
from leangen.evaluation.scoring import Targets, gather_answers, my_share, score_rows
from leangen.parallel.ranks import Ranks

# A request is ((context, continuation) or None, context ids, continuation ids).
Request = tuple[Any, list[int], list[int]]

# apply_chat_template must hand lm-eval a string, but torchtune's chat templates
# produce token ids. The string starts with this private-use marker holding an
# index into the ids already computed, so tok_encode can return them unchanged.
_TEMPLATED = re.compile("\ue000(\\d+)\ue001")


class LeangenLM(TemplateLM):
    """A torchtune decoder and tokenizer as an lm-eval model."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_length: int,
                 batch_size: int = 8, max_gen_toks: int = 256,
                 throughput: Throughput | None = None, add_bos: str | bool = "auto",
                 ranks: Ranks = Ranks()):
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer  # not `tokenizer`: lm-eval treats that one as an HF tokenizer
        self._max_length = max_length
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._device = next(model.parameters()).device
        self.throughput = throughput if throughput is not None else Throughput()
        self._templated: list[tuple[str, list[int]]] = []
        self._add_bos = resolve_add_bos(add_bos, tokenizer)  # auto: what transformers' tokenizer(text) does
        self.ranks = ranks  # torchrun's ranks: not lm-eval's rank/world_size (see the module docstring)

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """Context for an empty context: BOS, or EOS for tokenizers without one."""
        bos = getattr(self._tokenizer, "bos_id", None)
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return type(self._tokenizer).__name__

    # -- text and tokens ------------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """BOS (as ``add_bos`` says: by default what the HF backend's tokenizer adds) + ids;
        no BOS when ``add_special_tokens`` is False; never EOS."""
        templated = _TEMPLATED.match(string)
        if templated:
            return self._encode_templated(string, templated)
        return self._tokenizer.encode(string, add_bos=self._add_bos and add_special_tokens is not False,
                                      add_eos=False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(list(tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The tokenizer's own chat format; a final assistant turn stays open for prefill."""
        ids = tokenize(list(chat_history), self._tokenizer).tokens
        text = self._tokenizer.decode(ids).rstrip()  # lm-eval strips trailing spaces off contexts
        self._templated.append((text, ids))
        return f"\ue000{len(self._templated) - 1}\ue001{text}"

    def _encode_templated(self, string: str, marker: re.Match) -> list[int]:
        text, ids = self._templated[int(marker.group(1))]
        body = string[marker.end():]
        if not body.startswith(text):
            raise ValueError("a chat-templated context was edited after apply_chat_template")
        rest = body[len(text):]
        return ids + (self._tokenizer.encode(rest, add_bos=False, add_eos=False) if rest else [])

    # -- scoring --------------------------------------------------------------------

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy choice) per request.

        Longest first, so each batch pads little and a memory error shows at once.
        A context too long for ``max_length`` loses tokens from the left.
        """
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        mine = my_share(batches, self.ranks)
        answers: dict[int, tuple[float, bool]] = {}
        bar = tqdm(total=sum(map(len, mine)), desc="loglikelihood", disable=disable_tqdm or not self.ranks.is_main)
        for batch in mine:
            answers.update(zip(batch, self._score_batch([requests[i] for i in batch])))
            bar.update(len(batch))
        bar.close()
        answers = gather_answers(answers, self.ranks, "lm-eval loglikelihood results",
                                 lambda: [(r[1], r[2]) for r in requests])
        results = [answers[i] for i in range(len(requests))]
        for request, answer in zip(requests, results):
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], answer)
        return results

    def _score_batch(self, batch: list[Request]) -> list[tuple[float, bool]]:
        for _, _, continuation in batch:
            if not 0 < len(continuation) <= self.max_length:
                raise ConfigError(f"a continuation of {len(continuation)} tokens cannot be scored "
                                  f"with max_seq_len={self.max_length}: raise max_seq_len.")
        # the last token is only predicted, never read
        rows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in batch]
        targets = [Targets(len(row) - len(continuation), continuation)
                   for row, (_, _, continuation) in zip(rows, batch)]
        with self.throughput:
            scores = score_rows(self.model, rows, targets)
        self.throughput.tokens += sum(map(len, rows))
        return [(float(s.logprobs.sum()), s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each whole text scored once, after the prefix token, in disjoint windows of
        ``max_length`` that keep a full context (lm-eval's rolling windows).

        The text is encoded without BOS because the prefix token already is BOS.
        """
        windows: list[Request] = []
        counts = []
        for (string,) in (r.args for r in requests):
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False),
                prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)
            text_windows = [(None, *make_disjoint_window(pair)) for pair in pairs]
            windows += text_windows
            counts.append(len(text_windows))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for request, count in zip(requests, counts):
            totals.append(sum(logprob for logprob, _ in scores[start:start + count]))
            start += count
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    # -- generation -----------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations, cut at the first of the
        ``until`` strings, at a stop token, or after ``max_gen_toks`` tokens."""
        groups: dict[str, list[int]] = {}  # one batch shape per distinct gen_kwargs
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        batches, prompts = [], {}  # (gen kwargs, request indices), in one-process order
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            prompts.update((i, self._generation_prompt(requests[i].args[0], kwargs["max_gen_toks"]))
                           for i in indices)
            indices.sort(key=lambda i: -len(prompts[i]))
            batches += [(kwargs, indices[start:start + self.batch_size])
                        for start in range(0, len(indices), self.batch_size)]
        mine = my_share(batches, self.ranks)
        texts: dict[int, str] = {}
        bar = tqdm(total=sum(len(b) for _, b in mine), desc="generate_until",
                   disable=disable_tqdm or not self.ranks.is_main)
        for kwargs, batch in mine:
            texts.update(zip(batch, self._generate_batch([prompts[i] for i in batch], kwargs)))
            bar.update(len(batch))
        bar.close()
        texts = gather_answers(texts, self.ranks, "lm-eval generate_until results",
                               lambda: [r.args for r in requests])
        results = [texts[i] for i in range(len(requests))]
        for request, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results

    def _generation_prompt(self, context: str, max_gen_toks: int) -> list[int]:
        """The context's ids, cut from the left so that the generated tokens still fit."""
        room = self.max_length - max_gen_toks
        if room < 1:
            raise ConfigError(f"the task's max_gen_toks={max_gen_toks} leaves no room for a "
                              f"context within max_seq_len={self.max_length}: raise max_seq_len.")
        return self.tok_encode(context)[-room:]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], kwargs: dict) -> list[str]:
        until = [s for s in kwargs["until"] if s]
        decoders = [IncrementalDecoder(self._tokenizer, p) for p in prompts]
        sampler = functools.partial(sample, temperature=float(kwargs.get("temperature", 0.0)),
                                    top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"))

        def end_at_stop_strings(completions: Completions) -> None:
            for i, decoder in enumerate(decoders):
                # decoded once per step, not once per stop string
                if not completions.done[i] and any(s in decoder.text(completions.tokens[i]) for s in until):
                    completions.end(i)

        with self.throughput:
            done = complete(self.model, prompts, max_new_tokens=kwargs["max_gen_toks"], sampler=sampler,
                            stop_tokens=list(self._tokenizer.stop_tokens), on_step=end_at_stop_strings)
        texts = [d.text(done.text_ids(i)) for i, d in enumerate(decoders)]
        self.throughput.tokens += sum(len(p) + len(done.text_ids(i)) for i, p in enumerate(prompts))
        return [_cut(text, until) for text in texts]


def _cut(text: str, until: list[str]) -> str:
    """Text up to the earliest stop string."""
    ends = [text.find(s) for s in until if s in text]
    return text[:min(ends)] if ends else text
