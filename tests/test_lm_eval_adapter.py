"""LeangenLM against transformers on the shipped demo checkpoint: loglikelihood
sums, rolling loglikelihood and greedy generate_until, all offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from leangen import load_model  # noqa: E402
from leangen.demo import demo_dir  # noqa: E402
from leangen.evaluation.lm_eval_adapter import LeangenLM  # noqa: E402

DEMO_KWARGS = dict(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                   max_seq_len=256, intermediate_dim=192, norm_eps=1e-5, rope_base=10000.0)

PAIRS = [
    ("one two three", " four"),
    ("one two three", " five six"),
    ("thirty one thirty two", " thirty three"),
    ("seventeen eighteen nineteen twenty twenty one twenty two", " twenty three twenty four"),
    ("", "one two"),  # empty context: scored after BOS
    ("ninety", " nine"),
]


@pytest.fixture(scope="module")
def demo():
    from torchtune.models.llama2 import llama2_tokenizer

    model = load_model("torchtune.models.llama2.llama2", demo_dir(), model_type="llama2", **DEMO_KWARGS)
    return model, llama2_tokenizer(str(demo_dir() / "tokenizer.model"))


@pytest.fixture(scope="module")
def hf():
    from transformers import LlamaForCausalLM, LlamaTokenizer

    model = LlamaForCausalLM.from_pretrained(demo_dir()).eval()
    return model, LlamaTokenizer.from_pretrained(demo_dir(), add_bos_token=True)


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def hf_continuation_logprob(model, ids: list[int], n_continuation: int) -> tuple[float, bool]:
    logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], -1)[-n_continuation:]
    targets = torch.tensor(ids[-n_continuation:])
    greedy = bool((logprobs.argmax(-1) == targets).all())
    return logprobs.gather(-1, targets[:, None]).sum().item(), greedy


@pytest.mark.parametrize("batch_size", [1, 4])
def test_loglikelihood_equals_transformers(demo, hf, batch_size):
    lm = LeangenLM(*demo, max_length=256, batch_size=batch_size)
    got = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    hf_model, hf_tok = hf
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        # tokenized by transformers, split as lm-eval splits a causal pair
        whole = hf_tok(context + continuation).input_ids
        n_context = len(hf_tok(context).input_ids) if context else 1
        want, want_greedy = hf_continuation_logprob(hf_model, whole, len(whole) - n_context)
        assert logprob == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert greedy == want_greedy


def test_the_trained_model_prefers_the_right_number(demo):
    lm = LeangenLM(*demo, max_length=256)
    right, wrong = lm.loglikelihood(requests("loglikelihood", [("one two three", " four"),
                                                               ("one two three", " seven")]),
                                    disable_tqdm=True)
    assert right[1] and not wrong[1] and right[0] > wrong[0]


@pytest.mark.parametrize("max_length", [256, 16])
def test_loglikelihood_rolling_equals_transformers(demo, hf, max_length):
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    lm = LeangenLM(*demo, max_length=max_length, batch_size=3)
    [got] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    hf_model, hf_tok = hf
    tokens = hf_tok(text, add_special_tokens=False).input_ids
    want = 0.0
    for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
            tokens, prefix_token=hf_tok.bos_token_id, max_seq_len=max_length, context_len=1)):
        want += hf_continuation_logprob(hf_model, context + predicted, len(predicted))[0]
    assert got == pytest.approx(want, rel=1e-4)


@torch.no_grad()
def hf_greedy_text(hf, context: str, n: int) -> str:
    model, tok = hf
    ids = tok(context, return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.size(1):], skip_special_tokens=True)


def test_generate_until_stops_at_the_stop_string_and_max_gen_toks(demo, hf):
    lm = LeangenLM(*demo, max_length=256, batch_size=2)
    args = [
        ("one two three", {"until": [" seven"], "max_gen_toks": 20, "do_sample": False}),
        ("thirty one thirty two", {"until": [" seven"], "max_gen_toks": 20, "do_sample": False}),
        ("eleven twelve", {"until": [], "max_gen_toks": 3, "do_sample": False}),
    ]
    got = lm.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert got[0] == " four five six"  # cut before " seven"
    assert got[1] == " thirty three thirty four thirty five thirty six thirty"  # "thirty| seven"
    assert got[2].strip() == hf_greedy_text(hf, "eleven twelve", 3).strip()
    assert len(demo[1].encode(got[2], add_bos=False, add_eos=False)) == 3


def test_generate_until_stops_at_the_end_of_the_count(demo):
    lm = LeangenLM(*demo, max_length=256)
    [got] = lm.generate_until(requests("generate_until", [
        ("ninety six ninety seven", {"until": ["\n\n"], "max_gen_toks": 30, "do_sample": False})]),
        disable_tqdm=True)
    assert got == " ninety eight ninety nine"  # EOS after ninety nine ends it early


def test_chat_templated_contexts_keep_the_template_tokens(demo):
    model, tokenizer = demo
    lm = LeangenLM(model, tokenizer, max_length=256)
    rendered = lm.apply_chat_template([{"role": "user", "content": "one two three"}])
    ids = lm.tok_encode(rendered)
    assert lm.tok_encode(rendered + " four") == ids + tokenizer.encode(" four", add_bos=False, add_eos=False)
    with pytest.raises(ValueError, match="edited"):
        lm.tok_encode(rendered[:-2])
