"""Tests for the DPO-family losses in :mod:`lit_pref.losses.dpo`.

Expected values are derived by hand from the papers' formulas and evaluated with :mod:`math` on
Python floats, never by calling the code under test.

Shared fixture (float64, B = 2), used unless a test says otherwise::

    β      = 0.5
    π_c    = (-1.0, -2.5)    π_r   = (-1.5, -2.0)
    ref_c  = (-1.2, -2.0)    ref_r = (-1.1, -2.4)
    ⇒ logratio_c ℓ_c = (0.2, -0.5),  logratio_r ℓ_r = (-0.4, 0.4)
    ⇒ h = ℓ_c − ℓ_r = (0.6, -0.9),   z = βh = (0.3, -0.45)
    ⇒ rewards r_c = βℓ_c = (0.1, -0.25),  r_r = βℓ_r = (-0.2, 0.2)
"""

from __future__ import annotations

import math

import pytest
import torch

from lit_pref.losses.dpo import (
    DPO_LOSS_ALIASES,
    DPO_LOSS_TYPES,
    F_DIVERGENCES,
    REFERENCE_FREE_COMPATIBLE,
    DPOLossConfig,
    DPOLossOutput,
    dpo_loss,
    ld_sequence_logps,
    wpo_weights,
)

BETA = 0.5
PI_C = (-1.0, -2.5)
PI_R = (-1.5, -2.0)
REF_C = (-1.2, -2.0)
REF_R = (-1.1, -2.4)
LR_C = (0.2, -0.5)
LR_R = (-0.4, 0.4)
H = (0.6, -0.9)
Z = (0.3, -0.45)
R_C = (0.1, -0.25)
R_R = (-0.2, 0.2)
NLL = (0.7, 1.3)
ATOL = 1e-6


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _run(config: DPOLossConfig, **kwargs) -> DPOLossOutput:
    return dpo_loss(_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), config, chosen_nll=_t(NLL), **kwargs)


def _assert_close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, _t(expected), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- closed forms, per loss type


def test_fixture_is_consistent():
    """The derived quantities in the module docstring follow from the inputs (guards typos)."""
    for i in range(2):
        assert math.isclose(PI_C[i] - REF_C[i], LR_C[i], abs_tol=1e-12)
        assert math.isclose(PI_R[i] - REF_R[i], LR_R[i], abs_tol=1e-12)
        assert math.isclose(LR_C[i] - LR_R[i], H[i], abs_tol=1e-12)
        assert math.isclose(BETA * H[i], Z[i], abs_tol=1e-12)


def test_sigmoid_closed_form_and_rewards():
    """DPO (Rafailov et al. 2023, eq. 7): loss = −log σ(βh) = (−log σ(0.3), −log σ(−0.45)).

    Rewards are βℓ: chosen (0.1, −0.25), rejected (−0.2, 0.2), detached.
    """
    out = _run(DPOLossConfig(beta=BETA))
    _assert_close(out.losses, [-_logsig(0.3), -_logsig(-0.45)])
    _assert_close(out.chosen_rewards, R_C)
    _assert_close(out.rejected_rewards, R_R)
    assert out.losses.shape == (2,)


def test_sigmoid_label_smoothing_closed_form():
    """cDPO (Mitchell 2023) with ε = 0.1: −0.9·log σ(z) − 0.1·log σ(−z) for z = (0.3, −0.45)."""
    out = _run(DPOLossConfig(beta=BETA, label_smoothing=0.1))
    _assert_close(out.losses, [-0.9 * _logsig(z) - 0.1 * _logsig(-z) for z in Z])


def test_hinge_closed_form():
    """SLiC hinge: max(0, 1 − βh) = (1 − 0.3, 1 + 0.45) = (0.7, 1.45); a third example with
    βh = 1.5 > 1 is past the margin and gives 0."""
    config = DPOLossConfig(loss_type="hinge", beta=BETA)
    _assert_close(_run(config).losses, [0.7, 1.45])
    out = dpo_loss(_t([0.0]), _t([-3.0]), _t([0.0]), _t([0.0]), config)  # h = 3
    _assert_close(out.losses, [0.0])


def test_ipo_closed_form():
    """IPO (Azar et al. 2023, eq. 17): (h − 1/(2β))² with 1/(2β) = 1: ((0.6−1)², (−0.9−1)²) = (0.16, 3.61)."""
    _assert_close(_run(DPOLossConfig(loss_type="ipo", beta=BETA)).losses, [0.16, 3.61])


@pytest.mark.parametrize(("label_smoothing", "epsilon"), [(0.0, 1e-3), (0.2, 0.2)])
def test_exo_pair_closed_form(label_smoothing, epsilon):
    """EXO pairwise (Ji et al. 2024): KL(Bern(σ(z)) ‖ Bern(1−ε)) =
    σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε); ε defaults to 1e-3 when smoothing is 0."""
    out = _run(DPOLossConfig(loss_type="exo_pair", beta=BETA, label_smoothing=label_smoothing))
    expected = [
        _sig(z) * (_logsig(z) - math.log(1 - epsilon)) + _sig(-z) * (_logsig(-z) - math.log(epsilon))
        for z in Z
    ]
    _assert_close(out.losses, expected)
    assert (out.losses >= 0).all()  # a KL divergence


def test_nca_pair_closed_form():
    """NCA (Chen et al. 2024): −log σ(r_c) − ½ log σ(−r_c) − ½ log σ(−r_r) with r_c = (0.1, −0.25),
    r_r = (−0.2, 0.2)."""
    out = _run(DPOLossConfig(loss_type="nca_pair", beta=BETA))
    expected = [
        -_logsig(rc) - 0.5 * _logsig(-rc) - 0.5 * _logsig(-rr) for rc, rr in zip(R_C, R_R, strict=True)
    ]
    _assert_close(out.losses, expected)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_robust_closed_form(epsilon):
    """rDPO (Chowdhury et al. 2024): ((1−ε)(−log σ(z)) − ε(−log σ(−z))) / (1 − 2ε); ε = 0 is plain DPO."""
    out = _run(DPOLossConfig(loss_type="robust", beta=BETA, label_smoothing=epsilon))
    expected = [((1 - epsilon) * -_logsig(z) - epsilon * -_logsig(-z)) / (1 - 2 * epsilon) for z in Z]
    _assert_close(out.losses, expected)


def test_bco_pair_closed_form():
    """BCO (Jung et al. 2024): δ = mean(0.1, −0.25, −0.2, 0.2) = −0.0375;
    loss = −log σ(r_c − δ) − log σ(−(r_r − δ)) = (−log σ(0.1375) − log σ(0.1625),
    −log σ(−0.2125) − log σ(−0.2375))."""
    out = _run(DPOLossConfig(loss_type="bco_pair", beta=BETA))
    delta = (0.1 - 0.25 - 0.2 + 0.2) / 4
    assert math.isclose(delta, -0.0375)
    expected = [-_logsig(rc - delta) - _logsig(-(rr - delta)) for rc, rr in zip(R_C, R_R, strict=True)]
    _assert_close(out.losses, expected)


def test_sppo_hard_closed_form():
    """SPPO hard labels (Wu et al. 2024, η = 1/β), on the paper's scale: (ℓ_c − 1/(2β))² + (ℓ_r + 1/(2β))²
    with 1/(2β) = 1: ((0.2−1)² + (−0.4+1)², (−0.5−1)² + (0.4+1)²) = (0.64 + 0.36, 2.25 + 1.96) = (1.0, 4.21).
    (Re-derived when the scale changed from β²× this, whose values were (0.25, 1.0525) = β²·(1.0, 4.21).)"""
    _assert_close(_run(DPOLossConfig(loss_type="sppo_hard", beta=BETA)).losses, [1.0, 4.21])


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("name", ["aot_unpaired", "aot_pair"])
def test_aot_unpaired_closed_form(epsilon, name):
    """AOT unpaired (Melnyk et al. 2024; ``aot_pair`` is lit_pref's earlier name): sort(ℓ_c) = (−0.5, 0.2),
    sort(ℓ_r) = (−0.4, 0.4), Δ = (−0.1, −0.2), βΔ = (−0.05, −0.1); loss = −(1−ε) log σ(βΔ) − ε log σ(−βΔ).
    (Unsorted, βh would be (0.3, −0.45), so this checks that sorting happens.)"""
    config = DPOLossConfig(loss_type=name, beta=BETA, label_smoothing=epsilon)
    assert config.loss_type == ("aot_unpaired",)
    out = _run(config)
    _assert_close(out.losses, [-(1 - epsilon) * _logsig(x) - epsilon * _logsig(-x) for x in (-0.05, -0.1)])


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_aot_closed_form(epsilon):
    """AOT paired (Melnyk et al. 2024): policy margins π_c − π_r = (0.5, −0.5) → sorted (−0.5, 0.5);
    reference margins ref_c − ref_r = (−0.1, 0.4) → sorted (−0.1, 0.4); Δ = (−0.4, 0.1), βΔ = (−0.2, 0.05)."""
    out = _run(DPOLossConfig(loss_type="aot", beta=BETA, label_smoothing=epsilon))
    _assert_close(out.losses, [-(1 - epsilon) * _logsig(x) - epsilon * _logsig(-x) for x in (-0.2, 0.05)])


def test_apo_zero_closed_form():
    """APO-zero (D'Oosterlinck et al. 2024): (1 − σ(r_c)) + σ(r_r) = (1 − σ(0.1) + σ(−0.2), 1 − σ(−0.25) + σ(0.2))."""
    out = _run(DPOLossConfig(loss_type="apo_zero", beta=BETA))
    _assert_close(out.losses, [1 - _sig(rc) + _sig(rr) for rc, rr in zip(R_C, R_R, strict=True)])


def test_apo_down_closed_form():
    """APO-down (D'Oosterlinck et al. 2024): σ(r_c) + (1 − σ(r_c − r_r)), r_c − r_r = βh = (0.3, −0.45)."""
    out = _run(DPOLossConfig(loss_type="apo_down", beta=BETA))
    _assert_close(out.losses, [_sig(rc) + 1 - _sig(z) for rc, z in zip(R_C, Z, strict=True)])


def test_discopop_closed_form():
    """DiscoPOP / LRML (Lu et al. 2024), τ = 0.05: gate m = σ(z/τ) = (σ(6), σ(−9));
    loss = (1 − m)(−log σ(z)) + m·exp(−z)."""
    out = _run(DPOLossConfig(loss_type="discopop", beta=BETA, discopop_tau=0.05))
    expected = [(1 - _sig(z / 0.05)) * -_logsig(z) + _sig(z / 0.05) * math.exp(-z) for z in Z]
    assert math.isclose(Z[0] / 0.05, 6.0) and math.isclose(Z[1] / 0.05, -9.0)
    _assert_close(out.losses, expected)


def test_discopop_is_finite_for_extreme_margins():
    """For βh = −2000, exp(−βh) overflows but its gate σ(βh/τ) underflows; the product must not be NaN.
    There the loss is ≈ −log σ(−2000) = 2000."""
    config = DPOLossConfig(loss_type="discopop", beta=1.0)
    out = dpo_loss(_t([-2000.0, 0.0]), _t([0.0, -2000.0]), _t([0.0, 0.0]), _t([0.0, 0.0]), config)
    assert torch.isfinite(out.losses).all()
    _assert_close(out.losses, [2000.0, 0.0])


def test_sft_closed_form():
    """MPO's SFT term: the loss is chosen_nll itself, (0.7, 1.3)."""
    _assert_close(_run(DPOLossConfig(loss_type="sft", beta=BETA)).losses, NLL)


def test_every_loss_type_has_a_closed_form_test():
    covered = {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
        "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    }  # fmt: skip
    assert covered == set(DPO_LOSS_TYPES)
    assert DPO_LOSS_ALIASES == {"aot_pair": "aot_unpaired"}


# --------------------------------------------------------------------------- length normalisation

# Completion lengths for the fixture: |y_w| = (2, 4), |y_l| = (1, 5). Length-normalised margins
# h̄ = ℓ_c/|y_w| − ℓ_r/|y_l| = (0.2/2 + 0.4/1, −0.5/4 − 0.4/5) = (0.5, −0.205).
N_C = (2, 4)
N_R = (1, 5)
H_NORM = (0.5, -0.205)


def _run_lengths(config: DPOLossConfig) -> DPOLossOutput:
    return dpo_loss(
        _t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), config, chosen_nll=_t(NLL),
        chosen_lengths=torch.tensor(N_C), rejected_lengths=torch.tensor(N_R),
    )  # fmt: skip


def test_length_fixture_is_consistent():
    for i in range(2):
        assert math.isclose(LR_C[i] / N_C[i] - LR_R[i] / N_R[i], H_NORM[i], abs_tol=1e-12)


def test_ipo_divides_each_log_ratio_by_its_own_length():
    """IPO (Azar et al. 2023, eq. 17) on length-normalised log-ratios: (h̄ − 1)² = (0.25, 1.452025);
    the rewards stay β·(summed log-ratios)."""
    out = _run_lengths(DPOLossConfig(loss_type="ipo", beta=BETA))
    _assert_close(out.losses, [(h - 1.0) ** 2 for h in H_NORM])
    _assert_close(out.losses, [0.25, 1.452025])
    _assert_close(out.chosen_rewards, R_C)
    _assert_close(out.rejected_rewards, R_R)


def test_sigmoid_norm_closed_form():
    """sigmoid_norm: −log σ(β·h̄) = (−log σ(0.25), −log σ(−0.1025)); with ε = 0.1 cDPO-smoothed like sigmoid."""
    out = _run_lengths(DPOLossConfig(loss_type="sigmoid_norm", beta=BETA))
    _assert_close(out.losses, [-_logsig(BETA * h) for h in H_NORM])
    smoothed = _run_lengths(DPOLossConfig(loss_type="sigmoid_norm", beta=BETA, label_smoothing=0.1))
    _assert_close(smoothed.losses, [-0.9 * _logsig(BETA * h) - 0.1 * _logsig(-BETA * h) for h in H_NORM])


def test_a_list_gives_each_loss_its_own_log_probs():
    """[sigmoid, ipo] with weights (0.7, 0.3): sigmoid on summed log-ratios (βh = (0.3, −0.45)), IPO on
    length-normalised ones (h̄), as each paper defines them."""
    config = DPOLossConfig(loss_type=("sigmoid", "ipo"), loss_weights=(0.7, 0.3), beta=BETA)
    out = _run_lengths(config)
    expected = [0.7 * -_logsig(z) + 0.3 * (h - 1.0) ** 2 for z, h in zip(Z, H_NORM, strict=True)]
    _assert_close(out.losses, expected)


@pytest.mark.parametrize(
    ("length_normalize", "margins"), [(True, H_NORM), (False, H)], ids=["all-normalised", "all-summed"]
)
def test_length_normalize_overrides_every_loss(length_normalize, margins):
    """length_normalize=True: sigmoid on h̄ too; False: IPO on summed h."""
    config = DPOLossConfig(loss_type=("sigmoid", "ipo"), beta=BETA, length_normalize=length_normalize)
    out = _run_lengths(config)
    _assert_close(out.losses, [-_logsig(BETA * h) + (h - 1.0) ** 2 for h in margins])


def test_without_lengths_log_probs_are_taken_as_given():
    """No lengths: the caller's log-probs are used as they are (length 1), e.g. pre-averaged ones."""
    normalised = _run(DPOLossConfig(loss_type="sigmoid_norm", beta=BETA)).losses
    _assert_close(normalised, [-_logsig(z) for z in Z])


def test_ld_sums_are_divided_by_the_full_length():
    """IPO with LD-DPO: the caller passes LD-weighted sums and the full completion lengths; the loss
    divides the LD log-ratios by those lengths (so ld_alpha = 1 is plain IPO)."""
    logps = _t([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.5]])  # row 0: chosen, row 1: rejected
    ref = _t([[-1.5, -2.5, -2.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    public = torch.tensor([2, 2])
    ld = ld_sequence_logps(logps, mask, public, 0.5)  # (−1 − 2 − 1.5, −0.5 − 1) = (−4.5, −1.5)
    ld_ref = ld_sequence_logps(ref, mask, public, 0.5)  # (−1.5 − 2.5 − 1, −1) = (−5, −1)
    _assert_close(ld, [-4.5, -1.5])
    _assert_close(ld_ref, [-5.0, -1.0])
    out = dpo_loss(
        ld[:1], ld[1:], ld_ref[:1], ld_ref[1:], DPOLossConfig(loss_type="ipo", beta=BETA),
        chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([2]),
    )  # fmt: skip
    # h̄ = (−4.5 + 5)/3 − (−1.5 + 1)/2 = 1/6 + 1/4 = 5/12
    _assert_close(out.losses, [(5.0 / 12.0 - 1.0) ** 2])


@pytest.mark.parametrize(
    ("kind", "psi"),
    [
        ("forward_kl", lambda x: 1.0 - math.exp(-x)),
        ("js_divergence", lambda x: math.log(2.0) + _logsig(x)),
        ("alpha_divergence", lambda x: (1.0 - math.exp(-0.5 * x)) / 0.5),
    ],
)
def test_length_normalised_f_divergence_divides_the_score(kind, psi):
    """IPO under an f-divergence: h̄ = ψ(ℓ_c)/|y_w| − ψ(ℓ_r)/|y_l| with ψ(ℓ) = f'(e^ℓ) − f'(1) on the
    *summed* log-ratio (Wang et al. 2023's ratio is of sequence probabilities), the choice documented
    in :func:`lit_pref.losses.dpo._terms`. The constant f'(1) matters here because the lengths differ."""
    config = DPOLossConfig(loss_type="ipo", beta=BETA, f_divergence_type=kind)
    margins = [psi(LR_C[i]) / N_C[i] - psi(LR_R[i]) / N_R[i] for i in range(2)]
    _assert_close(_run_lengths(config).losses, [(m - 1.0) ** 2 for m in margins])


def test_alpha_divergence_default_is_the_symmetric_point():
    """The default α = 0.5 is where Wang et al. 2023's α and TRL's 1 − α coincide."""
    assert DPOLossConfig().f_alpha_divergence_coef == 0.5


# --------------------------------------------------------------------------- f-divergences


def test_f_divergence_names():
    assert F_DIVERGENCES == ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@pytest.mark.parametrize(
    ("kind", "alpha", "margins"),
    [
        # reverse KL, f'(u) = log u + 1: h = ℓ_c − ℓ_r
        ("reverse_kl", 1.0, [0.6, -0.9]),
        # forward KL, f'(u) = −1/u = −e^{−ℓ}: h = e^{−ℓ_r} − e^{−ℓ_c}
        ("forward_kl", 1.0, [math.exp(0.4) - math.exp(-0.2), math.exp(-0.4) - math.exp(0.5)]),
        # JS, f'(u) = log(2u/(1+u)) = log 2 + log σ(ℓ): h = log σ(ℓ_c) − log σ(ℓ_r)
        ("js_divergence", 1.0, [_logsig(0.2) - _logsig(-0.4), _logsig(-0.5) - _logsig(0.4)]),
        # α-divergence (α = 0.5), f'(u) = (1 − u^{−α})/α: h = (e^{−αℓ_r} − e^{−αℓ_c})/α
        (
            "alpha_divergence",
            0.5,
            [(math.exp(0.2) - math.exp(-0.1)) / 0.5, (math.exp(-0.2) - math.exp(0.25)) / 0.5],
        ),
    ],
)
def test_f_divergence_sigmoid_closed_form(kind, alpha, margins):
    """f-DPO (Wang et al. 2023): loss = −log σ(β·(f'(u_c) − f'(u_r))), u = π/π_ref, with the margins
    in the parametrisation computed from ℓ_c = (0.2, −0.5), ℓ_r = (−0.4, 0.4). Rewards stay βℓ."""
    out = _run(DPOLossConfig(beta=BETA, f_divergence_type=kind, f_alpha_divergence_coef=alpha))
    _assert_close(out.losses, [-_logsig(BETA * m) for m in margins])
    _assert_close(out.chosen_rewards, R_C)


def test_f_divergence_applies_to_other_margin_losses():
    """Forward KL with the hinge: max(0, 1 − β(e^{−ℓ_r} − e^{−ℓ_c}))."""
    out = _run(DPOLossConfig(loss_type="hinge", beta=BETA, f_divergence_type="forward_kl"))
    margins = [math.exp(0.4) - math.exp(-0.2), math.exp(-0.4) - math.exp(0.5)]
    _assert_close(out.losses, [max(0.0, 1 - BETA * m) for m in margins])


def test_alpha_divergence_limits():
    """(1 − u^{−α})/α → log u as α → 0 (reverse KL), and equals 1 − 1/u (forward KL + 1) at α = 1."""
    reverse = _run(DPOLossConfig(beta=BETA)).losses
    small_alpha = _run(
        DPOLossConfig(beta=BETA, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1e-7)
    )
    torch.testing.assert_close(small_alpha.losses, reverse, atol=1e-6, rtol=0)
    forward = _run(DPOLossConfig(beta=BETA, f_divergence_type="forward_kl")).losses
    alpha_one = _run(
        DPOLossConfig(beta=BETA, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    )
    torch.testing.assert_close(alpha_one.losses, forward, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- invariants


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    logps = _t([-3.0, -7.5, -0.25])
    out = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, DPOLossConfig())
    _assert_close(out.losses, [math.log(2.0)] * 3)
    _assert_close(out.chosen_rewards, [0.0] * 3)
    _assert_close(out.rejected_rewards, [0.0] * 3)


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_swapping_chosen_and_rejected_flips_the_margin(kind):
    """−log σ(−z) − (−log σ(z)) = z, so loss(swapped) − loss recovers the logit z = β·h_f; after the
    swap it must be −z, i.e. the loss equals −log σ(z) again with z read off the swapped pair."""
    config = DPOLossConfig(beta=BETA, f_divergence_type=kind, f_alpha_divergence_coef=0.5)
    out = _run(config)
    swapped = dpo_loss(_t(PI_R), _t(PI_C), _t(REF_R), _t(REF_C), config)
    logit = swapped.losses - out.losses
    torch.testing.assert_close(out.losses, -torch.nn.functional.logsigmoid(logit), atol=ATOL, rtol=0)
    torch.testing.assert_close(swapped.losses, -torch.nn.functional.logsigmoid(-logit), atol=ATOL, rtol=0)
    margin = out.chosen_rewards - out.rejected_rewards
    torch.testing.assert_close(swapped.chosen_rewards - swapped.rejected_rewards, -margin)
    if kind == "reverse_kl":
        _assert_close(logit, Z)


def test_rewards_are_detached_and_losses_differentiable():
    pi_c = _t(PI_C).requires_grad_()
    out = dpo_loss(pi_c, _t(PI_R), _t(REF_C), _t(REF_R), DPOLossConfig(beta=BETA))
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_reference_gets_no_gradient():
    ref_c = _t(REF_C).requires_grad_()
    out = dpo_loss(_t(PI_C).requires_grad_(), _t(PI_R), ref_c, _t(REF_R), DPOLossConfig(beta=BETA))
    assert ref_c.grad_fn is None
    out.losses.sum().backward()
    assert ref_c.grad is None


# Generic point for gradient signs: β = 0.25, ℓ_c = (0.6, 0.2, 1.0), ℓ_r = (−0.4, −0.5, 0.3), so all
# rewards are small (|βℓ| ≤ 0.25), h < 1/(2β) = 2 and βh is away from DiscoPOP's non-monotone region at 0.
_GRAD_PI_C = (-1.4, -2.0, -0.5)
_GRAD_PI_R = (-2.4, -3.0, -1.2)
_GRAD_REF_C = (-2.0, -2.2, -1.5)
_GRAD_REF_R = (-2.0, -2.5, -1.5)


def _grads(config: DPOLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    pi_c = _t(_GRAD_PI_C).requires_grad_()
    pi_r = _t(_GRAD_PI_R).requires_grad_()
    nll = _t([0.5, 0.5, 0.5])
    out = dpo_loss(pi_c, pi_r, _t(_GRAD_REF_C), _t(_GRAD_REF_R), config, chosen_nll=nll)
    out.losses.sum().backward()
    assert pi_c.grad is not None and pi_r.grad is not None
    return pi_c.grad, pi_r.grad


@pytest.mark.parametrize("loss_type", [name for name in DPO_LOSS_TYPES if name != "sft"])
def test_gradient_signs(loss_type):
    """Raising the rejected log-prob raises the loss everywhere; raising the chosen one lowers it,
    except for APO-down, whose anchor deliberately pushes the chosen likelihood down."""
    grad_chosen, grad_rejected = _grads(DPOLossConfig(loss_type=loss_type, beta=0.25))
    assert (grad_rejected > 0).all(), grad_rejected
    if loss_type != "apo_down":
        assert (grad_chosen < 0).all(), grad_chosen


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_gradient_signs_under_f_divergences(kind):
    """Every f' here is increasing in u, so the DPO gradient signs survive the change of divergence."""
    grad_chosen, grad_rejected = _grads(DPOLossConfig(beta=0.25, f_divergence_type=kind))
    assert (grad_chosen < 0).all() and (grad_rejected > 0).all()


def test_apo_down_pushes_chosen_down():
    """APO-down at r_c = 0, r_r = 1 (β = 0.5, ℓ_c = 0, ℓ_r = 2): d/dπ_c = β(σ'(0) − σ'(−1)) =
    0.5·(0.25 − σ(−1)σ(1)) > 0."""
    pi_c = _t([0.0]).requires_grad_()
    out = dpo_loss(pi_c, _t([2.0]), _t([0.0]), _t([0.0]), DPOLossConfig(loss_type="apo_down", beta=0.5))
    out.losses.sum().backward()
    assert pi_c.grad is not None
    _assert_close(pi_c.grad, [0.5 * (0.25 - _sig(-1.0) * _sig(1.0))])


def test_sft_gradient_is_positive_in_nll():
    nll = _t(NLL).requires_grad_()
    out = dpo_loss(_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), DPOLossConfig(loss_type="sft"), chosen_nll=nll)
    out.losses.sum().backward()
    assert nll.grad is not None
    _assert_close(nll.grad, [1.0, 1.0])


# --------------------------------------------------------------------------- combinations and extras


def test_mpo_weighting_equals_weighted_sum_of_single_losses():
    """MPO (Wang et al. 2024): 0.8·sigmoid + 0.2·bco_pair + 1.0·sft."""
    combined = _run(
        DPOLossConfig(loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0), beta=BETA)
    )
    singles = {
        name: _run(DPOLossConfig(loss_type=name, beta=BETA)).losses for name in ("sigmoid", "bco_pair", "sft")
    }
    expected = 0.8 * singles["sigmoid"] + 0.2 * singles["bco_pair"] + 1.0 * singles["sft"]
    torch.testing.assert_close(combined.losses, expected, atol=1e-12, rtol=0)


def test_default_weights_are_equal():
    config = DPOLossConfig(loss_type=("sigmoid", "hinge", "ipo"), beta=BETA)
    assert config.loss_weights is None
    assert config.resolved_loss_weights == (1.0, 1.0, 1.0)
    # by hand: −log σ(z) + (1 − z) + (h − 1)²
    expected = [-_logsig(z) + (1 - z) + (h - 1) ** 2 for z, h in zip(Z, H, strict=True)]
    _assert_close(_run(config).losses, expected)


def test_label_smoothing_only_reaches_losses_that_use_it():
    """With (sigmoid, hinge) and ε = 0.1: −0.9 log σ(z) − 0.1 log σ(−z) + max(0, 1 − z)."""
    out = _run(DPOLossConfig(loss_type=("sigmoid", "hinge"), beta=BETA, label_smoothing=0.1))
    _assert_close(out.losses, [-0.9 * _logsig(z) - 0.1 * _logsig(-z) + (1 - z) for z in Z])


def test_rpo_adds_scaled_chosen_nll():
    """RPO (Pang et al. 2024): −log σ(z) + α·NLL with α = 0.5, NLL = (0.7, 1.3)."""
    out = _run(DPOLossConfig(beta=BETA, rpo_alpha=0.5))
    _assert_close(out.losses, [-_logsig(z) + 0.5 * nll for z, nll in zip(Z, NLL, strict=True)])


def test_wpo_weights_scale_each_example():
    """WPO: losses = w · (−log σ(z)) with w = (0.5, 2.0); the weights never receive gradient."""
    weights = _t([0.5, 2.0]).requires_grad_()
    pi_c = _t(PI_C).requires_grad_()
    config = DPOLossConfig(beta=BETA, use_weighting=True)
    out = dpo_loss(pi_c, _t(PI_R), _t(REF_C), _t(REF_R), config, weights=weights)
    _assert_close(out.losses, [0.5 * -_logsig(Z[0]), 2.0 * -_logsig(Z[1])])
    out.losses.sum().backward()
    assert pi_c.grad is not None
    assert weights.grad is None


def test_reference_free_treats_reference_as_zero():
    """Reference-free sigmoid: h = π_c − π_r = (0.5, −0.5); rewards βπ = (−0.5, −1.25) / (−0.75, −1.0).
    Given reference log-probs are ignored."""
    config = DPOLossConfig(beta=BETA, reference_free=True)
    for ref_c, ref_r in [(None, None), (_t(REF_C), _t(REF_R))]:
        out = dpo_loss(_t(PI_C), _t(PI_R), ref_c, ref_r, config)
        _assert_close(out.losses, [-_logsig(0.25), -_logsig(-0.25)])
        _assert_close(out.chosen_rewards, [-0.5, -1.25])
        _assert_close(out.rejected_rewards, [-0.75, -1.0])


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_reference_free_compatibility(loss_type):
    if loss_type in REFERENCE_FREE_COMPATIBLE:
        config = DPOLossConfig(loss_type=loss_type, reference_free=True)
        out = dpo_loss(_t(PI_C), _t(PI_R), None, None, config, chosen_nll=_t(NLL))
        assert torch.isfinite(out.losses).all()
    else:
        with pytest.raises(ValueError, match=rf"\['{loss_type}'\] need reference log-probs"):
            DPOLossConfig(loss_type=loss_type, reference_free=True)


# --------------------------------------------------------------------------- validation


def test_loss_type_normalisation():
    assert DPOLossConfig(loss_type="ipo").loss_type == ("ipo",)
    config = DPOLossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5])  # type: ignore[arg-type]
    assert config.loss_type == ("sigmoid", "sft")
    assert config.loss_weights == (1.0, 0.5)


@pytest.mark.parametrize("value", [0.0, 0.1, 0.49])
def test_label_smoothing_valid_range(value):
    assert DPOLossConfig(label_smoothing=value).label_smoothing == value


@pytest.mark.parametrize("value", [-0.01, 0.5, 0.7])
def test_label_smoothing_invalid_range(value):
    with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 0.5\), got {value}"):
        DPOLossConfig(label_smoothing=value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "dpo"}, r"unknown loss_type 'dpo'; valid loss types are \('sigmoid'"),
        ({"loss_type": ()}, r"loss_type is empty"),
        ({"loss_type": ("sigmoid", "sigmoid")}, r"\['sigmoid'\] more than once"),
        ({"loss_type": ("sigmoid", "sft"), "loss_weights": (1.0,)}, r"loss_weights has 1 entries .* has 2"),
        ({"loss_weights": (-1.0,)}, r"loss weight -1.0 for 'sigmoid'"),
        ({"loss_weights": (math.nan,)}, r"loss weight nan"),
        ({"beta": 0.0}, r"beta must be .* > 0, got 0.0"),
        ({"beta": -0.1}, r"beta must be .* > 0, got -0.1"),
        ({"loss_type": ("hinge", "ipo"), "label_smoothing": 0.1}, r"label_smoothing=0.1 has no effect"),
        ({"loss_type": "nca_pair", "reference_free": True}, r"\['nca_pair'\] need reference"),
        ({"loss_type": ("sigmoid", "apo_zero"), "reference_free": True}, r"\['apo_zero'\] need reference"),
        ({"f_divergence_type": "kl"}, r"unknown f_divergence_type 'kl'; valid types are \('reverse_kl'"),
        (
            {"f_divergence_type": "js_divergence", "loss_type": "bco_pair"},
            r"'js_divergence' .*\['bco_pair'\]",
        ),
        ({"f_divergence_type": "forward_kl", "loss_type": "aot"}, r"'forward_kl' .*\['aot'\]"),
        ({"f_divergence_type": "forward_kl", "loss_type": "sft"}, r"'forward_kl' .*none of them"),
        ({"f_divergence_type": "forward_kl", "reference_free": True}, r"'forward_kl' .*needs a reference"),
        (
            {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.0},
            r"f_alpha_divergence_coef must be > 0, got 0.0",
        ),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, r"discopop_tau must be > 0, got 0.0"),
        ({"rpo_alpha": -1.0}, r"rpo_alpha must be .* got -1.0"),
        ({"ld_alpha": 1.5}, r"ld_alpha must be None or in \[0, 1\], got 1.5"),
        ({"ld_alpha": -0.1}, r"ld_alpha must be None or in \[0, 1\], got -0.1"),
        (
            {"loss_type": ("sigmoid", "aot_pair"), "use_weighting": True},
            r"\['aot_unpaired'\] return per-quantile",
        ),
        ({"loss_type": "sigmoid_norm", "length_normalize": False}, r"sigmoid_norm is the length-normalised"),
    ],
)
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOLossConfig(**kwargs)


def test_valid_combinations_construct():
    DPOLossConfig(loss_type=("sigmoid", "sft"), f_divergence_type="js_divergence")
    DPOLossConfig(loss_type=("sigmoid", "hinge"), label_smoothing=0.2)
    DPOLossConfig(f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.0)  # α unused: not checked
    DPOLossConfig(ld_alpha=0.0, rpo_alpha=0.0, use_weighting=True)


def test_missing_inputs_raise():
    with pytest.raises(ValueError, match="ref_chosen_logps and ref_rejected_logps are required"):
        dpo_loss(_t(PI_C), _t(PI_R), None, None, DPOLossConfig())
    with pytest.raises(ValueError, match="chosen_nll is required"):
        dpo_loss(_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), DPOLossConfig(loss_type=("sigmoid", "sft")))
    with pytest.raises(ValueError, match="chosen_nll is required"):
        dpo_loss(_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), DPOLossConfig(rpo_alpha=1.0))
    with pytest.raises(ValueError, match=r"weights .* are required when use_weighting=True"):
        dpo_loss(_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), DPOLossConfig(use_weighting=True))
    with pytest.raises(ValueError, match="weights were given but use_weighting=False"):
        dpo_loss(_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), DPOLossConfig(), weights=_t([1.0, 1.0]))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"policy_rejected_logps has shape \(3,\), expected \(2,\)"):
        dpo_loss(_t(PI_C), _t([0.0, 0.0, 0.0]), _t(REF_C), _t(REF_R), DPOLossConfig())
    with pytest.raises(ValueError, match=r"per-sequence \[B\], got shape \(2, 1\)"):
        dpo_loss(_t([[0.0], [0.0]]), _t([[0.0], [0.0]]), None, None, DPOLossConfig(reference_free=True))
    with pytest.raises(ValueError, match=r"chosen_nll has shape \(1,\)"):
        dpo_loss(
            _t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), DPOLossConfig(loss_type="sft"), chosen_nll=_t([0.0])
        )


# --------------------------------------------------------------------------- LD-DPO and WPO helpers

# Row 0 has a one-token prompt (junk value 9.0) and completion (−1, −2, −3, −4); row 1 has completion
# (−0.5, −1.5, −2.5) followed by padding holding NaN.
_LD_LOGPS = ((9.0, -1.0, -2.0, -3.0, -4.0), (-0.5, -1.5, -2.5, math.nan, math.nan))
_LD_MASK = ((0, 1, 1, 1, 1), (1, 1, 1, 0, 0))


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        # public lengths (2, 1): row 0 = (−1 − 2) + α(−3 − 4); row 1 = −0.5 + α(−1.5 − 2.5)
        (0.5, [-3.0 + 0.5 * -7.0, -0.5 + 0.5 * -4.0]),
        (1.0, [-10.0, -4.5]),  # α = 1: the plain sum over completion tokens
        (0.0, [-3.0, -0.5]),  # α = 0: only the public prefix
    ],
)
def test_ld_sequence_logps_closed_form(alpha, expected):
    """LD-DPO (Liu et al. 2024): Σ_{t ≤ l_p} log p_t + α Σ_{t > l_p} log p_t over completion tokens."""
    out = ld_sequence_logps(_t(_LD_LOGPS), torch.tensor(_LD_MASK), torch.tensor([2, 1]), alpha)
    _assert_close(out, expected)


def test_ld_sequence_logps_gradient_and_validation():
    """d/d log p_t is 1 in the public prefix, α after it and 0 outside the completion."""
    logps = _t([[9.0, -1.0, -2.0, -3.0, -4.0]]).requires_grad_()
    ld_sequence_logps(logps, torch.tensor([[0, 1, 1, 1, 1]]), torch.tensor([2]), 0.25).sum().backward()
    assert logps.grad is not None
    _assert_close(logps.grad, [[0.0, 1.0, 1.0, 0.25, 0.25]])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        ld_sequence_logps(logps, torch.ones(1, 5), torch.tensor([2]), 1.5)


def test_wpo_weights_closed_form():
    """WPO (Zhou et al. 2024): w = exp(mean_t[log p_t − log Σp²]_chosen + mean_t[…]_rejected).

    Row 0: chosen mean((−1 + 0.5), (−2 + 1.0)) = −0.75, rejected (−3 + 2) = −1 → exp(−1.75).
    Row 1: chosen (−0.2 + 0.1) = −0.1, rejected mean((−0.4 + 0.3), (−0.6 + 0.3)) = −0.2 → exp(−0.3).
    Padding holds NaN and must not leak.
    """
    nan = math.nan
    chosen_logps = _t([[-1.0, -2.0], [-0.2, nan]]).requires_grad_()
    chosen_sq = _t([[-0.5, -1.0], [-0.1, nan]])
    chosen_mask = torch.tensor([[1, 1], [1, 0]])
    rejected_logps = _t([[-3.0, nan], [-0.4, -0.6]])
    rejected_sq = _t([[-2.0, nan], [-0.3, -0.3]])
    rejected_mask = torch.tensor([[1, 0], [1, 1]])
    weights = wpo_weights(chosen_logps, chosen_sq, chosen_mask, rejected_logps, rejected_sq, rejected_mask)
    _assert_close(weights, [math.exp(-1.75), math.exp(-0.3)])
    assert not weights.requires_grad


def test_wpo_weights_from_a_real_distribution():
    """One token per side from p = (0.5, 0.25, 0.25): Σp² = 0.375. Chosen token p = 0.5, rejected
    token p = 0.25 ⇒ w = (0.5/0.375)·(0.25/0.375) = 8/9."""
    probs = _t([[0.5, 0.25, 0.25]])
    log_sq = torch.log((probs**2).sum(-1, keepdim=True))
    mask = torch.ones(1, 1)
    weights = wpo_weights(torch.log(probs[:, :1]), log_sq, mask, torch.log(probs[:, 1:2]), log_sq, mask)
    _assert_close(weights, [8.0 / 9.0])
