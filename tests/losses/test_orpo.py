"""Tests for ``lit_pref.losses.orpo``.

Expected values are computed by hand with ``math`` on Python floats and compared on float64
tensors with a 1e-6 tolerance. The hand formula for the log-odds is
``log odds = logp − log(1 − e^logp) = logp − log(−expm1(logp))``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lit_pref.losses.orpo import log_odds, orpo_loss

TOL = 1e-6


def hand_log_odds(logp: float) -> float:
    return logp - math.log(-math.expm1(logp))


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + eˣ), overflow-free."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def t64(values: list[float], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def test_orpo_closed_form() -> None:
    """Rows (chosen, rejected, nll) with λ = 0.25:

    log OR  = log odds(c) − log odds(r)
    or_loss = −log σ(log OR) = log(1 + e^−log OR)
    loss    = nll + λ·or_loss
    """
    beta = 0.25
    chosen, rejected, nll = [-0.5, -1.2, -0.05], [-1.2, -0.5, -2.0], [0.5, 1.2, 0.05]
    out = orpo_loss(t64(chosen), t64(rejected), t64(nll), beta)

    lor = [hand_log_odds(c) - hand_log_odds(r) for c, r in zip(chosen, rejected, strict=True)]
    or_loss = [softplus(-x) for x in lor]
    torch.testing.assert_close(out.log_odds_ratio, t64(lor), atol=TOL, rtol=0)
    torch.testing.assert_close(out.log_odds_chosen, t64([hand_log_odds(c) for c in chosen]), atol=TOL, rtol=0)
    torch.testing.assert_close(out.or_loss, t64(or_loss), atol=TOL, rtol=0)
    torch.testing.assert_close(out.nll, t64(nll), atol=TOL, rtol=0)
    torch.testing.assert_close(
        out.losses, t64([n + beta * o for n, o in zip(nll, or_loss, strict=True)]), atol=TOL, rtol=0
    )
    torch.testing.assert_close(out.chosen_rewards, t64([beta * c for c in chosen]), atol=TOL, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, t64([beta * r for r in rejected]), atol=TOL, rtol=0)


def test_orpo_hand_numbers() -> None:
    """logp = −ln 2 gives P = ½ and odds 1, so log odds = 0; against logp_r = −ln 4 (P = ¼, odds ⅓):
    log OR = 0 − log(1/3) = ln 3 and or_loss = log(1 + 1/3) = ln(4/3)."""
    out = orpo_loss(t64([-math.log(2.0)]), t64([-math.log(4.0)]), t64([0.0]), beta=1.0)
    assert out.log_odds_chosen.item() == pytest.approx(0.0, abs=TOL)
    assert out.log_odds_ratio.item() == pytest.approx(math.log(3.0), abs=TOL)
    assert out.or_loss.item() == pytest.approx(math.log(4.0 / 3.0), abs=TOL)


@pytest.mark.parametrize(
    "logp",
    # Both sides of the −ln 2 branch switch, the switch itself, deep negatives and near 0.
    [-60.0, -5.0, -1.0, -math.log(2.0), -0.69, -0.1, -1e-3, -1e-9],
)
def test_log_odds_matches_math(logp: float) -> None:
    value = log_odds(t64([logp])).item()
    assert value == pytest.approx(hand_log_odds(logp), rel=1e-12, abs=1e-15)


def test_equal_logps_give_ln2() -> None:
    """Equal log-probs: log OR = 0, or_loss = ln 2, loss = nll + λ·ln 2."""
    logps = t64([-0.3, -2.0])
    out = orpo_loss(logps, logps.clone(), t64([1.0, 2.0]), beta=0.1)
    torch.testing.assert_close(out.or_loss, t64([math.log(2.0)] * 2), atol=TOL, rtol=0)
    torch.testing.assert_close(
        out.losses, t64([1.0 + 0.1 * math.log(2.0), 2.0 + 0.1 * math.log(2.0)]), atol=TOL, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("near_zero", [-1e-9, -1e-30, -0.0, 0.0])
@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_logps_near_zero_are_finite(dtype: torch.dtype, near_zero: float, side: str) -> None:
    """A mean log-prob at (or a hair below) 0 means P ≈ 1 and infinite odds; the clamp keeps
    the loss and both gradients finite in every dtype."""
    other = -0.5
    c_val, r_val = (near_zero, other) if side == "chosen" else (other, near_zero)
    chosen = torch.tensor([c_val], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([r_val], dtype=dtype, requires_grad=True)
    nll = (-chosen).clone()
    out = orpo_loss(chosen, rejected, nll, beta=0.1)
    out.losses.sum().backward()
    for tensor in (out.losses, out.or_loss, out.log_odds_ratio, chosen.grad, rejected.grad):
        assert tensor is not None and torch.isfinite(tensor).all()
    assert out.losses.dtype == torch.promote_types(dtype, torch.float32)


def test_logp_minus_1e9_closed_form() -> None:
    """In float64 −1e-9 is far from the eps clamp, so the exact value survives:
    log odds(−1e-9) = −1e-9 − log(−expm1(−1e-9)) ≈ 20.723."""
    out = orpo_loss(t64([-1e-9]), t64([-1.0]), t64([1e-9]), beta=0.5)
    lor = hand_log_odds(-1e-9) - hand_log_odds(-1.0)
    assert hand_log_odds(-1e-9) == pytest.approx(20.7232658, abs=1e-6)
    assert out.log_odds_ratio.item() == pytest.approx(lor, abs=TOL)
    assert out.losses.item() == pytest.approx(1e-9 + 0.5 * softplus(-lor), abs=TOL)


def test_very_large_margin_loss_goes_to_zero() -> None:
    """Chosen near-certain, rejected very unlikely: log OR ≈ 20.7 + 50, or_loss ≈ e^−70.7 ≈ 0."""
    chosen = t64([-1e-9], requires_grad=True)
    rejected = t64([-50.0], requires_grad=True)
    out = orpo_loss(chosen, rejected, t64([0.0]), beta=1.0)
    out.losses.sum().backward()
    assert out.or_loss.item() == pytest.approx(0.0, abs=TOL)
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


@pytest.mark.parametrize("chosen_logp", [-3.0, -0.8, -0.2, -1e-4])
def test_gradient_signs(chosen_logp: float) -> None:
    """Raising the chosen log-prob lowers the loss; raising the rejected one raises it."""
    chosen = t64([chosen_logp], requires_grad=True)
    rejected = t64([-1.0], requires_grad=True)
    out = orpo_loss(chosen, rejected, -chosen, beta=0.3)
    out.losses.sum().backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert chosen.grad.item() < 0
    assert rejected.grad.item() > 0


def test_or_loss_gradient_matches_closed_form() -> None:
    """d log odds / d logp = 1 / (1 − P); d or_loss / d logp_c = −σ(−log OR) / (1 − P_c)."""
    c, r, beta = -0.4, -1.1, 1.0
    chosen = t64([c], requires_grad=True)
    out = orpo_loss(chosen, t64([r]), t64([0.0]), beta=beta)
    out.losses.sum().backward()
    lor = hand_log_odds(c) - hand_log_odds(r)
    expected = -beta * (1.0 / (1.0 + math.exp(lor))) / (-math.expm1(c))
    assert chosen.grad is not None
    assert chosen.grad.item() == pytest.approx(expected, abs=TOL)


def test_beta_zero_is_plain_sft() -> None:
    nll = t64([0.7, 1.9], requires_grad=True)
    out = orpo_loss(t64([-0.7, -1.9]), t64([-0.1, -0.2]), nll, beta=0.0)
    torch.testing.assert_close(out.losses, t64([0.7, 1.9]), atol=TOL, rtol=0)
    out.losses.sum().backward()
    torch.testing.assert_close(nll.grad, t64([1.0, 1.0]))


def test_diagnostics_are_detached() -> None:
    chosen = t64([-0.5], requires_grad=True)
    out = orpo_loss(chosen, t64([-1.0], requires_grad=True), -chosen, beta=0.1)
    assert out.losses.requires_grad
    for name in ("nll", "or_loss", "log_odds_ratio", "log_odds_chosen", "chosen_rewards", "rejected_rewards"):
        assert not getattr(out, name).requires_grad, name


@pytest.mark.parametrize("beta", [-0.1, float("nan"), float("inf")])
def test_beta_validation(beta: float) -> None:
    with pytest.raises(ValueError, match=r"beta \(ORPO's λ\) must be a finite number >= 0"):
        orpo_loss(t64([-1.0]), t64([-1.0]), t64([1.0]), beta)


def test_shape_validation() -> None:
    with pytest.raises(ValueError, match="must share one 1-D"):
        orpo_loss(t64([-1.0, -2.0]), t64([-1.0]), t64([1.0, 2.0]), 0.1)
