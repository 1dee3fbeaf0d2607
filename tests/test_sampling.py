"""Sampling: each filter checked numerically on small tensors; seeds reproduce; the fast top-k path samples
the same distribution as the reference filter."""

import math

import pytest
import torch

from gptstack.errors import ConfigError
from gptstack.infer.sampling import SamplingParams, apply_penalties, filter_logits, sample_next

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def probs_of(logits):
    return torch.softmax(logits, dim=-1)[0].tolist()


def test_greedy_is_argmax_and_deterministic():
    x = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    p = SamplingParams(temperature=0)
    assert sample_next(x, p, None).tolist() == [1, 0]
    assert sample_next(x, p, None).tolist() == [1, 0]


def test_temperature_scales_logits():
    out = filter_logits(torch.tensor([[1.0, 2.0, 4.0]]), SamplingParams(temperature=0.5))
    assert torch.allclose(out, torch.tensor([[2.0, 4.0, 8.0]]))


def test_top_k_keeps_k_largest():
    out = probs_of(filter_logits(LOGITS, SamplingParams(top_k=2)))
    assert out == pytest.approx([0.5 / 0.75, 0.25 / 0.75, 0, 0, 0], abs=1e-6)


def test_top_p_keeps_smallest_prefix_reaching_p():
    # cumulative 0.5, 0.75, 0.90: top_p=0.8 keeps the first three (the third crosses 0.8)
    out = probs_of(filter_logits(LOGITS, SamplingParams(top_p=0.8)))
    assert out == pytest.approx([0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0], abs=1e-6)
    out = probs_of(filter_logits(LOGITS, SamplingParams(top_p=0.5)))
    assert out == pytest.approx([1, 0, 0, 0, 0], abs=1e-6)


def test_min_p_drops_below_fraction_of_max():
    # floor = 0.5 * 0.2 = 0.1: keeps 0.5, 0.25, 0.15
    out = probs_of(filter_logits(LOGITS, SamplingParams(min_p=0.2)))
    assert out == pytest.approx([0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0], abs=1e-6)


def test_penalties_numeric():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    rep = apply_penalties(logits, counts, SamplingParams(repetition_penalty=2.0))
    assert rep.tolist() == [[1.0, -2.0, 0.5, 1.0]]
    freq = apply_penalties(logits, counts, SamplingParams(frequency_penalty=0.5))
    assert freq.tolist() == [[1.0, -1.5, 0.5, 1.0]]
    pres = apply_penalties(logits, counts, SamplingParams(presence_penalty=0.25))
    assert pres.tolist() == [[1.75, -1.25, 0.5, 1.0]]
    # a penalised argmax moves: greedy with a strong presence penalty avoids the seen token
    assert sample_next(logits, SamplingParams(temperature=0, presence_penalty=5.0), None, counts).item() == 3


def test_seeded_sampling_reproducible():
    logits = torch.randn(4, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample_next(logits, p, torch.Generator().manual_seed(7)).tolist() for _ in range(2)]
    assert a[0] == a[1]
    b = sample_next(logits, p, torch.Generator().manual_seed(8)).tolist()
    draws = [sample_next(logits, p, torch.Generator().manual_seed(s)).tolist() for s in range(10)]
    assert len({tuple(d) for d in draws + [b]}) > 1


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_k=3, top_p=0.7), dict(top_k=4, min_p=0.3),
                                dict(top_k=4, temperature=0.5)])
def test_fast_top_k_path_matches_reference_distribution(kw):
    logits = torch.log(torch.tensor([[0.4, 0.05, 0.3, 0.02, 0.15, 0.08]]))
    p = SamplingParams(**kw)
    ref = torch.softmax(filter_logits(logits, p), dim=-1)[0]
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = sample_next(logits.expand(n, -1), p, g)
    freq = torch.bincount(draws, minlength=6).float() / n
    assert torch.allclose(freq, ref, atol=0.015), (freq, ref)
    assert (freq[ref == 0] == 0).all()


@pytest.mark.parametrize("kw", [dict(n=0), dict(max_tokens=0), dict(temperature=-1), dict(top_p=0),
                                dict(min_p=1.0), dict(top_k=-1), dict(repetition_penalty=0), dict(stop=[""]),
                                dict(stop_token_ids=[-1])])
def test_invalid_params(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw).validate()


def test_filters_keep_at_least_one_token():
    logits = torch.tensor([[0.0, math.log(1e-9)]])
    for p in (SamplingParams(top_p=1e-6), SamplingParams(min_p=0.999), SamplingParams(top_k=1)):
        assert torch.isfinite(filter_logits(logits, p)).sum() >= 1


def test_categorical_matches_probabilities_and_never_picks_zero_probability():
    from gptstack.infer.sampling import categorical

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.0, 0.2]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    idx = categorical(probs, g)
    freq = torch.bincount(idx, minlength=5).float() / idx.numel()
    assert freq[1] == 0 and freq[3] == 0
    assert torch.allclose(freq, probs[0], atol=0.015), freq.tolist()
    # one-hot rows (a grammar leaving one token) always give that token; seeds reproduce
    onehot = torch.zeros(3, 7)
    onehot[0, 6] = onehot[1, 0] = onehot[2, 3] = 1
    assert categorical(onehot, g).tolist() == [6, 0, 3]
    a = categorical(probs[:50], torch.Generator().manual_seed(5))
    b = categorical(probs[:50], torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
