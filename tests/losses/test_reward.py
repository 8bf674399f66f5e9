"""Tests for ``lit_pref.losses.reward``: the Bradley–Terry reward loss, margin and centring.

Expected values are computed by hand with ``math`` on Python floats and compared on float64
tensors with a 1e-9 tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from lit_pref.losses.reward import reward_loss

TOL = 1e-9
CHOSEN = [1.0, -0.5, 2.0, 0.25]
REJECTED = [0.0, 0.5, -1.0, 0.25]


def t64(values: list[float], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + eˣ), written stably."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def test_equal_rewards_give_ln2_and_zero_margin():
    """r_c = r_r ⇒ σ(0) = ½ ⇒ loss = ln 2, margin 0, accuracy 0 (a tie is not a correct ranking)."""
    rewards = t64([0.3, -2.0, 5.0])
    out = reward_loss(rewards, rewards.clone())
    torch.testing.assert_close(
        out.losses, torch.full((3,), math.log(2), dtype=torch.float64), atol=TOL, rtol=0
    )
    assert out.margins.abs().max() == 0
    assert out.accuracies.sum() == 0


def test_bradley_terry_closed_form():
    """loss_i = −log σ(r_c − r_r) = log(1 + exp(−(r_c − r_r)))."""
    out = reward_loss(t64(CHOSEN), t64(REJECTED))
    expected = [softplus(-(c - r)) for c, r in zip(CHOSEN, REJECTED, strict=True)]
    torch.testing.assert_close(out.losses, t64(expected), atol=TOL, rtol=0)
    torch.testing.assert_close(out.margins, t64([c - r for c, r in zip(CHOSEN, REJECTED, strict=True)]))
    assert out.accuracies.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_margin_closed_form():
    """Llama 2, Eq. 2: −log σ(r_c − r_r − m); the margin shifts the logit, not the reported gap."""
    margin = [0.5, 0.0, 4.0, 1.0]
    out = reward_loss(t64(CHOSEN), t64(REJECTED), margin=t64(margin))
    expected = [softplus(-(c - r - m)) for c, r, m in zip(CHOSEN, REJECTED, margin, strict=True)]
    torch.testing.assert_close(out.losses, t64(expected), atol=TOL, rtol=0)
    torch.testing.assert_close(out.margins, t64([c - r for c, r in zip(CHOSEN, REJECTED, strict=True)]))
    # The third pair (gap 3 < margin 4) now counts as a loss above ln 2.
    assert out.losses[2] > math.log(2)


def test_centering_closed_form():
    """Eisenstein et al. 2023: + c·(r_c + r_r)², whose batch mean is c·mean((r_c + r_r)²)."""
    c = 0.01
    out = reward_loss(t64(CHOSEN), t64(REJECTED), center_rewards_coefficient=c)
    expected = [softplus(-(a - b)) + c * (a + b) ** 2 for a, b in zip(CHOSEN, REJECTED, strict=True)]
    torch.testing.assert_close(out.losses, t64(expected), atol=TOL, rtol=0)
    plain = reward_loss(t64(CHOSEN), t64(REJECTED)).losses.mean()
    mean_sq = sum((a + b) ** 2 for a, b in zip(CHOSEN, REJECTED, strict=True)) / len(CHOSEN)
    assert abs(float(out.losses.mean() - plain) - c * mean_sq) < TOL


def test_gradient_signs():
    """Raising the chosen reward lowers the loss, raising the rejected one raises it, by the same
    amount σ(−gap); the centring term pulls both towards a zero sum."""
    chosen, rejected = t64(CHOSEN, True), t64(REJECTED, True)
    reward_loss(chosen, rejected).losses.sum().backward()
    gap = [a - b for a, b in zip(CHOSEN, REJECTED, strict=True)]
    expected = t64([1 / (1 + math.exp(g)) for g in gap])
    torch.testing.assert_close(chosen.grad, -expected, atol=TOL, rtol=0)
    torch.testing.assert_close(rejected.grad, expected, atol=TOL, rtol=0)

    both = t64([3.0], True), t64([3.0], True)
    reward_loss(*both, center_rewards_coefficient=0.5).losses.sum().backward()
    # d/dr_c [ln 2 + 0.5·(r_c + r_r)²] at equal rewards = −½ + (r_c + r_r) = 5.5 > 0: pushes down.
    assert both[0].grad.item() == pytest.approx(-0.5 + 6.0)
    assert both[1].grad.item() == pytest.approx(0.5 + 6.0)


def test_large_gaps_are_finite():
    out = reward_loss(t64([1e4, -1e4]), t64([-1e4, 1e4]))
    assert torch.isfinite(out.losses).all()
    assert out.losses[0] == 0 and out.losses[1] == pytest.approx(2e4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chosen_rewards": t64([1.0, 2.0]), "rejected_rewards": t64([1.0])}, "1-D"),
        ({"chosen_rewards": t64([[1.0]]), "rejected_rewards": t64([[1.0]])}, "1-D"),
        ({"chosen_rewards": t64([1.0]), "rejected_rewards": t64([1.0]), "margin": t64([1.0, 2.0])}, "margin"),
        (
            {
                "chosen_rewards": t64([1.0]),
                "rejected_rewards": t64([1.0]),
                "center_rewards_coefficient": -1.0,
            },
            "center",
        ),
    ],
)
def test_invalid_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reward_loss(**kwargs)
