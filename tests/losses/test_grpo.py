"""Closed-form checks of group advantages, RLOO and the GRPO loss normalisations (float64)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lit_pref.losses.grpo import GRPOLossConfig, group_advantages, grpo_policy_loss, rloo_advantages

TOL = {"atol": 1e-6, "rtol": 0.0}
EPS = 1e-4


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- group advantages --------------------------------------------------------------------------

# P = 2 prompts × G = 3 generations, generations of a prompt adjacent.
REWARDS = [1.0, 2.0, 3.0, 0.0, 4.0, 8.0]


def test_group_advantages_group_scaling():
    """Group 0: mean 2, unbiased std √((1+0+1)/2) = 1. Group 1: mean 4, std √((16+0+16)/2) = 4.
    A = (r − mean_group) / (std_group + 1e-4).
    """
    out = group_advantages(t(REWARDS), 3, "group")
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), -4 / (4 + EPS), 0.0, 4 / (4 + EPS)]
    torch.testing.assert_close(out.advantages, t(expected), **TOL)
    torch.testing.assert_close(out.group_std, t([1.0, 4.0]), **TOL)
    assert out.zero_std_groups == 0


def test_group_advantages_batch_scaling():
    """Centred per group as above, divided by the unbiased std of all six rewards:
    mean 3, squared deviations 4+1+0+9+1+25 = 40, Var = 40/5 = 8, σ = √8.
    """
    sigma = math.sqrt(8.0)
    assert sigma == pytest.approx(statistics.stdev(REWARDS))
    out = group_advantages(t(REWARDS), 3, "batch")
    expected = [c / (sigma + EPS) for c in [-1.0, 0.0, 1.0, -4.0, 0.0, 4.0]]
    torch.testing.assert_close(out.advantages, t(expected), **TOL)


def test_group_advantages_no_scaling_and_adjacent_layout():
    """Unscaled (Dr. GRPO): A = r − mean_group. Grouping rows (0,1,2),(3,4,5), not (0,2,4),(1,3,5)."""
    out = group_advantages(t(REWARDS), 3, "none")
    torch.testing.assert_close(out.advantages, t([-1.0, 0.0, 1.0, -4.0, 0.0, 4.0]), **TOL)


def test_group_advantages_counts_zero_std_groups():
    """Group 1 has three equal rewards (0.1 is not exact in binary; the advantage is still exactly 0)."""
    out = group_advantages(t([1.0, 2.0, 3.0, 0.1, 0.1, 0.1]), 3, "group")
    assert out.zero_std_groups == 1
    assert torch.equal(out.advantages[3:], torch.zeros(3, dtype=torch.float64))
    out = group_advantages(t([5.0, 5.0, 0.0, 0.0]), 2, "batch")
    assert out.zero_std_groups == 2
    assert torch.equal(out.advantages, torch.zeros(4, dtype=torch.float64))


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="group"):
        group_advantages(t(REWARDS), 3, "prompt")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        group_advantages(t(REWARDS), 4, "group")
    with pytest.raises(ValueError):
        group_advantages(t(REWARDS), 1, "group")


@pytest.mark.parametrize(("alias", "name"), [(True, "group"), (False, "none")])
def test_scale_rewards_accepts_trls_bools(alias, name):
    """TRL's GRPOConfig takes scale_rewards=True / False for group / no scaling."""
    torch.testing.assert_close(
        group_advantages(t(REWARDS), 3, alias).advantages, group_advantages(t(REWARDS), 3, name).advantages
    )
    assert GRPOLossConfig(scale_rewards=alias).scale_rewards == name  # type: ignore[arg-type]


# --- RLOO --------------------------------------------------------------------------------------


def test_rloo_advantages_by_hand():
    """A_i = r_i − mean_{j≠i} r_j.
    Group 0 (1, 2, 3): 1 − 2.5 = −1.5, 2 − 2 = 0, 3 − 1.5 = 1.5.
    Group 1 (0, 4, 8): 0 − 6 = −6, 4 − 4 = 0, 8 − 2 = 6.
    Same as G/(G−1)·(r − mean) = 1.5·(r − mean).
    """
    torch.testing.assert_close(rloo_advantages(t(REWARDS), 3), t([-1.5, 0.0, 1.5, -6.0, 0.0, 6.0]), **TOL)
    # G = 2: each sample's baseline is the other one.
    torch.testing.assert_close(rloo_advantages(t([1.0, 4.0]), 2), t([-3.0, 3.0]), **TOL)


def test_rloo_needs_two_generations():
    with pytest.raises(ValueError):
        rloo_advantages(t([1.0, 2.0]), 1)


# --- GRPO loss ---------------------------------------------------------------------------------

BETA, EPS_LOW, EPS_HIGH = 0.1, 0.2, 0.28
# Three completions of lengths 3, 1, 2 (right-padded to T = 4 with garbage).
ADVANTAGES = [1.0, -2.0, 0.5]
RATIOS = [[1.0, 1.5, 0.5], [0.5], [1.1, 1.0]]
# d = log π_ref − log π per token.
REF_DELTAS = [[0.0, 0.5, -0.5], [1.0], [0.0, -1.0]]
# −min(ρA, clip(ρ, 0.8, 1.28)·A):
#   row 0 (A = 1):  ρ = 1 → −1;  ρ = 1.5 → clipped −1.28;  ρ = 0.5 → unclipped −0.5
#   row 1 (A = −2): ρ = 0.5 → clipped 2·0.8 = 1.6
#   row 2 (A = ½):  ρ = 1.1 → −0.55;  ρ = 1 → −0.5
SURROGATE = [[-1.0, -1.28, -0.5], [1.6], [-0.55, -0.5]]


def k3(d: float) -> float:
    """exp(ref − logp) − (ref − logp) − 1."""
    return math.exp(d) - d - 1.0


TOKEN_LOSS = [
    [s + BETA * k3(d) for s, d in zip(ss, dd, strict=True)]
    for ss, dd in zip(SURROGATE, REF_DELTAS, strict=True)
]
TOTAL = sum(sum(row) for row in TOKEN_LOSS)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logps, old_logps, ref_logps and mask for the rows above (padded positions hold nan/inf)."""
    logps = torch.full((3, 4), math.nan, dtype=torch.float64)
    old = torch.full((3, 4), math.inf, dtype=torch.float64)
    ref = torch.full((3, 4), -math.inf, dtype=torch.float64)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for i, (ratios, deltas) in enumerate(zip(RATIOS, REF_DELTAS, strict=True)):
        for j, (ratio, delta) in enumerate(zip(ratios, deltas, strict=True)):
            logp = -1.0 - 0.25 * j
            logps[i, j], old[i, j], ref[i, j] = logp, logp - math.log(ratio), logp + delta
            mask[i, j] = True
    return logps, old, ref, mask


def _loss(loss_type: str, **kwargs):
    logps, old, ref, mask = _batch()
    logps.requires_grad_()
    out = grpo_policy_loss(
        logps,
        old,
        ref,
        t(ADVANTAGES),
        mask,
        loss_type=loss_type,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        beta=BETA,
        **kwargs,
    )
    return out, logps


def test_grpo_per_token_loss_and_diagnostics():
    out, _ = _loss("grpo")
    expected = [row + [0.0] * (4 - len(row)) for row in TOKEN_LOSS]
    torch.testing.assert_close(out.per_token_loss.detach(), t(expected), **TOL)
    kl_tokens = [k3(d) for row in REF_DELTAS for d in row]
    assert out.kl_mean.item() == pytest.approx(sum(kl_tokens) / 6, abs=1e-6)
    assert out.clip_frac_low.item() == pytest.approx(1 / 6)
    assert out.clip_frac_high.item() == pytest.approx(1 / 6)
    assert out.clip_frac_region.item() == pytest.approx(2 / 6)
    assert not out.kl_mean.requires_grad


def test_grpo_loss_normalisations_differ_as_derived():
    """grpo:    (1/3)·(Σrow0/3 + Σrow1/1 + Σrow2/2)   — mean per sequence, then over sequences
    bnpo:    Σ/6                                       — the 6 completion tokens of this batch
    dapo:    Σ/6 locally, Σ/10 with num_items_in_batch = 10 (global token count)
    dr_grpo: Σ/(B·L_max) = Σ/(3·4)
    """
    row_means = [sum(row) / len(row) for row in TOKEN_LOSS]
    expected = {
        "grpo": sum(row_means) / 3,
        "bnpo": TOTAL / 6,
        "dapo": TOTAL / 10,
        "dr_grpo": TOTAL / 12,
    }
    assert len({round(v, 6) for v in expected.values()}) == 4
    got = {
        "grpo": _loss("grpo")[0].loss.item(),
        "bnpo": _loss("bnpo", num_items_in_batch=10)[0].loss.item(),  # bnpo ignores the global count
        "dapo": _loss("dapo", num_items_in_batch=10)[0].loss.item(),
        "dr_grpo": _loss("dr_grpo", max_completion_length=4)[0].loss.item(),
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    assert _loss("dapo")[0].loss.item() == pytest.approx(TOTAL / 6, abs=1e-6)


def test_grpo_loss_gradient_dr_grpo():
    """∂ℓ/∂log π = (clipped ? 0 : −Aρ) + β(1 − e^d), divided by B·L_max = 12; padding gets 0."""
    out, logps = _loss("dr_grpo", max_completion_length=4)
    (grad,) = torch.autograd.grad(out.loss, logps)
    clipped = [[False, True, False], [True], [False, False]]
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for i, (a, ratios, deltas, clips) in enumerate(zip(ADVANTAGES, RATIOS, REF_DELTAS, clipped, strict=True)):
        for j, (ratio, d, c) in enumerate(zip(ratios, deltas, clips, strict=True)):
            expected[i, j] = ((0.0 if c else -a * ratio) + BETA * (1 - math.exp(d))) / 12
    torch.testing.assert_close(grad, expected, **TOL)


def test_grpo_beta_zero_ignores_ref_and_old_none_means_on_policy():
    """β = 0: no KL term, ref_logps may be None (or garbage). old_logps = None: ρ = 1 with the
    gradient of log π, so with "grpo" ∂L/∂log π_{i,t} = −A_i/(B·|o_i|).
    """
    logps, old, _, mask = _batch()
    kwargs = {"loss_type": "bnpo", "epsilon_low": 0.2, "epsilon_high": 0.2, "beta": 0.0}
    a = grpo_policy_loss(logps, old, None, t(ADVANTAGES), mask, **kwargs)
    b = grpo_policy_loss(logps, old, torch.full_like(logps, math.nan), t(ADVANTAGES), mask, **kwargs)
    assert a.loss.item() == b.loss.item()
    assert a.kl_mean.item() == 0.0
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_policy_loss(logps, old, None, t(ADVANTAGES), mask, **{**kwargs, "beta": 0.1})

    logps.requires_grad_()
    out = grpo_policy_loss(logps, None, None, t(ADVANTAGES), mask, loss_type="grpo", beta=0.0)
    assert out.loss.item() == pytest.approx(-sum(ADVANTAGES) / 3, abs=1e-6)
    (grad,) = torch.autograd.grad(out.loss, logps)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for i, (adv, n) in enumerate(zip(ADVANTAGES, [3, 1, 2], strict=True)):
        expected[i, :n] = -adv / (3 * n)
    torch.testing.assert_close(grad, expected, **TOL)


def test_grpo_loss_argument_validation():
    logps, old, ref, mask = _batch()
    with pytest.raises(ValueError, match="dapo"):
        grpo_policy_loss(logps, old, ref, t(ADVANTAGES), mask, loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_policy_loss(logps, old, ref, t(ADVANTAGES), mask, loss_type="dr_grpo")


# --- config ------------------------------------------------------------------------------------


def test_grpo_loss_config_validation():
    config = GRPOLossConfig(loss_type="dapo", epsilon_high=0.28, beta=0.0)
    assert config.loss_kwargs()["epsilon_high"] == 0.28
    with pytest.raises(AttributeError):
        config.beta = 1.0  # type: ignore[misc]
    bad = [
        ({"loss_type": "sft"}, "grpo"),
        ({"scale_rewards": "prompt"}, "group"),
        ({"num_generations": 1}, "num_generations"),
        ({"epsilon_low": -0.1}, "epsilon"),
        ({"epsilon_high": -0.1}, "epsilon"),
        ({"beta": -1.0}, "beta"),
        ({"loss_type": "dr_grpo"}, "max_completion_length"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            GRPOLossConfig(**kwargs)
    GRPOLossConfig(loss_type="dr_grpo", scale_rewards="none", beta=0.0, max_completion_length=512)
