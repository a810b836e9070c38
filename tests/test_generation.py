"""The decode loop against transformers, across batching and the KV cache."""

import pytest
import torch
from tiny_models import VOCAB

import leangen
from leangen.generation import generate_steps
from leangen.sampling import sample


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
