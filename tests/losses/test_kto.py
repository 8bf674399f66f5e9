"""Tests for the unpaired losses in ``lit_pref.losses.kto``: KTO, APO-zero (unpaired) and BCO.

Expected values are computed by hand with ``math`` on Python floats and compared on float64
tensors with a 1e-6 tolerance.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from lit_pref.losses.kto import (
    BCOLossOutput,
    KTOLossConfig,
    RunningMean,
    bco_loss,
    kto_kl_estimate,
    kto_loss,
    kto_weight_ratio_warning,
)

TOL = 1e-6


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def t64(values: list[float], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


POLICY = [-1.0, -2.0, -3.0, -0.5]
REF = [-1.5, -1.0, -3.2, -0.5]
LABELS = [True, False, True, False]


def labels_of(values: list[bool]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------
# KTO / APO-zero closed forms
# ----------------------------------------------------------------------------------------------


def test_kto_closed_form() -> None:
    """r = policy − ref = [0.5, −1.0, 0.2, 0.0]; β = 0.5, z0 = 0.3, λ_D = 1.3, λ_U = 0.7.

    desirable:   λ_D·(1 − σ(β(r − z0)))
    undesirable: λ_U·(1 − σ(β(z0 − r)))
    """
    beta, z0, lam_d, lam_u = 0.5, 0.3, 1.3, 0.7
    config = KTOLossConfig(beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    out = kto_loss(t64(POLICY), t64(REF), labels_of(LABELS), torch.tensor(z0, dtype=torch.float64), config)

    r = [p - q for p, q in zip(POLICY, REF, strict=True)]
    expected = [
        lam_d * (1 - sigmoid(beta * (r[0] - z0))),
        lam_u * (1 - sigmoid(beta * (z0 - r[1]))),
        lam_d * (1 - sigmoid(beta * (r[2] - z0))),
        lam_u * (1 - sigmoid(beta * (z0 - r[3]))),
    ]
    torch.testing.assert_close(out.losses, t64(expected), atol=TOL, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, t64([beta * r[0], beta * r[2]]), atol=TOL, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, t64([beta * r[1], beta * r[3]]), atol=TOL, rtol=0)
    assert out.kl.item() == pytest.approx(z0)


def test_apo_zero_unpaired_closed_form() -> None:
    """APO-zero, unpaired: desirable λ_D·(1 − σ(βr)), undesirable λ_U·σ(βr); z0 is ignored."""
    beta, lam_d, lam_u = 0.5, 1.3, 0.7
    config = KTOLossConfig(
        loss_type="apo_zero_unpaired", beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u
    )
    out = kto_loss(t64(POLICY), t64(REF), labels_of(LABELS), torch.tensor(5.0, dtype=torch.float64), config)

    r = [p - q for p, q in zip(POLICY, REF, strict=True)]
    expected = [
        lam_d * (1 - sigmoid(beta * r[0])),
        lam_u * sigmoid(beta * r[1]),
        lam_d * (1 - sigmoid(beta * r[2])),
        lam_u * sigmoid(beta * r[3]),
    ]
    torch.testing.assert_close(out.losses, t64(expected), atol=TOL, rtol=0)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_equal_logps_at_zero_reference_is_half(loss_type: str) -> None:
    """With r = 0 and z0 = 0 every row sits on the sigmoid's midpoint: loss = λ·½."""
    config = KTOLossConfig(loss_type=loss_type, desirable_weight=2.0, undesirable_weight=3.0)
    logps = t64([-4.0, -4.0])
    out = kto_loss(
        logps, logps.clone(), labels_of([True, False]), torch.zeros((), dtype=torch.float64), config
    )
    torch.testing.assert_close(out.losses, t64([1.0, 1.5]), atol=TOL, rtol=0)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("desirable", [True, False])
def test_kto_single_class_batches(loss_type: str, desirable: bool) -> None:
    """All-desirable / all-undesirable batches: one reward tensor is empty, losses are per row."""
    beta, z0 = 0.2, 0.1
    config = KTOLossConfig(loss_type=loss_type, beta=beta)
    policy, ref = [-1.0, -2.0, -0.25], [-1.5, -1.0, -1.0]
    labels = labels_of([desirable] * 3)
    out = kto_loss(t64(policy), t64(ref), labels, torch.tensor(z0, dtype=torch.float64), config)

    anchor = z0 if loss_type == "kto" else 0.0
    expected = []
    for p, q in zip(policy, ref, strict=True):
        m = beta * (p - q - anchor)
        expected.append(1 - sigmoid(m) if desirable else sigmoid(m))
    torch.testing.assert_close(out.losses, t64(expected), atol=TOL, rtol=0)
    kept, empty = (
        (out.chosen_rewards, out.rejected_rewards)
        if desirable
        else (out.rejected_rewards, out.chosen_rewards)
    )
    assert kept.shape == (3,)
    assert empty.shape == (0,)
    assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_kto_huge_margins_are_finite(loss_type: str, sign: float) -> None:
    """A row far on its "good" side has loss → 0; far on its "bad" side loss → λ; never NaN."""
    config = KTOLossConfig(loss_type=loss_type, beta=1.0)
    # Desirable row with r = +sign·1e4 and undesirable row with r = −sign·1e4.
    policy = t64([sign * 1e4, -sign * 1e4], requires_grad=True)
    ref = t64([0.0, 0.0])
    out = kto_loss(policy, ref, labels_of([True, False]), torch.zeros((), dtype=torch.float64), config)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(policy.grad).all()
    expected = 0.0 if sign > 0 else 1.0
    torch.testing.assert_close(out.losses, t64([expected, expected]), atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# KTO gradients and the reference point
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("z0", [0.0, 0.7])
def test_kto_gradient_signs(loss_type: str, z0: float) -> None:
    """Raising a desirable row's log-prob lowers its loss; raising an undesirable one's raises it."""
    config = KTOLossConfig(loss_type=loss_type, beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    policy = t64([-1.0, -2.0, -0.3, -4.0], requires_grad=True)
    out = kto_loss(
        policy, t64([-1.2, -1.5, -0.3, -3.0]), labels_of([True, False, True, False]), t64([z0])[0], config
    )
    out.losses.sum().backward()
    assert policy.grad is not None
    assert (policy.grad[[0, 2]] < 0).all()
    assert (policy.grad[[1, 3]] > 0).all()


def test_kto_gradient_matches_closed_form() -> None:
    """d/dr λ_D·σ(−β(r − z0)) = −λ_D·β·σ(m)(1 − σ(m)) with m = β(r − z0)."""
    beta, z0, lam_d = 0.4, 0.2, 1.7
    config = KTOLossConfig(beta=beta, desirable_weight=lam_d)
    policy = t64([-1.0], requires_grad=True)
    out = kto_loss(policy, t64([-1.5]), labels_of([True]), torch.tensor(z0, dtype=torch.float64), config)
    out.losses.sum().backward()
    m = beta * (0.5 - z0)
    assert policy.grad is not None
    assert policy.grad.item() == pytest.approx(-lam_d * beta * sigmoid(m) * (1 - sigmoid(m)), abs=TOL)


def test_kto_does_not_backpropagate_through_kl() -> None:
    """z0 is a constant of the loss, even if the caller forgot to detach it."""
    kl = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    out = kto_loss(
        t64([-1.0, -2.0], requires_grad=True),
        t64([-1.0, -1.0]),
        labels_of([True, False]),
        kl,
        KTOLossConfig(),
    )
    out.losses.sum().backward()
    assert kl.grad is None
    assert not out.kl.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_kto_kl_estimate_mean_of_mismatched_pairs() -> None:
    """z0 = mean(policy − ref) = (0.5 + 1.0 − 0.3) / 3 = 0.4, detached."""
    policy = t64([-1.0, -2.0, -3.3], requires_grad=True)
    z0 = kto_kl_estimate(policy, t64([-1.5, -3.0, -3.0]))
    assert z0.shape == ()
    assert not z0.requires_grad
    assert z0.item() == pytest.approx(0.4, abs=TOL)


def test_kto_kl_estimate_clamps_at_zero() -> None:
    """A negative mean log-ratio (not a valid KL) is clamped to 0."""
    z0 = kto_kl_estimate(t64([-2.0, -3.0]), t64([-1.0, -1.5]))
    assert z0.item() == 0.0


def test_kto_kl_estimate_empty_batch_is_zero() -> None:
    assert kto_kl_estimate(t64([]), t64([])).item() == 0.0


@pytest.mark.parametrize(
    ("local", "other_sum", "other_count", "expected"),
    [
        # Global mean (3 + (−2)) / (1 + 3) = 0.25; clamping per rank first would give (3 + 0)/2.
        ([3.0], -2.0, 3.0, 0.25),
        # Global mean (−2 + 0.5) / 3 < 0 → 0; clamp-then-average would give 0.25.
        ([-1.0, -1.0], 0.5, 1.0, 0.0),
    ],
)
def test_kto_kl_estimate_reduces_across_ranks_before_clamping(
    local: list[float], other_sum: float, other_count: float, expected: float
) -> None:
    """The collective sums [sum, count] over ranks; the clamp is applied to the global mean."""

    def fake_all_reduce_sum(totals: torch.Tensor) -> torch.Tensor:
        assert totals.shape == (2,)
        return totals + t64([other_sum, other_count])

    z0 = kto_kl_estimate(t64(local), t64([0.0] * len(local)), all_reduce_sum=fake_all_reduce_sum)
    assert z0.item() == pytest.approx(expected, abs=TOL)


# ----------------------------------------------------------------------------------------------
# KTO class-balance advice
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_desirable", "n_undesirable", "lam_d", "lam_u", "warns"),
    [
        (3, 3, 1.0, 1.0, False),  # ratio 1: lower bound, inclusive
        (4, 3, 1.0, 1.0, False),  # ratio 4/3: upper bound, inclusive
        (2, 3, 1.75, 1.0, False),  # ratio 3.5/3 ≈ 1.17
        (1, 9, 10.0, 1.0, False),  # ratio 10/9: imbalance fixed by λ_D
        (5, 3, 1.0, 1.0, True),  # ratio 5/3 > 4/3
        (2, 3, 1.0, 1.0, True),  # ratio 2/3 < 1
        (1, 9, 1.0, 1.0, True),  # ratio 1/9
    ],
)
def test_kto_weight_ratio_warning(
    n_desirable: int, n_undesirable: int, lam_d: float, lam_u: float, warns: bool
) -> None:
    labels = labels_of([True] * n_desirable + [False] * n_undesirable)
    config = KTOLossConfig(desirable_weight=lam_d, undesirable_weight=lam_u)
    message = kto_weight_ratio_warning(labels, config)
    if not warns:
        assert message is None
        return
    assert message is not None
    assert f"n_desirable={n_desirable}" in message and f"n_undesirable={n_undesirable}" in message
    assert "[1, 4/3]" in message
    # The suggested desirable_weight range is λ_U·n_U/n_D · [1, 4/3].
    low = lam_u * n_undesirable / n_desirable
    assert f"{low:.4g}" in message and f"{low * 4 / 3:.4g}" in message


@pytest.mark.parametrize("labels", [[True, True], [False, False, False]])
def test_kto_weight_ratio_warning_single_class(labels: list[bool]) -> None:
    message = kto_weight_ratio_warning(labels_of(labels), KTOLossConfig())
    assert message is not None and "single class" in message


# ----------------------------------------------------------------------------------------------
# KTO validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"loss_type": "sigmoid"},
            r"unknown KTO loss_type 'sigmoid'; expected one of \('kto', 'apo_zero_unpaired'\)",
        ),
        ({"beta": 0.0}, r"beta must be a finite number > 0, got 0\.0"),
        ({"beta": float("nan")}, r"beta must be a finite number > 0, got nan"),
        ({"desirable_weight": -1.0}, r"desirable_weight must be a finite number > 0, got -1\.0"),
        ({"undesirable_weight": float("inf")}, r"undesirable_weight must be a finite number > 0, got inf"),
    ],
)
def test_kto_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KTOLossConfig(**kwargs)  # type: ignore[arg-type]


def test_kto_config_is_frozen() -> None:
    config = KTOLossConfig()
    with pytest.raises(AttributeError):
        config.beta = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("policy", "ref", "labels", "kl", "match"),
    [
        (t64([-1.0, -2.0]), t64([-1.0]), labels_of([True, False]), 0.0, "share one"),
        (t64([-1.0, -2.0]), t64([-1.0, -2.0]), torch.tensor([1, 0]), 0.0, "bool tensor"),
        (t64([[-1.0]]), t64([[-1.0]]), labels_of([[True]]), 0.0, "1-D"),
        (t64([-1.0]), t64([-1.0]), labels_of([True]), [0.1, 0.2], "scalar"),
    ],
)
def test_kto_input_validation(
    policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, kl: float | list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        kto_loss(policy, ref, labels, torch.tensor(kl, dtype=torch.float64), KTOLossConfig())


# ----------------------------------------------------------------------------------------------
# BCO
# ----------------------------------------------------------------------------------------------


def test_bco_closed_form() -> None:
    """r = β·(policy − ref); desirable −log σ(r − δ), undesirable −log σ(−(r − δ))."""
    beta, delta = 0.5, 0.15
    out = bco_loss(t64(POLICY), t64(REF), labels_of(LABELS), torch.tensor(delta, dtype=torch.float64), beta)
    assert isinstance(out, BCOLossOutput)

    rewards = [beta * (p - q) for p, q in zip(POLICY, REF, strict=True)]
    expected = [
        -log_sigmoid(rewards[0] - delta),
        -log_sigmoid(-(rewards[1] - delta)),
        -log_sigmoid(rewards[2] - delta),
        -log_sigmoid(-(rewards[3] - delta)),
    ]
    torch.testing.assert_close(out.losses, t64(expected), atol=TOL, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, t64([rewards[0], rewards[2]]), atol=TOL, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, t64([rewards[1], rewards[3]]), atol=TOL, rtol=0)


def test_bco_reward_equal_to_shift_is_ln2() -> None:
    """When r = δ the classifier is undecided: loss = −log ½ = ln 2 for both labels."""
    out = bco_loss(t64([-1.0, -1.0]), t64([-2.0, -2.0]), labels_of([True, False]), t64([0.25])[0], beta=0.25)
    torch.testing.assert_close(out.losses, t64([math.log(2.0)] * 2), atol=TOL, rtol=0)


def test_bco_gradient_signs_and_delta_detached() -> None:
    policy = t64([-1.0, -2.0, -0.5], requires_grad=True)
    delta = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    out = bco_loss(policy, t64([-1.0, -1.0, -1.0]), labels_of([True, False, True]), delta, beta=0.2)
    out.losses.sum().backward()
    assert policy.grad is not None
    assert policy.grad[0] < 0 and policy.grad[2] < 0
    assert policy.grad[1] > 0
    assert delta.grad is None


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bco_huge_margins_are_finite(sign: float) -> None:
    """logsigmoid keeps −log σ(x) exact: → 0 on the right side, ≈ |x| on the wrong side."""
    policy = t64([sign * 1e4, -sign * 1e4], requires_grad=True)
    out = bco_loss(
        policy, t64([0.0, 0.0]), labels_of([True, False]), torch.zeros((), dtype=torch.float64), beta=1.0
    )
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(policy.grad).all()
    expected = 0.0 if sign > 0 else 1e4
    torch.testing.assert_close(out.losses, t64([expected, expected]), atol=TOL, rtol=0)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_bco_beta_validation(beta: float) -> None:
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        bco_loss(t64([-1.0]), t64([-1.0]), labels_of([True]), torch.zeros(()), beta)


def test_bco_delta_must_be_scalar() -> None:
    with pytest.raises(ValueError, match="delta must be a scalar"):
        bco_loss(t64([-1.0]), t64([-1.0]), labels_of([True]), torch.zeros(2), 0.1)


# ----------------------------------------------------------------------------------------------
# RunningMean (BCO's δ)
# ----------------------------------------------------------------------------------------------


def test_running_mean_starts_at_zero() -> None:
    running = RunningMean()
    assert running.count == 0
    assert running.value.item() == 0.0
    assert running.value.shape == ()


def test_running_mean_over_several_updates() -> None:
    """Cumulative mean of all values seen: (1 + 2 + 3 − 4 + 10) / (2 + 2 + 4) = 12 / 8 = 1.5."""
    running = RunningMean()
    running.update(t64([1.0, 2.0]))
    assert running.value.item() == pytest.approx(1.5)
    running.update(torch.tensor([[3.0], [-4.0]], dtype=torch.float32, requires_grad=True))
    assert running.value.item() == pytest.approx(0.5)
    # Pre-reduced totals from all ranks, as tensors: sum 10 over 4 values.
    running.update_from_totals(torch.tensor(10.0), torch.tensor(4))
    assert running.count == 8
    assert running.value.item() == pytest.approx(1.5, abs=TOL)
    running.update(t64([]))  # an empty update changes nothing
    assert running.count == 8 and running.value.item() == pytest.approx(1.5, abs=TOL)


def test_running_mean_state_dict_round_trip() -> None:
    running = RunningMean()
    running.update(t64([0.3, -0.7, 1.1]))
    state = running.state_dict()

    restored = RunningMean()
    restored.load_state_dict(state)
    assert restored.count == running.count
    assert restored.value.item() == running.value.item()

    # Both continue identically after the round trip, including through torch.save/load.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    reloaded = RunningMean()
    reloaded.load_state_dict(torch.load(buffer))
    for obj in (running, restored, reloaded):
        obj.update_from_totals(2.0, 1)
    assert running.value.item() == restored.value.item() == reloaded.value.item()
    assert running.value.item() == pytest.approx((0.3 - 0.7 + 1.1 + 2.0) / 4, abs=TOL)


def test_running_mean_feeds_bco() -> None:
    """The rewards reported by bco_loss update δ, and δ then shifts the next loss."""
    running = RunningMean()
    out = bco_loss(t64([-1.0, -3.0]), t64([-2.0, -2.0]), labels_of([True, False]), running.value, beta=0.5)
    running.update(torch.cat([out.chosen_rewards, out.rejected_rewards]))
    assert running.value.item() == pytest.approx(0.0, abs=TOL)  # (0.5 − 0.5) / 2
    running.update(t64([1.0, 1.0]))
    assert running.value.item() == pytest.approx(0.5, abs=TOL)
    shifted = bco_loss(t64([-1.0]), t64([-2.0]), labels_of([True]), running.value, beta=0.5)
    assert shifted.losses.item() == pytest.approx(math.log(2.0), abs=TOL)  # r = δ = 0.5


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"total": 1.0}, r"missing keys \['count'\]"),
        ({"total": 1.0, "count": -1}, "non-negative integer"),
        ({"total": 1.0, "count": 1.5}, "non-negative integer"),
    ],
)
def test_running_mean_load_state_dict_validation(state: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RunningMean().load_state_dict(state)


@pytest.mark.parametrize(
    ("total", "count", "match"),
    [(1.0, -2, "non-negative integer"), (float("nan"), 1, "total must be finite")],
)
def test_running_mean_update_validation(total: float, count: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RunningMean().update_from_totals(total, count)
