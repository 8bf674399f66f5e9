"""Unpaired (binary-feedback) preference losses: KTO, APO-zero (unpaired) and BCO.

Every example is one completion ``y`` for a prompt ``x`` with a boolean label: ``True`` for a
desirable completion, ``False`` for an undesirable one. The implicit reward is the policy /
reference log-ratio ``r = log π_θ(y|x) − log π_ref(y|x)`` of the whole completion.

References:
    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
    (arXiv:2402.01306), §4 "Kahneman-Tversky Optimization": the loss L_KTO = E[λ_y − v(x, y)],
    its value function v, the reference point z0 and the λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3] advice.
    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions:
    Addressing Underspecification in Alignment" (arXiv:2408.06266): the APO-zero objective.
    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"
    (arXiv:2404.04656): the BCE loss on the implicit reward and the reward shift δ.

Conventions: all log-probabilities are ``[B]`` sequence-level sums over completion tokens, labels
are a bool ``[B]`` tensor. Losses are returned per example and never reduced; diagnostics are
detached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KTO_LOSS_TYPES",
    "BCOLossOutput",
    "KTOLossConfig",
    "KTOLossOutput",
    "RunningMean",
    "bco_loss",
    "kto_kl_estimate",
    "kto_loss",
    "kto_weight_ratio_warning",
]

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

# Upper end of the λ_D·n_D / (λ_U·n_U) range recommended by Ethayarajh et al. 2024 (lower end: 1).
_RATIO_HIGH = 4.0 / 3.0


def _require_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_unpaired_inputs(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor) -> None:
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps must be 1-D [B], got shape {tuple(policy_logps.shape)}")
    if ref_logps.shape != policy_logps.shape or labels.shape != policy_logps.shape:
        raise ValueError(
            "policy_logps, ref_logps and labels must share one [B] shape, got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)} and {tuple(labels.shape)}"
        )
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor (True = desirable), got dtype {labels.dtype}")


# ----------------------------------------------------------------------------------------------
# KTO and APO-zero (unpaired)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KTOLossConfig:
    """Hyper-parameters of :func:`kto_loss`.

    Attributes:
        loss_type: ``"kto"`` (Ethayarajh et al. 2024) or ``"apo_zero_unpaired"``
            (D'Oosterlinck et al. 2024, APO-zero applied to unpaired labels).
        beta: β, the inverse temperature of the sigmoid value function (risk aversion in KTO's
            prospect-theory reading). Must be > 0.
        desirable_weight: λ_D, the weight of desirable rows. Must be > 0.
        undesirable_weight: λ_U, the weight of undesirable rows (loss aversion when > λ_D).
            Must be > 0.
    """

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"unknown KTO loss_type {self.loss_type!r}; expected one of {KTO_LOSS_TYPES}")
        _require_positive("beta", self.beta)
        _require_positive("desirable_weight", self.desirable_weight)
        _require_positive("undesirable_weight", self.undesirable_weight)


@dataclass
class KTOLossOutput:
    """Result of :func:`kto_loss`.

    Attributes:
        losses: ``[B]`` per-example losses, already multiplied by λ_D / λ_U.
        chosen_rewards: ``[n_desirable]`` detached β·r of the desirable rows, in batch order.
        rejected_rewards: ``[n_undesirable]`` detached β·r of the undesirable rows, in batch order.
        kl: detached scalar reference point z0 that was passed in (``apo_zero_unpaired`` does not
            use it; it is still echoed so that logging is uniform across loss types).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    kl: Tensor


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl: Tensor,
    config: KTOLossConfig,
) -> KTOLossOutput:
    """Per-example KTO or unpaired APO-zero loss.

    KTO (Ethayarajh et al. 2024, §4): with ``r = log π_θ(y|x) − log π_ref(y|x)`` and reference
    point ``z0``, the value is ``v = λ_D·σ(β(r − z0))`` for desirable and
    ``v = λ_U·σ(β(z0 − r))`` for undesirable completions, and the loss is ``λ_y − v``::

        desirable:    λ_D · (1 − σ(β(r − z0))) = λ_D · σ(−β(r − z0))
        undesirable:  λ_U · (1 − σ(β(z0 − r))) = λ_U · σ(−β(z0 − r))

    APO-zero, unpaired (D'Oosterlinck et al. 2024): APO-zero pushes the chosen log-ratio up
    and the rejected one down, each through its own sigmoid anchored at 0; with one completion per
    row that becomes::

        desirable:    λ_D · (1 − σ(β·r)) = λ_D · σ(−β·r)
        undesirable:  λ_U · σ(β·r)

    Args:
        policy_logps: ``[B]`` summed completion log-probs under the policy.
        ref_logps: ``[B]`` the same under the frozen reference model.
        labels: ``[B]`` bool, ``True`` for desirable completions.
        kl: scalar z0. The caller owns its estimation: it must already be detached, averaged
            across data-parallel ranks and clamped at 0, which is exactly what
            :func:`kto_kl_estimate` returns. It is detached again here so that a careless caller
            can never back-propagate through the reference point (the paper treats z0 as a
            constant). Ignored by ``apo_zero_unpaired``.
        config: loss type, β and the class weights.

    Returns:
        :class:`KTOLossOutput` with un-reduced ``[B]`` losses.
    """
    _check_unpaired_inputs(policy_logps, ref_logps, labels)
    if kl.numel() != 1:
        raise ValueError(f"kl must be a scalar tensor (z0), got shape {tuple(kl.shape)}")
    z0 = kl.detach().reshape(()).to(policy_logps.dtype)

    logratio = policy_logps - ref_logps
    # The anchor is z0 for KTO and 0 for APO-zero; both then use the same signed sigmoid.
    anchor = z0 if config.loss_type == "kto" else torch.zeros_like(z0)
    margin = config.beta * (logratio - anchor)
    # Both undesirable forms equal σ(margin): 1 − σ(β(z0 − r)) = σ(β(r − z0)). The desirable
    # 1 − σ(margin) is evaluated as σ(−margin) to avoid cancellation once a row is learned.
    unweighted = torch.sigmoid(torch.where(labels, -margin, margin))
    weights = torch.where(
        labels,
        torch.full_like(logratio, config.desirable_weight),
        torch.full_like(logratio, config.undesirable_weight),
    )

    rewards = config.beta * logratio.detach()
    return KTOLossOutput(
        losses=weights * unweighted,
        chosen_rewards=rewards[labels],
        rejected_rewards=rewards[~labels],
        kl=z0,
    )


def kto_kl_estimate(
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    *,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The KTO reference point ``z0 = max(0, mean_j [log π_θ(y'_j|x_j) − log π_ref(y'_j|x_j)])``.

    Ethayarajh et al. 2024 (§4) estimate ``z0 = KL(π_θ(y'|x) ‖ π_ref(y'|x))`` from mismatched
    pairs: each prompt ``x_j`` of the micro-batch is paired with a completion ``y'_j`` taken from
    another example, so the log-ratio is evaluated off the labelled data. The estimate is biased
    but cheap; it is clamped at 0 (a KL divergence cannot be negative) and never back-propagated.

    Order of operations: sum and count are first reduced across data-parallel ranks (exact global
    mean, also when ranks hold different numbers of rows), and only then clamped. Clamping per
    rank and averaging afterwards would (a) bias z0 upwards, since the mean of ``max(0, ·)`` is
    at least ``max(0, mean)``, and (b) hand every rank a different reference point for what is
    meant to be one shared constant.

    Args:
        policy_kl_logps: ``[B_kl]`` summed log-probs of the mismatched completions under π_θ.
        ref_kl_logps: ``[B_kl]`` the same under π_ref.
        all_reduce_sum: optional collective applied to the 2-vector ``[sum, count]`` that returns
            its element-wise sum over ranks (e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``
            in Lightning). ``None`` means single process.

    Returns:
        A detached 0-dim tensor ``≥ 0`` in the dtype of ``policy_kl_logps`` (accumulated in at least
        float32). An empty KL batch on every rank gives 0.
    """
    if policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.dim() != 1:
        raise ValueError(
            "policy_kl_logps and ref_kl_logps must share one 1-D [B_kl] shape, got "
            f"{tuple(policy_kl_logps.shape)} and {tuple(ref_kl_logps.shape)}"
        )
    with torch.no_grad():
        # At least float32: a bf16 count is inexact above 256 and a bf16 sum drifts.
        dtype = torch.promote_types(policy_kl_logps.dtype, torch.float32)
        logratio = policy_kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)
        count = torch.tensor(float(logratio.numel()), dtype=dtype, device=logratio.device)
        totals = torch.stack([logratio.sum(), count])
        if all_reduce_sum is not None:
            totals = all_reduce_sum(totals)
        mean = totals[0] / totals[1].clamp(min=1)
        return mean.clamp(min=0).to(policy_kl_logps.dtype)


def kto_weight_ratio_warning(labels: Tensor, config: KTOLossConfig) -> str | None:
    """Warn when the weighted class balance λ_D·n_D / (λ_U·n_U) leaves [1, 4/3].

    Ethayarajh et al. 2024 (§4) recommend choosing λ_D, λ_U so that
    ``λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]``, where n_D, n_U count desirable and undesirable examples.
    The advice concerns the dataset, so pass the labels of the whole training set (or a large
    sample); a single micro-batch is too noisy.

    Args:
        labels: bool tensor of any shape, ``True`` for desirable examples.
        config: the λ weights to check.

    Returns:
        ``None`` when the ratio lies in [1, 4/3] (inclusive), else a message with the counts, the
        ratio and the ``desirable_weight`` range that would satisfy the rule.
    """
    n_desirable = int(labels.bool().sum().item())
    n_undesirable = labels.numel() - n_desirable
    lam_d, lam_u = config.desirable_weight, config.undesirable_weight
    counts = f"n_desirable={n_desirable}, n_undesirable={n_undesirable}, λ_D={lam_d:g}, λ_U={lam_u:g}"
    if n_desirable == 0 or n_undesirable == 0:
        return (
            f"KTO weight ratio λ_D·n_D/(λ_U·n_U) is undefined or degenerate ({counts}): the data "
            "holds a single class, so no choice of desirable_weight/undesirable_weight reaches the "
            "recommended range [1, 4/3] (Ethayarajh et al. 2024)."
        )
    weighted_d, weighted_u = lam_d * n_desirable, lam_u * n_undesirable
    # Cross-multiplied so that boundary cases such as exactly 4/3 are not lost to rounding.
    if weighted_u <= weighted_d and 3.0 * weighted_d <= 4.0 * weighted_u:
        return None
    low = lam_u * n_undesirable / n_desirable
    return (
        f"KTO weight ratio λ_D·n_D/(λ_U·n_U) = {weighted_d / weighted_u:.4g} ({counts}) is outside "
        f"the recommended range [1, 4/3] (Ethayarajh et al. 2024); with λ_U={lam_u:g} set "
        f"desirable_weight within [{low:.4g}, {low * _RATIO_HIGH:.4g}]."
    )


# ----------------------------------------------------------------------------------------------
# BCO
# ----------------------------------------------------------------------------------------------


class RunningMean:
    """Cumulative mean of every value seen so far; BCO's reward shift δ.

    Jung et al. 2024 shift the implicit reward by δ, an estimate of the mean reward kept as a
    running average over training, so that the binary classifier's decision boundary follows the
    rewards as they drift. The state is two Python numbers (sum in double precision and count):
    device-free, exact across many updates and trivially checkpointable. Before any update the
    value is 0, i.e. BCO starts unshifted.

    Distributed use: reduce ``values.sum()`` and ``values.numel()`` across ranks yourself and call
    :meth:`update_from_totals`, so that every rank holds the same δ. :meth:`update` is the
    single-process shortcut. Both read the values back to the host (one device sync per call).
    """

    def __init__(self) -> None:
        self._total = 0.0
        self._count = 0

    def update(self, values: Tensor) -> None:
        """Accumulate the local ``values`` (any shape; detached, summed in float64)."""
        values = values.detach()
        self.update_from_totals(values.to(torch.float64).sum(), values.numel())

    def update_from_totals(self, total: Tensor | float, count: Tensor | int) -> None:
        """Accumulate a pre-reduced ``total`` (sum of values) over ``count`` values."""
        total_f = float(total.detach().item() if isinstance(total, Tensor) else total)
        count_f = float(count.detach().item() if isinstance(count, Tensor) else count)
        if not count_f.is_integer() or count_f < 0:
            raise ValueError(f"count must be a non-negative integer, got {count_f!r}")
        if not math.isfinite(total_f):
            raise ValueError(
                f"total must be finite, got {total_f!r}; a NaN/inf reward would poison δ forever"
            )
        self._total += total_f
        self._count += int(count_f)

    @property
    def count(self) -> int:
        """Number of values accumulated so far."""
        return self._count

    @property
    def value(self) -> Tensor:
        """The current mean as a 0-dim float64 CPU tensor (0 before any value was seen).

        A 0-dim CPU tensor combines with tensors on any device and takes their dtype.
        """
        mean = self._total / self._count if self._count else 0.0
        return torch.tensor(mean, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints."""
        return {"total": self._total, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        missing = {"total", "count"} - set(state)
        if missing:
            raise ValueError(
                f"RunningMean state is missing keys {sorted(missing)}; expected 'total' and 'count'"
            )
        total, count = state["total"], state["count"]
        total_f = float(total.item() if isinstance(total, Tensor) else total)
        count_f = float(count.item() if isinstance(count, Tensor) else count)
        if not count_f.is_integer() or count_f < 0:
            raise ValueError(f"RunningMean count must be a non-negative integer, got {count!r}")
        self._total, self._count = total_f, int(count_f)

    def __repr__(self) -> str:
        return f"RunningMean(value={self.value.item():.6g}, count={self._count})"


@dataclass
class BCOLossOutput:
    """Result of :func:`bco_loss`.

    Attributes:
        losses: ``[B]`` per-example binary cross-entropy losses.
        chosen_rewards: ``[n_desirable]`` detached β·r of the desirable rows (unshifted).
        rejected_rewards: ``[n_undesirable]`` detached β·r of the undesirable rows (unshifted).
            Concatenated, these are what the caller feeds to :class:`RunningMean` to update δ.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def bco_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    delta: Tensor,
    beta: float,
) -> BCOLossOutput:
    """Per-example BCO loss (Jung et al. 2024).

    The implicit reward ``r_θ = β·(log π_θ(y|x) − log π_ref(y|x))`` is the logit of a binary
    classifier "is this completion desirable?", shifted by δ::

        desirable:    −log σ(r_θ − δ)
        undesirable:  −log σ(−(r_θ − δ))

    This is binary cross-entropy with logit ``r_θ − δ``; Jung et al. show that the BCE loss
    upper-bounds the DPO loss and introduce δ to narrow the gap between the two.

    Args:
        policy_logps: ``[B]`` summed completion log-probs under the policy.
        ref_logps: ``[B]`` the same under the frozen reference model.
        labels: ``[B]`` bool, ``True`` for desirable completions.
        delta: scalar reward shift, usually :attr:`RunningMean.value`; detached here (it is a
            statistic of past rewards, not a function of the current parameters).
        beta: β > 0.

    Returns:
        :class:`BCOLossOutput` with un-reduced ``[B]`` losses.
    """
    _require_positive("beta", beta)
    _check_unpaired_inputs(policy_logps, ref_logps, labels)
    if delta.numel() != 1:
        raise ValueError(f"delta must be a scalar tensor, got shape {tuple(delta.shape)}")
    shift = delta.detach().reshape(()).to(device=policy_logps.device, dtype=policy_logps.dtype)

    rewards = beta * (policy_logps - ref_logps)
    logits = rewards - shift
    # logsigmoid rather than log(σ(·)): exact for large |logit| where σ underflows to 0.
    losses = -F.logsigmoid(torch.where(labels, logits, -logits))

    detached = rewards.detach()
    return BCOLossOutput(losses=losses, chosen_rewards=detached[labels], rejected_rewards=detached[~labels])
