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
from leangen.evaluation.perplexity import Score, windows

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
