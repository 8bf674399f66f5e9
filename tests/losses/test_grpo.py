"""Closed-form checks of the GRPO family (float64): group, RLOO, GDPO and REINFORCE++ advantages,
the loss normalisations, GSPO's sequence ratio, two-sided clipping, CISPO, SAPO, top-entropy
masking and the entropy bonus."""

from __future__ import annotations

import math
import statistics
from typing import get_args

import pytest
import torch

from lit_pref.losses.grpo import (
    LOSS_SPECS,
    LOSS_TYPES,
    GRPOLossConfig,
    LossType,
    batch_normalize,
    decoupled_advantages,
    group_advantages,
    grpo_policy_loss,
    importance_ratio,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    top_entropy_mask,
)

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


# --- the GRPO family: registry ------------------------------------------------------------------


def test_loss_registry_matches_the_literal():
    """Every loss type the config accepts has a registry entry, and the reverse."""
    assert get_args(LossType) == LOSS_TYPES
    assert set(LOSS_SPECS) == set(LOSS_TYPES)


# --- GSPO: sequence-level importance ratio -----------------------------------------------------

# Sequence ratios s_i = (Π_t ρ_t)^(1/|o_i|) of the rows of RATIOS.
SEQ_RATIOS = [0.75 ** (1 / 3), 0.5, math.sqrt(1.1)]


def test_importance_ratio_token_and_sequence():
    """token: ρ_{i,t} = π/π_old, 1 at padding; sequence (GSPO): exp(mean_t log ρ) = geometric mean."""
    logps, old, _, mask = _batch()
    token = importance_ratio(logps, old, mask, "token")
    expected = torch.ones(3, 4, dtype=torch.float64)
    for i, row in enumerate(RATIOS):
        expected[i, : len(row)] = t(row)
    torch.testing.assert_close(token, expected, **TOL)
    sequence = importance_ratio(logps, old, mask, "sequence")
    assert sequence.shape == (3, 1)
    torch.testing.assert_close(sequence[:, 0], t(SEQ_RATIOS), **TOL)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance_ratio(logps, old, mask, "prompt")  # type: ignore[arg-type]


def test_gspo_loss_value_gradient_and_clip_fractions():
    """GSPO with the grpo normalisation, β = 0, ε = (0.2, 0.28):
    row 0: s = 0.9086, A = 1, unclipped → −0.9086
    row 1: s = 0.5, A = −2, clipped at 0.8 → 1.6 (no gradient)
    row 2: s = 1.0488, A = ½, unclipped → −0.5244
    L = mean of the three. ∂L/∂log π_{i,t} = −A_i s_i / (|o_i| · B) on unclipped rows (∂s/∂log π_t = s/|o|).
    Clip fractions count sequences: 1 of 3 low, none high.
    """
    logps, old, ref, mask = _batch()
    logps.requires_grad_()
    out = grpo_policy_loss(
        logps, old, ref, t(ADVANTAGES), mask, loss_type="grpo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
        importance_sampling_level="sequence",
    )  # fmt: skip
    per_seq = [-SEQ_RATIOS[0] * 1.0, 2.0 * 0.8, -SEQ_RATIOS[2] * 0.5]
    assert out.loss.item() == pytest.approx(sum(per_seq) / 3, abs=1e-6)
    (grad,) = torch.autograd.grad(out.loss, logps)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    expected[0, :3] = -1.0 * SEQ_RATIOS[0] / (3 * 3)
    expected[2, :2] = -0.5 * SEQ_RATIOS[2] / (2 * 3)
    torch.testing.assert_close(grad, expected, **TOL)
    assert out.clip_frac_low.item() == pytest.approx(1 / 3) and out.clip_frac_high.item() == 0.0
    # Every token of a sequence carries its sequence's term.
    torch.testing.assert_close(out.per_token_loss[0, :3].detach(), t([per_seq[0]] * 3), **TOL)


# --- two-sided clipping (δ) --------------------------------------------------------------------


def _one_token(ratio: float, advantage: float, **kwargs):
    logps = t([[-1.0]]).requires_grad_()
    old = t([[-1.0 - math.log(ratio)]])
    out = grpo_policy_loss(logps, old, None, t([advantage]), torch.ones(1, 1, dtype=torch.bool), **kwargs)
    (grad,) = torch.autograd.grad(out.loss, logps)
    return out.loss.item(), grad.item()


def test_two_sided_clipping_caps_negative_advantage_ratios():
    """A = −2, ρ = 3, ε = 0.2. Without δ: −min(3·(−2), 1.2·(−2)) = 6, gradient −Aρ = 6.
    δ = 2: −min(2·(−2), 1.2·(−2)) = 4, constant in ρ, so no gradient. Below δ (ρ = 1.5) and for
    A > 0 (ρ = 3, clipped at 1.2 either way) δ changes nothing."""
    assert _one_token(3.0, -2.0) == pytest.approx((6.0, 6.0), abs=1e-6)
    assert _one_token(3.0, -2.0, delta=2.0) == pytest.approx((4.0, 0.0), abs=1e-6)
    assert _one_token(1.5, -2.0, delta=2.0) == pytest.approx((3.0, 3.0), abs=1e-6)
    assert _one_token(3.0, 1.0, delta=2.0) == pytest.approx((-1.2, 0.0), abs=1e-6)
    with pytest.raises(ValueError, match="clipped loss types"):
        _one_token(3.0, -2.0, delta=2.0, loss_type="sapo")


# --- CISPO -------------------------------------------------------------------------------------


def test_cispo_loss_and_gradient():
    """ℓ = −min(ρ, ε_max)·A·log π with the weight detached, summed over tokens / token count
    (dapo's normalisation). ε_max = 1.2: ρ = 1.5 is capped; every token keeps a gradient
    −min(ρ, 1.2)·A (also the ones PPO clipping would drop). Clipped high: ρ > 1.2 with A > 0.
    """
    logps, old, _, mask = _batch()
    logps.requires_grad_()
    out = grpo_policy_loss(logps, old, None, t(ADVANTAGES), mask, loss_type="cispo", epsilon_high=1.2)
    weights = [[min(r, 1.2) for r in row] for row in RATIOS]
    values = [[-1.0 - 0.25 * j for j in range(len(row))] for row in RATIOS]
    token_loss = [
        [-w * a * v for w, v in zip(ws, vs, strict=True)]
        for ws, vs, a in zip(weights, values, ADVANTAGES, strict=True)
    ]
    assert out.loss.item() == pytest.approx(sum(map(sum, token_loss)) / 6, abs=1e-6)
    (grad,) = torch.autograd.grad(out.loss, logps)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for i, (ws, a) in enumerate(zip(weights, ADVANTAGES, strict=True)):
        expected[i, : len(ws)] = t([-w * a / 6 for w in ws])
    torch.testing.assert_close(grad, expected, **TOL)
    assert out.clip_frac_high.item() == pytest.approx(1 / 6) and out.clip_frac_low.item() == 0.0
    # With the global token count the sum is divided by it instead.
    big = grpo_policy_loss(logps, old, None, t(ADVANTAGES), mask, loss_type="cispo", epsilon_high=1.2,
                           num_items_in_batch=12)  # fmt: skip
    assert big.loss.item() == pytest.approx(sum(map(sum, token_loss)) / 12, abs=1e-6)


# --- SAPO --------------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sapo_soft_gate_value_and_gradient():
    """ℓ = −(4/τ)σ(τ(ρ − 1))·A, τ = 1 (A > 0) or 1.05 (A ≤ 0), grpo normalisation.
    ∂ℓ/∂log π = −A·4σ′(τ(ρ − 1))·ρ, which is −A at ρ = 1 (the plain policy gradient).
    """
    logps, old, _, mask = _batch()
    logps.requires_grad_()
    out = grpo_policy_loss(logps, old, None, t(ADVANTAGES), mask, loss_type="sapo")
    taus = [1.0 if a > 0 else 1.05 for a in ADVANTAGES]
    token_loss = [
        [-(4 / tau) * sigmoid(tau * (r - 1)) * a for r in row]
        for row, a, tau in zip(RATIOS, ADVANTAGES, taus, strict=True)
    ]
    assert out.loss.item() == pytest.approx(sum(sum(r) / len(r) for r in token_loss) / 3, abs=1e-6)
    (grad,) = torch.autograd.grad(out.loss, logps)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for i, (row, a, tau) in enumerate(zip(RATIOS, ADVANTAGES, taus, strict=True)):
        for j, r in enumerate(row):
            s = sigmoid(tau * (r - 1))
            expected[i, j] = -a * 4 * s * (1 - s) * r / (len(row) * 3)
    torch.testing.assert_close(grad, expected, **TOL)
    assert expected[0, 0].item() == pytest.approx(-1.0 / 9)  # ρ = 1: −A/(|o|·B)
    assert out.clip_frac_region.item() == 0.0


# --- top-entropy tokens and the entropy bonus --------------------------------------------------

ENTROPY = [[0.1, 0.5, 0.9], [2.0], [0.3, 1.5]]


def _entropy() -> torch.Tensor:
    values = torch.full((3, 4), math.nan, dtype=torch.float64)
    for i, row in enumerate(ENTROPY):
        values[i, : len(row)] = t(row)
    return values


def test_top_entropy_mask_quantiles():
    """Six entropies sorted 0.1, 0.3, 0.5, 0.9, 1.5, 2.0. ρ = 0.5: the median (0.5 + 0.9)/2 = 0.7
    keeps 0.9, 2.0, 1.5. ρ = 0: the max keeps 2.0 only. ρ = 1: the min keeps all. A pooled set
    (other ranks' tokens) moves the threshold: quantile_0.5 of [0.1, 2.5, 3.0] = 2.5 keeps none."""
    _, _, _, mask = _batch()
    entropy = _entropy()
    kept = top_entropy_mask(entropy, mask, 0.5)
    assert kept.tolist() == [
        [False, False, True, False],
        [True, False, False, False],
        [False, True, False, False],
    ]
    assert (
        top_entropy_mask(entropy, mask, 0.0).sum().item() == 1 and top_entropy_mask(entropy, mask, 0.0)[1, 0]
    )
    assert torch.equal(top_entropy_mask(entropy, mask, 1.0), mask)
    assert not top_entropy_mask(entropy, mask, 0.5, pooled=t([0.1, 2.5, 3.0])).any()
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        top_entropy_mask(entropy, mask, 1.5)


def test_entropy_mask_drops_the_surrogate_not_the_kl_or_the_normaliser():
    """bnpo with the mask of ρ = 0.5 (tokens (0,2), (1,0), (2,1)): Σ over kept tokens of the
    surrogate plus Σ over all tokens of β·k3, divided by all 6 tokens."""
    _, _, _, mask = _batch()
    kept = top_entropy_mask(_entropy(), mask, 0.5)
    out, _ = _loss("bnpo", entropy_mask=kept)
    surrogate = SURROGATE[0][2] + SURROGATE[1][0] + SURROGATE[2][1]
    kl = sum(k3(d) for row in REF_DELTAS for d in row)
    assert out.loss.item() == pytest.approx((surrogate + BETA * kl) / 6, abs=1e-6)


def test_entropy_bonus_value_gradient_and_global_weight():
    """L = L_policy − c·H̄, H̄ the mean entropy of the surrogate's tokens: ∂L/∂H_t = −c/n.
    All 6 tokens: H̄ = 5.3/6. Top-entropy tokens (0.9, 2.0, 1.5): H̄ = 4.4/3. Under dapo with
    num_items_in_batch = 10 the bonus weighs by this micro-batch's 6/10 of the global tokens."""
    c = 0.1
    entropy = _entropy().requires_grad_()
    out, _ = _loss("bnpo", entropy=entropy, entropy_coef=c)
    base, _ = _loss("bnpo")
    assert out.policy_loss.item() == pytest.approx(base.loss.item(), abs=1e-12)
    assert out.loss.item() == pytest.approx(base.loss.item() - c * 5.3 / 6, abs=1e-6)
    (grad,) = torch.autograd.grad(out.loss, entropy)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for i, row in enumerate(ENTROPY):
        expected[i, : len(row)] = -c / 6
    torch.testing.assert_close(grad, expected, **TOL)

    _, _, _, mask = _batch()
    kept = top_entropy_mask(_entropy(), mask, 0.5)
    masked, _ = _loss("bnpo", entropy=_entropy(), entropy_mask=kept, entropy_coef=c)
    assert masked.loss.item() - masked.policy_loss.item() == pytest.approx(-c * 4.4 / 3, abs=1e-6)
    dapo, _ = _loss("dapo", entropy=_entropy(), entropy_coef=c, num_items_in_batch=10)
    assert dapo.loss.item() - dapo.policy_loss.item() == pytest.approx(-c * (5.3 / 6) * 6 / 10, abs=1e-6)
    with pytest.raises(ValueError, match="entropy"):
        _loss("bnpo", entropy_coef=c)


# --- advantages: RLOO normalisation, GDPO, REINFORCE++ -----------------------------------------


def test_batch_normalize():
    """(x − mean) / (unbiased std + 1e-4): REWARDS has mean 3 and std √8; one value gives 0."""
    expected = [(r - 3.0) / (math.sqrt(8.0) + EPS) for r in REWARDS]
    torch.testing.assert_close(batch_normalize(t(REWARDS)), t(expected), **TOL)
    assert batch_normalize(t([5.0])).item() == 0.0


def test_decoupled_advantages_normalise_each_reward_then_the_sum():
    """P = 2, G = 3, two rewards weighted (1, 0.5).
    Column 0 = REWARDS: group-normalised (−1, 0, 1)/(1 + eps), (−4, 0, 4)/(4 + eps).
    Column 1 = (10, 10, 10 | 2, NaN, 4): group 0 has zero spread → 0; group 1 over its two scored
    values: mean 3, std √2 → (−1, 0, 1)/(√2 + eps), the NaN contributing 0.
    Sum, then batch-normalise (mean, unbiased std over the six, + eps).
    A completion no reward scored gets 0 and stays out of the batch statistics.
    """
    columns = t([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [0.0, 2.0], [4.0, math.nan], [8.0, 4.0]])
    weights = t([1.0, 0.5])
    a, b = 1 / (1 + EPS), 4 / (4 + EPS)
    c = 1 / (math.sqrt(2.0) + EPS)
    summed = [-a, 0.0, a, -b - 0.5 * c, 0.0, b + 0.5 * c]
    mean, std = statistics.mean(summed), statistics.stdev(summed)
    out = decoupled_advantages(columns, weights, 3)
    torch.testing.assert_close(out.advantages, t([(s - mean) / (std + EPS) for s in summed]), **TOL)
    assert out.zero_std_groups == 0

    # Completion 4 unscored by both: group 1's column 0 is then (0, 8) → ±4/(√32 + eps).
    unscored = columns.clone()
    unscored[4] = math.nan
    d = 4 / (math.sqrt(32.0) + EPS)
    rest = [-a, 0.0, a, -d - 0.5 * c, d + 0.5 * c]
    mean, std = statistics.mean(rest), statistics.stdev(rest)
    got = decoupled_advantages(unscored, weights, 3).advantages
    assert got[4].item() == 0.0
    torch.testing.assert_close(got[[0, 1, 2, 3, 5]], t([(v - mean) / (std + EPS) for v in rest]), **TOL)
    with pytest.raises(ValueError, match="one weight per column"):
        decoupled_advantages(columns, t([1.0]), 3)


def test_decoupled_differs_from_sum_then_normalise():
    """Two rewards on different scales, one group: col 0 = (0, 1, 10), col 1 = (1, 0.5, 0).
    Sum first: (1, 1.5, 10), completion 2 is best. Normalised first: col 0 → (−0.666, −0.484,
    1.150), col 1 → (1, 0, −1), sum (0.334, −0.484, 0.150): completion 0 is best."""
    columns = t([[0.0, 1.0], [1.0, 0.5], [10.0, 0.0]])
    summed = group_advantages(columns.sum(-1), 3, "group").advantages
    decoupled = decoupled_advantages(columns, t([1.0, 1.0]), 3).advantages
    assert summed.argmax().item() == 2 and decoupled.argmax().item() == 0


def test_reinforce_plus_plus_advantages_by_hand():
    """Two prompts × two completions, lengths (2, 1, 3, 1), scores (1, 0, 2, 4), β = 0.5.
    k1 per token d = ((0.2, 0.4), (0.6), (0.0, 0.2, -0.2), (0.1)).
    Token rewards −β·d plus the score on the last token; returns G_t = Σ_{s≥t} r_s:
      row 0: (−0.1 −0.2 + 1, −0.2 + 1) = (0.7, 0.8);  row 1: (−0.3);
      row 2: (0 −0.1 +0.1 + 2, −0.1 + 0.1 + 2, 0.1 + 2) = (2, 2, 2.1);  row 3: (−0.05 + 4) = (3.95).
    Advantages: the 7 returns whitened (unbiased variance, rsqrt(var + 1e-8)).
    Baseline variant, no KL: scores minus the group mean (0.5, −0.5, −1, 1) on every token, whitened.
    """
    mask = torch.zeros(4, 3, dtype=torch.bool)
    for i, n in enumerate([2, 1, 3, 1]):
        mask[i, :n] = True
    kl = torch.zeros(4, 3, dtype=torch.float64)
    for i, row in enumerate([[0.2, 0.4], [0.6], [0.0, 0.2, -0.2], [0.1]]):
        kl[i, : len(row)] = t(row)
    scores = t([1.0, 0.0, 2.0, 4.0])

    def whitened(rows: list[list[float]]) -> torch.Tensor:
        flat = [v for row in rows for v in row]
        mean, var = statistics.mean(flat), statistics.variance(flat)
        out = torch.zeros(4, 3, dtype=torch.float64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = t([(v - mean) / math.sqrt(var + 1e-8) for v in row])
        return out

    got = reinforce_plus_plus_advantages(scores, mask, token_kl=kl, kl_coef=0.5)
    torch.testing.assert_close(got, whitened([[0.7, 0.8], [-0.3], [2.0, 2.0, 2.1], [3.95]]), **TOL)
    baseline = reinforce_plus_plus_advantages(scores, mask, num_generations=2)
    torch.testing.assert_close(baseline, whitened([[0.5, 0.5], [-0.5], [-1.0, -1.0, -1.0], [1.0]]), **TOL)


# --- config ------------------------------------------------------------------------------------


def test_grpo_family_config_validation():
    bad = [
        ({"importance_sampling_level": "prompt"}, "importance_sampling_level"),
        ({"delta": 1.1}, r"delta must be > 1 \+ epsilon_high"),
        ({"delta": 2.0, "loss_type": "cispo"}, "clipped loss types"),
        ({"loss_type": "cispo", "epsilon_high": 0.0}, "cispo"),
        ({"sapo_temperature_neg": 0.0}, "sapo temperatures"),
        ({"top_entropy_quantile": 1.2}, "top_entropy_quantile"),
        ({"entropy_coef": -0.1}, "entropy_coef"),
        ({"kl_in_reward": True, "beta": 0.0}, "kl_in_reward"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            GRPOLossConfig(**kwargs)  # type: ignore[arg-type]
    config = GRPOLossConfig(beta=0.05, kl_in_reward=True, delta=2.0, importance_sampling_level="sequence")
    kwargs = config.loss_kwargs()
    assert kwargs["beta"] == 0.0 and config.kl_loss_coef == 0.0  # the KL is in the reward, not the loss
    assert (kwargs["delta"], kwargs["importance_sampling_level"]) == (2.0, "sequence")
    assert GRPOLossConfig(loss_type="cispo", epsilon_high=5.0).aggregation == "global_token_mean"
