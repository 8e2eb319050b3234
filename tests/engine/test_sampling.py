"""Sampling: guidance arithmetic, greedy, top-k/top-p support, seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from engine.sampling import SamplingParams, guide, sample


def test_guide_is_uncond_plus_scaled_difference() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 10)).astype(np.float32)
    out = guide(logits, 3.0)
    np.testing.assert_allclose(out, logits[1] + 3.0 * (logits[0] - logits[1]), atol=1e-6)
    np.testing.assert_allclose(guide(logits, 1.0), logits[0], atol=1e-6)


def test_greedy_picks_argmax() -> None:
    logits = np.zeros((2, 8), np.float32)
    logits[0, 5] = 3.0
    logits[1, 2] = 1.0
    rng = np.random.default_rng(0)
    assert sample(logits, SamplingParams(temperature=0.0), rng).tolist() == [5, 2]
    assert sample(logits, SamplingParams(top_k=1), rng).tolist() == [5, 2]


def test_top_k_never_leaves_the_k_best() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 100)).astype(np.float32)
    best = np.argsort(-logits, axis=-1)[:, :5]
    for _ in range(300):
        tok = sample(logits, SamplingParams(temperature=5.0, top_k=5), rng)
        for k in range(4):
            assert tok[k] in best[k]


def test_top_p_keeps_the_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.1, 0.1: top_p 0.7 keeps the first two only
    p = np.array([[0.5, 0.3, 0.1, 0.1]])
    logits = np.log(p).astype(np.float32)
    rng = np.random.default_rng(2)
    seen = {int(sample(logits, SamplingParams(top_k=0, top_p=0.7), rng)[0]) for _ in range(400)}
    assert seen == {0, 1}


def test_distribution_follows_softmax() -> None:
    p = np.array([[0.6, 0.3, 0.1]])
    rng = np.random.default_rng(3)
    draws = [int(sample(np.log(p).astype(np.float32), SamplingParams(top_k=0), rng)[0]) for _ in range(4000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, p[0], atol=0.03)


def test_same_seed_same_tokens_and_fixed_consumption() -> None:
    logits = np.random.default_rng(4).normal(size=(4, 64)).astype(np.float32)
    a = [sample(logits, SamplingParams(), np.random.default_rng(9)) for _ in range(3)]
    b = [sample(logits, SamplingParams(), np.random.default_rng(9)) for _ in range(3)]
    assert all((x == y).all() for x, y in zip(a, b))
    # greedy and sampled steps consume the same amount of randomness
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    sample(logits, SamplingParams(temperature=0.0), r1)
    sample(logits, SamplingParams(), r2)
    assert r1.random() == r2.random()


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=1.5), dict(guidance=float("nan"))]
)
def test_bad_params_are_named(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad).checked()


def test_nan_logits_never_crash_or_leave_the_vocabulary() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 64)).astype(np.float32)
    logits[0] = np.nan
    logits[1, ::2] = np.nan
    for params in (SamplingParams(top_k=8), SamplingParams(top_k=0), SamplingParams(top_k=8, top_p=0.5)):
        tokens = sample(logits, params, rng)
        assert tokens.shape == (4,) and ((tokens >= 0) & (tokens < 64)).all()
