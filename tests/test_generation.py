"""The decode loop against transformers, across batching and the KV cache."""

import pytest
import torch
from tiny_models import GOLDEN, GOLDEN_IDS, VOCAB

import leangen
from leangen.decode.generation import generate_steps
from leangen.decode.sampling import sample


def _greedy(model, prompts, n, *, use_cache=True):
    outputs = [[] for _ in prompts]
    for step in generate_steps(model, prompts, max_new_tokens=n, sampler=lambda l: sample(l, 0),
                               stop_tokens=[-1], use_cache=use_cache):
        for out, token, active in zip(outputs, step.tokens.tolist(), step.active.tolist()):
            if active:
                out.append(token)
    return outputs


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 8)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def loaded(request, tiny_checkpoint):
    ckpt = tiny_checkpoint(request.param)
    return leangen.load_model(ckpt.builder, ckpt.path, **ckpt.builder_kwargs), ckpt.hf_model


def test_greedy_ids_equal_transformers_generate(loaded):
    model, hf = loaded
    for prompt in _prompts():
        expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                               min_new_tokens=12, pad_token_id=0)[0, len(prompt):].tolist()
        assert _greedy(model, [prompt], 12) == [expected]


def test_batch_equals_one_by_one(loaded):
    model, _ = loaded
    prompts = _prompts()
    assert _greedy(model, prompts, 10) == [_greedy(model, [p], 10)[0] for p in prompts]


def test_kv_cache_equals_recompute(loaded):
    model, _ = loaded
    prompts = _prompts()
    assert _greedy(model, prompts, 8, use_cache=True) == _greedy(model, prompts, 8, use_cache=False)


def test_stops_at_stop_token_per_sequence(loaded):
    model, _ = loaded
    prompts = _prompts()
    free = _greedy(model, prompts, 6)
    stop = free[0][2]  # the first sequence's third token
    outputs = [[] for _ in prompts]
    for step in generate_steps(model, prompts, max_new_tokens=6, sampler=lambda l: sample(l, 0),
                               stop_tokens=[stop]):
        for out, token, active in zip(outputs, step.tokens.tolist(), step.active.tolist()):
            if active:
                out.append(token)
    assert stop in outputs[0]  # the first sequence did stop early
    for out, full in zip(outputs, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert out == full[:cut]


def _step(tokens, active=None):
    from leangen.decode.generation import Step

    tokens = torch.tensor(tokens)
    return Step(tokens, torch.ones_like(tokens, dtype=torch.bool) if active is None else torch.tensor(active))


def test_completions_keep_the_stop_token_but_not_in_text_ids_and_take_nothing_after_it():
    from leangen.decode.generation import Completions

    done = Completions(3, stop_tokens=[2])
    assert done.add(_step([5, 2, 7])) == [0, 1, 2]
    done.end(2)  # e.g. a stop string
    assert done.add(_step([6, 9, 9], [True, False, True])) == [0]
    assert done.tokens == [[5, 6], [2], [7]]
    assert [done.text_ids(i) for i in range(3)] == [[5, 6], [], [7]]
    assert done.done == [False, True, True] and done.stopped == [False, True, False]


def test_generate_text_on_the_demo_equals_the_recipe_golden_output():
    from omegaconf import OmegaConf
    from torchtune.models.llama2 import llama2_tokenizer

    from leangen.demo import demo_dir
    from leangen.recipe.cli import resolve_config_path

    model = leangen.load_model(OmegaConf.load(resolve_config_path("demo")).model, demo_dir())
    tokenizer = llama2_tokenizer(str(demo_dir() / "tokenizer.model"), prompt_template=None)
    result = leangen.generate_text(model, tokenizer, "one two three", max_new_tokens=20)
    assert result.tokens == GOLDEN_IDS and result.prompt_tokens == [1, 46, 47, 44]
    assert "one two three" + result.text == GOLDEN
    with pytest.raises(leangen.ConfigError, match="max_seq_len of 256"):
        leangen.generate_text(model, tokenizer, "one " * 300)
