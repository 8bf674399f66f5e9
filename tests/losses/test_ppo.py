"""Closed-form checks of the PPO building blocks, on float64 with hand-expanded expectations."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lit_pref.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_penalty,
    token_rewards,
)

TOL = {"atol": 1e-6, "rtol": 0.0}


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- KL estimators -----------------------------------------------------------------------------


def test_kl_estimators_on_hand_values():
    """log r = logp − ref for r = π/π_ref; with ρ = π_ref/π = e^{−log r}:

    k1 = log r, k2 = ½ (log r)², k3 = (ρ − 1) − log ρ = e^{−log r} − 1 + log r.
    """
    logps, ref = [-1.0, -2.0, -0.5], [-1.5, -1.0, -0.5]
    log_r = [a - b for a, b in zip(logps, ref, strict=True)]  # [0.5, -1.0, 0.0]
    k1 = kl_penalty(t(logps), t(ref), "k1")
    k2 = kl_penalty(t(logps), t(ref), "k2")
    k3 = kl_penalty(t(logps), t(ref), "k3")
    torch.testing.assert_close(k1, t(log_r), **TOL)
    torch.testing.assert_close(k2, t([0.5 * x * x for x in log_r]), **TOL)
    torch.testing.assert_close(k3, t([math.exp(-x) - 1.0 + x for x in log_r]), **TOL)
    assert (k2 >= 0).all() and (k3 >= 0).all()
    assert k1[2].item() == 0.0 and k2[2].item() == 0.0 and k3[2].item() == 0.0


def test_kl_estimators_vanish_when_policies_match_and_k3_is_nonnegative():
    logps = torch.linspace(-5, 0, 11, dtype=torch.float64)
    for estimator in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logps, logps.clone(), estimator), torch.zeros_like(logps))
    ref = torch.linspace(-1, -8, 11, dtype=torch.float64)
    assert (kl_penalty(logps, ref, "k3") >= 0).all()
    assert (kl_penalty(ref, logps, "k3") >= 0).all()


def test_kl_estimator_rejects_unknown_name():
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(t([0.0]), t([0.0]), "k4")  # type: ignore[arg-type]


# --- token rewards -----------------------------------------------------------------------------


def test_token_rewards_places_score_on_last_completion_token():
    """R_t = −β·kl_t on completion tokens, plus the score on each row's last completion token.

    Row 0 is right-padded (last token at t=2), row 1 has one pad on each side (last at t=2 too but
    starts at t=1), row 2 is a single token, row 3 is empty and gets nothing (not even its score).
    Padded kl values are garbage (inf/nan) and must not leak.
    """
    beta = 0.1
    kl = t(
        [
            [0.2, 0.4, -0.1, math.inf],
            [math.nan, 0.3, 0.5, 7.0],
            [1.0, math.inf, math.inf, math.inf],
            [1.0, 2.0, 3.0, 4.0],
        ]
    )
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    scores = t([2.0, -1.0, 0.5, 9.0])
    expected = t(
        [
            [-0.1 * 0.2, -0.1 * 0.4, -0.1 * -0.1 + 2.0, 0.0],
            [0.0, -0.1 * 0.3, -0.1 * 0.5 - 1.0, 0.0],
            [-0.1 * 1.0 + 0.5, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(token_rewards(scores, kl, mask, beta), expected, **TOL)


# --- GAE ---------------------------------------------------------------------------------------


def test_gae_three_tokens_expanded_by_hand():
    """Three completion tokens, value 0 after the last one:

    δ2 = r2 − v2,  δ1 = r1 + γ v2 − v1,  δ0 = r0 + γ v1 − v0,
    A2 = δ2,  A1 = δ1 + γλ δ2,  A0 = δ0 + γλ δ1 + (γλ)² δ2,  R_t = A_t + v_t.
    """
    gamma, lam = 0.9, 0.8
    r0, r1, r2 = 0.1, -0.2, 1.5
    v0, v1, v2 = 0.3, 0.5, 0.7
    d2 = r2 - v2
    d1 = r1 + gamma * v2 - v1
    d0 = r0 + gamma * v1 - v0
    gl = gamma * lam
    a = [d0 + gl * d1 + gl * gl * d2, d1 + gl * d2, d2]
    advantages, returns = gae(t([[r0, r1, r2]]), t([[v0, v1, v2]]), torch.ones(1, 3), gamma, lam)
    torch.testing.assert_close(advantages, t([a]), **TOL)
    torch.testing.assert_close(returns, t([[a[0] + v0, a[1] + v1, a[2] + v2]]), **TOL)


def test_gae_padded_rows_bootstrap_zero_and_ignore_padding():
    """Row 0 is right-padded: two tokens then garbage, so A1 = r1 − v1 (no bootstrap from the pad),
    A0 = (r0 + γ v1 − v0) + γλ A1. Row 1 has a pad in front (left side) and behaves like a
    two-token episode at t = 1, 2. Masked outputs are exactly 0.
    """
    gamma, lam = 0.95, 0.5
    r0, r1, v0, v1 = 1.0, 2.0, 0.5, -0.25
    rewards = t([[r0, r1, 100.0], [math.nan, r0, r1]])
    values = t([[v0, v1, -100.0], [math.inf, v0, v1]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    a1 = r1 - v1
    a0 = (r0 + gamma * v1 - v0) + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, t([[a0, a1, 0.0], [0.0, a0, a1]]), **TOL)
    torch.testing.assert_close(returns, t([[a0 + v0, a1 + v1, 0.0], [0.0, a0 + v0, a1 + v1]]), **TOL)


def test_gae_skips_masked_token_in_the_middle_and_detaches():
    """A masked token between two completion tokens is skipped: A0 = (r0 + γ v2 − v0) + γλ (r2 − v2)."""
    gamma, lam = 0.9, 0.7
    values = t([[0.2, 9.0, 0.4]]).requires_grad_()
    advantages, returns = gae(t([[1.0, 9.0, 3.0]]), values, torch.tensor([[1, 0, 1]]), gamma, lam)
    a2 = 3.0 - 0.4
    a0 = (1.0 + gamma * 0.4 - 0.2) + gamma * lam * a2
    torch.testing.assert_close(advantages, t([[a0, 0.0, a2]]), **TOL)
    assert not advantages.requires_grad and not returns.requires_grad


# --- KL controllers ----------------------------------------------------------------------------


def test_adaptive_kl_controller_update_by_hand():
    """e = clip(KL/target − 1, ±0.2); β ← β (1 + e · n / horizon)."""
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=8.0, n_steps=256)  # 8/6 − 1 = 1/3 → clipped to 0.2
    expected = 0.1 * (1 + 0.2 * 256 / 10_000)
    assert ctl.value == pytest.approx(expected, abs=1e-12)
    ctl.update(current_kl=5.0, n_steps=512)  # 5/6 − 1 = −1/6, inside the clip range
    expected *= 1 + (-1 / 6) * 512 / 10_000
    assert ctl.value == pytest.approx(expected, abs=1e-12)
    ctl.update(current_kl=0.0, n_steps=100)  # −1 → clipped to −0.2
    expected *= 1 - 0.2 * 100 / 10_000
    assert ctl.value == pytest.approx(expected, abs=1e-12)

    restored = AdaptiveKLController(init_kl_coef=1.0, target=6.0, horizon=10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_is_constant_and_checkpointable():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_kl_controller_validation():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError):
        FixedKLController(-1.0)


# --- clipped policy loss -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("advantage", "ratio", "expected_loss", "expected_grad", "side"),
    [
        # A > 0, ρ > 1 + ε: clipped at 1.2, constant in ρ → no gradient.
        (2.0, 1.5, -2.0 * 1.2, 0.0, "high"),
        # A > 0, ρ < 1 − ε: the unclipped branch is the min; d(−Aρ)/d log π = −Aρ.
        (2.0, 0.5, -2.0 * 0.5, -2.0 * 0.5, None),
        # A < 0, ρ < 1 − ε: clipped at 0.8, constant → no gradient.
        (-3.0, 0.5, 3.0 * 0.8, 0.0, "low"),
        # A < 0, ρ > 1 + ε: unclipped; gradient −Aρ = 3·1.5.
        (-3.0, 1.5, 3.0 * 1.5, 3.0 * 1.5, None),
        # Inside the trust region: unclipped.
        (1.0, 1.1, -1.1, -1.1, None),
    ],
)
def test_clipped_policy_loss_regimes(advantage, ratio, expected_loss, expected_grad, side):
    """ℓ = max(−Aρ, −A clip(ρ, 0.8, 1.2)) with ρ = exp(log π − log π_old)."""
    old = -1.0
    logps = t([[old + math.log(ratio)]]).requires_grad_()
    out = clipped_policy_loss(logps, t([[old]]), t([[advantage]]), torch.ones(1, 1), 0.2, 0.2)
    assert out.per_token_loss.item() == pytest.approx(expected_loss, abs=1e-6)
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), logps)
    assert grad.item() == pytest.approx(expected_grad, abs=1e-6)
    assert out.clip_frac_low.item() == (1.0 if side == "low" else 0.0)
    assert out.clip_frac_high.item() == (1.0 if side == "high" else 0.0)
    assert out.approx_kl.item() == pytest.approx(0.5 * math.log(ratio) ** 2, abs=1e-6)


def test_clipped_policy_loss_batch_asymmetric_range_and_padding():
    """Four real tokens, one in each regime, with ε_low = 0.2, ε_high = 0.28 (clip-higher), plus
    padded garbage. Expected per token: −A·clip(ρ) or −A·ρ as derived in the regime test.
    """
    log = math.log
    logps = t([[log(1.5), log(1.25), math.nan], [log(0.5), log(1.5), 0.0]]).requires_grad_()
    old = t([[0.0, 0.0, math.inf], [0.0, 0.0, 0.0]])
    advantages = t([1.0, -2.0])  # per-sequence advantages broadcast over tokens
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = clipped_policy_loss(logps, old, advantages, mask, cliprange_low=0.2, cliprange_high=0.28)
    expected = t(
        [
            [-1.0 * 1.28, -1.0 * 1.25, 0.0],  # A>0: 1.5 clipped at 1.28; 1.25 inside the range
            [2.0 * 0.8, 2.0 * 1.5, 0.0],  # A<0: 0.5 clipped at 0.8; 1.5 unclipped
        ]
    )
    torch.testing.assert_close(out.per_token_loss, expected, **TOL)
    assert out.clip_frac_low.item() == pytest.approx(1 / 4)
    assert out.clip_frac_high.item() == pytest.approx(1 / 4)
    lr = [log(1.5), log(1.25), log(0.5), log(1.5)]
    assert out.approx_kl.item() == pytest.approx(sum(0.5 * x * x for x in lr) / 4, abs=1e-6)
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), logps)
    torch.testing.assert_close(grad, t([[0.0, -1.25, 0.0], [0.0, 2.0 * 1.5, 0.0]]), **TOL)
    assert not out.clip_frac_low.requires_grad and not out.approx_kl.requires_grad


# --- clipped value loss ------------------------------------------------------------------------


def test_clipped_value_loss_both_branches():
    """ℓ = ½ max((v − R)², (v_old + clip(v − v_old, ±ε) − R)²), ε = 0.2.

    Token 0: v = 1.0, v_old = 0.5, R = 2.0 → clipped v = 0.7; (1.0−2)² = 1 < (0.7−2)² = 1.69:
    the clipped branch wins, loss ½·1.69, gradient 0 (v is outside the clip range).
    Token 1: v = 1.0, v_old = 0.5, R = 0.0 → (1−0)² = 1 > (0.7−0)² = 0.49: unclipped,
    loss ½, gradient v − R = 1.
    Token 2: v = 0.6, v_old = 0.5, R = 0.0 → inside the range, both branches equal 0.36.
    """
    values = t([[1.0, 1.0, 0.6, math.nan]]).requires_grad_()
    old_values = t([[0.5, 0.5, 0.5, 3.0]])
    returns = t([[2.0, 0.0, 0.0, math.inf]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    torch.testing.assert_close(out.per_token_loss, t([[0.5 * 1.69, 0.5, 0.5 * 0.36, 0.0]]), **TOL)
    assert out.clip_frac.item() == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), values)
    torch.testing.assert_close(grad, t([[0.0, 1.0, 0.6, 0.0]]), **TOL)


# --- explained variance ------------------------------------------------------------------------


def test_explained_variance():
    """EV = 1 − Var(R − V)/Var(R) over completion tokens (unbiased variances; the ratio does not
    depend on the correction). Perfect prediction gives 1; padding is ignored.
    """
    returns = t([[1.0, 2.0, 99.0], [3.0, 4.0, -99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0, abs=1e-12)
    values = t([[1.0, 2.0, 0.0], [3.0, 3.0, 0.0]])
    expected = 1 - statistics.variance([0.0, 0.0, 0.0, 1.0]) / statistics.variance([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(values, returns, mask).item() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(explained_variance(values, t([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]), mask).item())
