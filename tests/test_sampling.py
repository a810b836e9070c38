import pytest
import torch

from leangen.decode.sampling import check_sampling, logits_to_probs, sample


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample(logits, 0).tolist() == [1, 0]


def test_top_k_one_is_greedy_at_any_temperature():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, 5.0, top_k=1), logits.argmax(-1))


def test_top_k_keeps_exactly_k_tokens():
    probs = logits_to_probs(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 1.0, top_k=2)
    assert (probs[0] > 0).tolist() == [False, False, True, True]
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    probs = logits_to_probs(logits, 1.0, top_p=0.7)
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0]]))
    # a tiny top_p still keeps the most likely token
    assert logits_to_probs(logits, 1.0, top_p=1e-6).tolist() == [[1.0, 0.0, 0.0]]


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    assert logits_to_probs(logits, 0.5)[0, 1] > logits_to_probs(logits, 1.0)[0, 1]


def test_same_seed_same_samples():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    draws = [sample(logits, 1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*draws)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1, top_k=None, top_p=None), "temperature"),
    (dict(temperature=1, top_k=0, top_p=None), "top_k"),
    (dict(temperature=1, top_k=None, top_p=1.5), "top_p"),
    (dict(temperature=1, top_k=None, top_p=0), "top_p"),
])
def test_invalid_sampling_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_sampling(**kwargs)


@pytest.mark.parametrize("top_k, top_p", [(None, None), (5, None), (None, 0.9), (7, 0.5), (None, 1e-6), (None, 0.999)])
def test_candidates_are_exactly_the_distribution_of_logits_to_probs(top_k, top_p):
    """sample() draws from the candidate set only: scattered back over the vocabulary it
    must be logits_to_probs' distribution (the definition), token for token."""
    from leangen.decode.sampling import candidates

    logits = torch.randn(3, 4096, generator=torch.Generator().manual_seed(2)) * 3
    probs, ids = candidates(logits, 0.8, top_k, top_p)
    spread = torch.zeros_like(logits).scatter(-1, ids, probs)
    torch.testing.assert_close(spread, logits_to_probs(logits, 0.8, top_k, top_p), atol=1e-6, rtol=1e-5)
    if top_p is not None and top_p < 0.99:  # the doubling search stopped early
        assert ids.shape[-1] < 4096


def test_sampled_ids_follow_the_probabilities():
    logits = torch.tensor([[0.0, 2.0, 1.0, -5.0]]).expand(20000, 4)
    draws = sample(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(counts, logits_to_probs(logits[:1], 1.0, top_k=3)[0], atol=0.02, rtol=0)


@pytest.mark.parametrize("setting, line", [
    (dict(temperature=-1, top_k=None, top_p=None), "temperature=-1: give 0 (greedy) or more."),
    (dict(temperature=1, top_k=0, top_p=None), "top_k=0: give at least 1, or null for no top-k."),
    (dict(temperature=1, top_k=None, top_p=2), "top_p=2: give a number in (0, 1], or null for no top-p."),
])
def test_a_bad_sampling_setting_names_the_key_and_its_value(setting, line):
    with pytest.raises(ValueError) as raised:
        check_sampling(**setting)
    assert str(raised.value) == line
