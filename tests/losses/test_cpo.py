"""Tests for ``lit_pref.losses.cpo``: CPO (sigmoid / hinge / IPO) and SimPO.

Expected values are computed by hand with ``math`` on Python floats and compared on float64
tensors with a 1e-6 tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from lit_pref.losses.cpo import (
    CPO_LOSS_TYPES,
    SIMPO_DEFAULT_BETA,
    SIMPO_DEFAULT_CPO_ALPHA,
    CPOLossConfig,
    alpha_reward,
    cpo_loss,
)

TOL = 1e-6

CHOSEN = [-1.0, -2.5, -0.4]
REJECTED = [-1.5, -2.0, -3.0]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def t64(values: list[float], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def expected_preference(h: float, config: CPOLossConfig) -> float:
    """Hand-written per-type formulas on one logit difference h = π_c − π_r."""
    beta, eps = config.beta, config.label_smoothing
    if config.loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if config.loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if config.loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    z = beta * h - config.simpo_gamma
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


@pytest.mark.parametrize(
    "config",
    [
        CPOLossConfig(loss_type="sigmoid", beta=0.5, cpo_alpha=0.0),
        CPOLossConfig(loss_type="sigmoid", beta=0.5, label_smoothing=0.2, cpo_alpha=0.0),
        CPOLossConfig(loss_type="hinge", beta=0.5, cpo_alpha=0.0),
        CPOLossConfig(loss_type="ipo", beta=0.5, cpo_alpha=0.0),
        CPOLossConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.8, cpo_alpha=0.0),
        CPOLossConfig(loss_type="simpo", beta=2.5, simpo_gamma=1.4, label_smoothing=0.1, cpo_alpha=0.0),
    ],
    ids=lambda c: f"{c.loss_type}-eps{c.label_smoothing}",
)
def test_cpo_closed_form(config: CPOLossConfig) -> None:
    """h = [0.5, −0.5, 2.6]; each row compared against its hand-computed formula."""
    out = cpo_loss(t64(CHOSEN), t64(REJECTED), config)
    expected = [expected_preference(c - r, config) for c, r in zip(CHOSEN, REJECTED, strict=True)]
    torch.testing.assert_close(out.losses, t64(expected), atol=TOL, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, t64([config.beta * c for c in CHOSEN]), atol=TOL, rtol=0)
    torch.testing.assert_close(
        out.rejected_rewards, t64([config.beta * r for r in REJECTED]), atol=TOL, rtol=0
    )
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_cpo_hand_numbers() -> None:
    """Literal numbers for one row, h = 0.5, β = 0.5 (βh = 0.25):

    sigmoid: −log σ(0.25) = log(1 + e^−0.25) ≈ 0.5759394
    hinge:   1 − 0.25 = 0.75
    ipo:     (0.5 − 1)² = 0.25
    simpo (β = 0.5, γ = 1): −log σ(0.25 − 1) = log(1 + e^0.75) ≈ 1.1368710
    """
    c, r = t64([-1.0]), t64([-1.5])
    cases = {
        "sigmoid": (CPOLossConfig(beta=0.5, cpo_alpha=0.0), math.log1p(math.exp(-0.25))),
        "hinge": (CPOLossConfig(loss_type="hinge", beta=0.5, cpo_alpha=0.0), 0.75),
        "ipo": (CPOLossConfig(loss_type="ipo", beta=0.5, cpo_alpha=0.0), 0.25),
        "simpo": (
            CPOLossConfig(loss_type="simpo", beta=0.5, simpo_gamma=1.0, cpo_alpha=0.0),
            math.log1p(math.exp(0.75)),
        ),
    }
    for config, value in cases.values():
        assert cpo_loss(c, r, config).losses.item() == pytest.approx(value, abs=TOL)
    assert math.log1p(math.exp(-0.25)) == pytest.approx(0.5759394, abs=1e-7)
    assert math.log1p(math.exp(0.75)) == pytest.approx(1.1368710, abs=1e-7)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # −log σ(0) = ln 2, also with smoothing: −(1−ε)·log ½ − ε·log ½ = ln 2.
        (CPOLossConfig(beta=0.1, cpo_alpha=0.0), math.log(2.0)),
        (CPOLossConfig(beta=0.1, label_smoothing=0.3, cpo_alpha=0.0), math.log(2.0)),
        # relu(1 − 0) = 1.
        (CPOLossConfig(loss_type="hinge", beta=0.1, cpo_alpha=0.0), 1.0),
        # (0 − 1/(2β))² = (1/0.2)² = 25.
        (CPOLossConfig(loss_type="ipo", beta=0.1, cpo_alpha=0.0), 25.0),
        # −log σ(−γ) = log(1 + e^γ) with γ = 1.5.
        (
            CPOLossConfig(loss_type="simpo", beta=2.0, simpo_gamma=1.5, cpo_alpha=0.0),
            math.log1p(math.exp(1.5)),
        ),
        # γ = 0: SimPO collapses to the unsmoothed sigmoid loss, ln 2 at h = 0.
        (CPOLossConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.0, cpo_alpha=0.0), math.log(2.0)),
    ],
    ids=["sigmoid", "sigmoid-smoothed", "hinge", "ipo", "simpo", "simpo-gamma0"],
)
def test_cpo_equal_logps(config: CPOLossConfig, expected: float) -> None:
    logps = t64([-3.0, -0.7])
    out = cpo_loss(logps, logps.clone(), config)
    torch.testing.assert_close(out.losses, t64([expected, expected]), atol=TOL, rtol=0)


def test_simpo_margin_enters_as_gamma_over_beta() -> None:
    """At h = γ/β the SimPO logit is 0, so the loss is exactly ln 2."""
    beta, gamma = 2.0, 1.2
    config = CPOLossConfig.for_simpo(beta=beta, simpo_gamma=gamma)
    out = cpo_loss(t64([-1.0 + gamma / beta]), t64([-1.0]), config)
    assert out.losses.item() == pytest.approx(math.log(2.0), abs=TOL)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "simpo"])
def test_cpo_huge_margin_goes_to_zero(loss_type: str) -> None:
    """h = 1e4 ≫ any target: the loss is 0 (to float64 precision), finite, with finite gradients."""
    config = CPOLossConfig(loss_type=loss_type, beta=0.5, cpo_alpha=0.0)
    chosen = t64([0.0], requires_grad=True)
    rejected = t64([-1e4], requires_grad=True)
    out = cpo_loss(chosen, rejected, config)
    out.losses.sum().backward()
    assert out.losses.item() == pytest.approx(0.0, abs=TOL)
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_cpo_huge_wrong_margin_is_finite(loss_type: str) -> None:
    """h = −1e4: −log σ(βh − γ) ≈ −βh + γ, computed without overflow (no log(0))."""
    beta, gamma = 0.5, 1.0
    config = CPOLossConfig(loss_type=loss_type, beta=beta, simpo_gamma=gamma, cpo_alpha=0.0)
    out = cpo_loss(t64([-1e4]), t64([0.0]), config)
    expected = beta * 1e4 + (gamma if loss_type == "simpo" else 0.0)
    assert out.losses.item() == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_cpo_gradient_signs(loss_type: str, cpo_alpha: float) -> None:
    """Raising the chosen log-prob lowers the loss, raising the rejected one raises it.

    h = −0.5 keeps every type in its active region (hinge: βh < 1; IPO: h < 1/(2β)).
    """
    config = CPOLossConfig(loss_type=loss_type, beta=0.5, cpo_alpha=cpo_alpha)
    chosen = t64([-2.0, -1.5], requires_grad=True)
    rejected = t64([-1.5, -1.0], requires_grad=True)
    # NLL = −log π_c, so it also decreases as the chosen log-prob rises.
    out = cpo_loss(chosen, rejected, config, chosen_nll=-chosen)
    out.losses.sum().backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert (chosen.grad < 0).all()
    assert (rejected.grad > 0).all()


def test_cpo_nll_term_closed_form_and_gradient() -> None:
    """losses = −log σ(βh) + α·nll; d/d nll = α."""
    beta, alpha = 0.5, 0.7
    config = CPOLossConfig(beta=beta, cpo_alpha=alpha)
    nll = t64([0.9, 2.1], requires_grad=True)
    out = cpo_loss(t64([-1.0, -2.0]), t64([-1.5, -1.0]), config, chosen_nll=nll)
    expected = [-log_sigmoid(beta * 0.5) + alpha * 0.9, -log_sigmoid(beta * -1.0) + alpha * 2.1]
    torch.testing.assert_close(out.losses, t64(expected), atol=TOL, rtol=0)
    out.losses.sum().backward()
    torch.testing.assert_close(nll.grad, t64([alpha, alpha]), atol=TOL, rtol=0)


def test_cpo_nll_required_iff_alpha_positive() -> None:
    logps = t64([-1.0])
    with pytest.raises(ValueError, match=r"chosen_nll is required when cpo_alpha > 0 \(got cpo_alpha=1\.0\)"):
        cpo_loss(logps, logps, CPOLossConfig())
    # With α = 0 it is optional, and ignored when given.
    config = CPOLossConfig(cpo_alpha=0.0)
    without = cpo_loss(logps, logps, config).losses
    with_nll = cpo_loss(logps, logps, config, chosen_nll=t64([100.0])).losses
    torch.testing.assert_close(without, with_nll)


def test_cpo_nll_shape_checked() -> None:
    with pytest.raises(ValueError, match=r"chosen_nll must have shape \(2,\)"):
        cpo_loss(t64([-1.0, -1.0]), t64([-1.0, -1.0]), CPOLossConfig(), chosen_nll=t64([1.0]))


def test_cpo_logps_shape_checked() -> None:
    with pytest.raises(ValueError, match="share one 1-D"):
        cpo_loss(t64([-1.0, -1.0]), t64([-1.0]), CPOLossConfig(cpo_alpha=0.0))


def test_for_simpo_defaults() -> None:
    config = CPOLossConfig.for_simpo()
    assert config.loss_type == "simpo"
    assert config.beta == SIMPO_DEFAULT_BETA == 2.0
    assert config.cpo_alpha == SIMPO_DEFAULT_CPO_ALPHA == 0.0
    # Pure SimPO needs no NLL.
    out = cpo_loss(t64([-1.0]), t64([-1.0]), config)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(config.simpo_gamma)), abs=TOL)
    # CPO-SimPO (α > 0) remains expressible.
    assert CPOLossConfig.for_simpo(cpo_alpha=0.5).cpo_alpha == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"loss_type": "dpo"},
            r"unknown CPO loss_type 'dpo'; expected one of \('sigmoid', 'hinge', 'ipo', 'simpo'\)",
        ),
        ({"beta": 0.0}, r"beta must be a finite number > 0, got 0\.0"),
        ({"beta": float("inf")}, r"beta must be a finite number > 0, got inf"),
        ({"label_smoothing": 0.5}, r"label_smoothing must lie in \[0, 0\.5\), got 0\.5"),
        ({"label_smoothing": -0.1}, r"label_smoothing must lie in \[0, 0\.5\), got -0\.1"),
        (
            {"loss_type": "hinge", "label_smoothing": 0.1},
            r"label_smoothing=0\.1 is only defined for loss_type in \('sigmoid', 'simpo'\), got loss_type='hinge'",
        ),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, r"got loss_type='ipo'"),
        ({"cpo_alpha": -1.0}, r"cpo_alpha must be a finite number >= 0 .*got -1\.0"),
        ({"simpo_gamma": -0.5}, r"simpo_gamma must be a finite number >= 0, got -0\.5"),
        ({"alpha": float("nan")}, r"alpha must be a finite number \(0: log-prob rewards\), got nan"),
    ],
)
def test_cpo_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CPOLossConfig(**kwargs)  # type: ignore[arg-type]


# --- AlphaPO -----------------------------------------------------------------------------------


def alphapo(logp: float, alpha: float) -> float:
    """(1 − p^(−α))/α with p = e^logp, the AlphaPO reward as written in the paper."""
    return (1 - math.exp(logp) ** (-alpha)) / alpha


@pytest.mark.parametrize("alpha", [0.5, -0.3])
def test_alpha_reward_closed_form_and_gradient(alpha: float) -> None:
    """r_α = (1 − p^(−α))/α; dr_α/dlog p = p^(−α). E.g. α = 0.5, log p = −2: r = 2(1 − e) = −3.4366."""
    logps = t64(CHOSEN + REJECTED, requires_grad=True)
    reward = alpha_reward(logps, alpha)
    torch.testing.assert_close(
        reward.detach(), t64([alphapo(v, alpha) for v in CHOSEN + REJECTED]), atol=TOL, rtol=0
    )
    (grad,) = torch.autograd.grad(reward.sum(), logps)
    torch.testing.assert_close(grad, t64([math.exp(-alpha * v) for v in CHOSEN + REJECTED]), atol=TOL, rtol=0)
    assert alpha_reward(t64([-2.0]), 0.5).item() == pytest.approx(2 * (1 - math.e), abs=TOL)


def test_alpha_reward_limits() -> None:
    """α = 0 is the log-prob itself (same tensor); α → 0 tends to it. A summed log-prob of −2000
    has p = e^−2000, which is 0 in float64, so p^(−α) computed from p would be inf; from the
    log-prob the reward is the finite (1 − e^200)/α."""
    logps = t64(CHOSEN)
    assert alpha_reward(logps, 0.0) is logps
    torch.testing.assert_close(alpha_reward(logps, 1e-9), logps, atol=1e-6, rtol=0)
    assert math.exp(-2000.0) == 0.0
    far = alpha_reward(t64([-2000.0]), 0.1).item()
    assert math.isfinite(far) and far == pytest.approx((1 - math.exp(200.0)) / 0.1, rel=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_alphapo_every_loss_type_compares_alpha_rewards(loss_type: str) -> None:
    """With α ≠ 0 each loss type's formula takes h = r_α(chosen) − r_α(rejected), and the logged
    rewards are β·r_α."""
    alpha = 0.25
    config = CPOLossConfig(loss_type=loss_type, beta=0.5, simpo_gamma=0.3, cpo_alpha=0.0, alpha=alpha)
    out = cpo_loss(t64(CHOSEN), t64(REJECTED), config)
    chosen = [alphapo(c, alpha) for c in CHOSEN]
    rejected = [alphapo(r, alpha) for r in REJECTED]
    expected = [expected_preference(c - r, config) for c, r in zip(chosen, rejected, strict=True)]
    torch.testing.assert_close(out.losses, t64(expected), atol=TOL, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, t64([0.5 * c for c in chosen]), atol=TOL, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, t64([0.5 * r for r in rejected]), atol=TOL, rtol=0)
    plain = cpo_loss(
        t64(CHOSEN),
        t64(REJECTED),
        CPOLossConfig(loss_type=loss_type, beta=0.5, simpo_gamma=0.3, cpo_alpha=0.0),
    )
    assert (out.losses - plain.losses).abs().max().item() > 1e-2
