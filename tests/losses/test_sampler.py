"""Closed-form checks (float64) of the rollout engine / trainer mismatch and its truncated
importance-sampling correction, on log-probs where the two differ."""

from __future__ import annotations

import math

import pytest
import torch

from lit_pref.losses.grpo import grpo_policy_loss
from lit_pref.losses.sampler import logp_mismatch, truncated_is_weights


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Two completions of 3 and 2 tokens (the last position of the second is padding, holding garbage).
OLD = t([[-1.0, -2.0, -0.5], [-3.0, -0.2, 7.0]])
ENGINE = t([[-1.5, -1.0, -0.5], [-1.0, -0.2, -9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()


def test_mismatch_is_the_mean_and_max_absolute_log_ratio_over_completion_tokens():
    mean, largest = logp_mismatch(OLD, ENGINE, MASK)
    # |old − engine| on the 5 real tokens: 0.5, 1.0, 0, 2.0, 0 (the padded 16 is left out).
    assert mean.item() == pytest.approx(3.5 / 5, abs=1e-12)
    assert largest.item() == pytest.approx(2.0, abs=1e-12)


def test_mismatch_leaves_out_tokens_the_engine_did_not_score():
    engine = ENGINE.clone()
    engine[1, 0] = float("nan")  # the 2.0 token
    mean, largest = logp_mismatch(OLD, engine, MASK)
    assert (mean.item(), largest.item()) == pytest.approx((1.5 / 4, 1.0), abs=1e-12)
    none = logp_mismatch(OLD, torch.full_like(ENGINE, float("nan")), MASK)
    assert [v.item() for v in none] == [0.0, 0.0]


def test_truncated_weights_are_the_probability_ratio_capped():
    weights = truncated_is_weights(OLD, ENGINE, MASK, cap=2.0)
    # π_old / π_engine = exp(old − engine): exp(0.5), exp(−1), 1; exp(−2), 1; padding 1 (not 2 = cap).
    expected = t([[math.exp(0.5), math.exp(-1.0), 1.0], [math.exp(-2.0), 1.0, 1.0]])
    assert torch.allclose(weights, expected, atol=1e-12, rtol=0)
    # Raising the engine's log-prob of a token lowers its weight; a far lower one hits the cap.
    assert truncated_is_weights(OLD, ENGINE - 5.0, MASK, cap=2.0)[MASK].eq(2.0).all()
    assert not weights.requires_grad


def test_truncated_weights_ignore_padding_and_unscored_tokens():
    engine = ENGINE.clone()
    engine[0, 1] = float("nan")
    weights = truncated_is_weights(OLD, engine, MASK, cap=10.0)
    assert weights[0, 1] == 1.0 and weights[1, 2] == 1.0  # unscored, padding
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(OLD, ENGINE, MASK, cap=0.0)


def test_grpo_surrogate_is_weighted_per_token_and_the_kl_is_not():
    """grpo (per-sequence mean) at ρ = 1: ℓ_t = −A_i + β k3_t; weights multiply the −A_i part only."""
    logps = OLD.clone().requires_grad_(True)
    ref = OLD - 0.3
    advantages = t([1.0, -2.0])
    weights = truncated_is_weights(OLD, ENGINE, MASK, cap=2.0)
    beta = 0.1
    out = grpo_policy_loss(logps, None, ref, advantages, MASK, beta=beta, sampler_weights=weights)
    k3 = math.exp(-0.3) + 0.3 - 1  # exp(ref − logp) − (ref − logp) − 1 with ref − logp = −0.3
    rows = []
    for i, n in enumerate((3, 2)):
        rows.append(sum(-advantages[i].item() * weights[i, j].item() + beta * k3 for j in range(n)) / n)
    assert out.loss.item() == pytest.approx(sum(rows) / 2, abs=1e-12)
    plain = grpo_policy_loss(logps, None, ref, advantages, MASK, beta=beta)
    assert out.loss.item() != pytest.approx(plain.loss.item(), abs=1e-3)
    # Each token's surrogate gradient is scaled by its weight, the KL's is not: the KL part alone is
    # the loss with zero advantages.
    (grad,) = torch.autograd.grad(out.loss, logps)
    (plain_grad,) = torch.autograd.grad(plain.loss, logps)
    kl_only = grpo_policy_loss(logps, None, ref, torch.zeros_like(advantages), MASK, beta=beta)
    (kl_grad,) = torch.autograd.grad(kl_only.loss, logps)
    assert torch.allclose(grad - kl_grad, (plain_grad - kl_grad) * weights, atol=1e-12, rtol=0)
    assert not torch.allclose(grad, plain_grad, atol=1e-3)
