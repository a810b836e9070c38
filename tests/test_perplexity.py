"""Perplexity: the window plan, and the recipe's numbers against an independent
computation with transformers (the sliding-window loop of its perplexity guide)
on the shipped demo checkpoint."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from leangen.demo import demo_dir
from leangen.eval import main
from leangen.evaluation.perplexity import Score, perplexity, windows

COUNTING = demo_dir() / "eval" / "counting.txt"


def scored(n_tokens, max_seq_len, stride):
    return [i for w in windows(n_tokens, max_seq_len, stride) for i in range(w.first, w.end)]


def test_disjoint_windows_score_all_but_each_windows_first_token():
    plan = windows(10, 4, 4)
    assert [(w.begin, w.end) for w in plan] == [(0, 4), (4, 8), (8, 10)]
    assert scored(10, 4, 4) == [1, 2, 3, 5, 6, 7, 9]


@pytest.mark.parametrize("n, max_seq_len, stride", [(10, 4, 3), (11, 4, 2), (50, 8, 1), (9, 8, 5)])
def test_overlapping_windows_score_every_token_but_the_first_once(n, max_seq_len, stride):
    assert scored(n, max_seq_len, stride) == list(range(1, n))
    for w in windows(n, max_seq_len, stride)[1:]:
        assert w.end - w.first <= stride  # only the last `stride` tokens, fewer at the end


def test_a_final_window_with_nothing_to_score_is_dropped():
    assert [(w.begin, w.end) for w in windows(9, 4, 4)] == [(0, 4), (4, 8)]


def test_a_text_shorter_than_one_window_is_one_window():
    assert windows(5, 64, 16) == [(0, 0, 5, 1)]


@pytest.mark.parametrize("stride", [0, 5])
def test_stride_out_of_range_is_refused(stride):
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, stride)


def test_score_reports_mean_nll_and_its_exponential():
    report = Score(nll_sum=6.0, tokens=3).as_dict()
    assert report == {"ppl": pytest.approx(torch.e ** 2), "nll": 2.0, "tokens": 3}


@torch.no_grad()
def transformers_perplexity(text: str, max_length: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide, loop for loop: (ppl, scored tokens).

    One fix: the guide counts each window's tokens as (targets - 1), for the label
    shift, but an overlapping window's first position is not a target, so the loss
    it returns averages over all its targets. Count what the loss averaged.
    """
    from transformers import LlamaForCausalLM, LlamaTokenizer

    model = LlamaForCausalLM.from_pretrained(demo_dir()).eval()
    tokenizer = LlamaTokenizer.from_pretrained(demo_dir(), add_bos_token=True)
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        loss = model(window, labels=target_ids).loss
        num_valid = (target_ids[:, 1:] != -100).sum().item()  # the loss shifts labels by one
        nll_sum += loss.item() * num_valid
        n_tokens += num_valid
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(torch.exp(torch.tensor(nll_sum / n_tokens, dtype=torch.float64))), n_tokens


@pytest.mark.parametrize("stride", [64, 24])
def test_recipe_perplexity_equals_transformers(tmp_path, capsys, stride):
    out = tmp_path / "results.json"
    code = main(["--config", "eval_demo", "~lm_eval", "max_seq_len=64", f"perplexity.stride={stride}",
                 f"output_file={out}"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())["perplexity"][str(COUNTING)]
    want_ppl, want_tokens = transformers_perplexity(COUNTING.read_text(), 64, stride)
    assert result["tokens"] == want_tokens
    assert result["ppl"] == pytest.approx(want_ppl, rel=1e-4)


# -- scoring without the full logits --------------------------------------------------

def build(builder: str, **kwargs) -> torch.nn.Module:
    from torchtune.config._utils import _get_component_from_path

    torch.manual_seed(0)
    return _get_component_from_path(builder)(**kwargs).eval()


def tiny(family: str, **overrides) -> torch.nn.Module:
    from tests.tiny_models import FAMILIES, builder_kwargs

    return build(FAMILIES[family].builder, **{**builder_kwargs(family), **overrides})


def demo_int8() -> torch.nn.Module:
    from leangen import load_model
    from tests.test_lm_eval_adapter import DEMO_KWARGS

    return load_model("torchtune.models.llama2.llama2", demo_dir(), quantize="int8", **DEMO_KWARGS)


MODELS = {  # one per kind of output projection
    "linear": lambda: tiny("llama"),
    "tied": lambda: tiny("qwen2"),
    # a cap below the logits' scale, so that the capping changes them
    "soft-capped tied": lambda: tiny("gemma2", final_capping_value=0.5),
    "int8 quantized": demo_int8,
}


@torch.inference_mode()
def full_logits_nll(model, sequences, *, max_seq_len, stride, batch_size) -> list[float]:
    """Summed NLL per sequence the way perplexity once computed it: each batch's whole
    [batch, seq, vocab] logits, right-padded, log-softmaxed in float32."""
    plan = [w for i, s in enumerate(sequences) for w in windows(len(s), max_seq_len, stride or max_seq_len, i)]
    nll = [0.0] * len(sequences)
    for start in range(0, len(plan), batch_size):
        batch = plan[start:start + batch_size]
        tokens = torch.zeros(len(batch), max(w.end - w.begin for w in batch), dtype=torch.long)
        for i, w in enumerate(batch):
            tokens[i, :w.end - w.begin] = torch.tensor(sequences[w.seq][w.begin:w.end])
        logprobs = torch.log_softmax(model(tokens).float(), dim=-1)
        for i, w in enumerate(batch):
            predicting = logprobs[i, w.first - w.begin - 1:w.end - w.begin - 1]
            targets = torch.tensor(sequences[w.seq][w.first:w.end])
            nll[w.seq] -= float(predicting.gather(-1, targets[:, None]).sum())
    return nll


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("stride", [None, 5])
def test_chunked_scoring_equals_the_full_logits(monkeypatch, kind, stride):
    """Equal within float32 rounding: the output projection runs on a few positions at a
    time instead of the whole batch, and a matmul's rounding may depend on its shape
    (measured: at most 1e-7 relative on these sums). Chunks of 3 positions, so every
    window spans several chunks, the last one partial."""
    from leangen.evaluation import scoring

    model = MODELS[kind]()
    vocab = model.tok_embeddings.num_embeddings
    monkeypatch.setattr(scoring, "_LOGIT_ELEMENTS", 3 * vocab)
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (37, 50, 5)]
    options = dict(max_seq_len=16, stride=stride, batch_size=3)
    scores = perplexity(model, sequences, progress=False, **options)
    want = full_logits_nll(model, sequences, **options)
    assert [s.nll_sum for s in scores] == pytest.approx(want, rel=1e-6, abs=0)
    assert [s.tokens for s in scores] == ([36, 49, 4] if stride else [34, 46, 4])


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op allocates (views share their base's memory)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_no_batch_of_logits_is_ever_allocated(monkeypatch):
    """4 windows of 48 tokens, a 4096-token vocabulary: the full logits are 3 MB, a chunk
    of 8 positions' float32 logits 128 KB, the model's weights and activations less."""
    from leangen.evaluation import lm_eval_adapter, scoring

    vocab, batch, window = 4096, 4, 48
    model = build("torchtune.models.llama2.llama2", vocab_size=vocab, num_layers=1, num_heads=2,
                  num_kv_heads=1, embed_dim=32, intermediate_dim=64, max_seq_len=64)
    monkeypatch.setattr(scoring, "_LOGIT_ELEMENTS", 8 * vocab)
    chunk, full = 8 * vocab * 4, batch * window * vocab * 4
    with LargestTensor() as control, torch.inference_mode():
        model(torch.zeros(batch, window, dtype=torch.long))
    assert control.largest == full  # the recorder sees the logits when they exist

    sequence = torch.randint(0, vocab, (batch * window,)).tolist()
    with LargestTensor() as ppl:
        scores = perplexity(model, [sequence], max_seq_len=window, batch_size=batch, progress=False)
    assert scores[0].tokens == batch * (window - 1)
    lm = lm_eval_adapter.LeangenLM(model, tokenizer=None, max_length=window, batch_size=batch, add_bos=False)
    requests = [(None, sequence[:8], sequence[8:window + 1])] * batch
    with LargestTensor() as loglikelihood:
        lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert ppl.largest <= chunk and loglikelihood.largest <= chunk
