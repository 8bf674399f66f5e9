"""The pairwise (Bradley–Terry) reward-model loss, with Llama 2's margin and reward centring.

A reward model r(x, y) is trained so that the probability that ``y_c`` is preferred to ``y_r``
under the Bradley–Terry model, σ(r(x, y_c) − r(x, y_r)), matches the labels: the loss is the
negative log-likelihood of the observed preference.

References:
    Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
    (arXiv:2203.02155), Eq. 1: loss(θ) = −E[log σ(r_θ(x, y_w) − r_θ(x, y_l))].
    Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models"
    (arXiv:2307.09288), Eq. 2: −log σ(r_θ(x, y_c) − r_θ(x, y_r) − m(r)), with a margin m(r)
    that grows with how strongly the annotators preferred y_c.
    Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not
    Eliminate Reward Hacking" (arXiv:2312.09244), §3: an auxiliary loss that pins the rewards'
    mean near zero, coefficient · (r(x, y_c) + r(x, y_r))², since the Bradley–Terry loss is
    blind to a constant shift.

Conventions: inputs are ``[B]`` rewards; losses are returned per example and never reduced; the
diagnostics are detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

__all__ = ["RewardLossOutput", "reward_loss"]


@dataclass
class RewardLossOutput:
    """Result of :func:`reward_loss`.

    Attributes:
        losses: ``[B]`` per-example losses (Bradley–Terry term + centring term).
        accuracies: ``[B]`` detached 1.0 where r_c > r_r, else 0.0 (a tie counts as wrong).
        margins: ``[B]`` detached r_c − r_r.
    """

    losses: Tensor
    accuracies: Tensor
    margins: Tensor


def reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> RewardLossOutput:
    """Per-example pairwise reward loss.

    ``loss_i = −log σ(r_c,i − r_r,i − m_i) + c · (r_c,i + r_r,i)²``

    The first term is Ouyang et al. 2022, Eq. 1 (with ``m = 0``) and Touvron et al. 2023, Eq. 2
    (with a margin); the second is the reward-centring term of Eisenstein et al. 2023 (its batch
    mean is ``c · mean((r_c + r_r)²)``).

    Args:
        chosen_rewards: ``[B]`` r(x, y_c).
        rejected_rewards: ``[B]`` r(x, y_r).
        margin: ``[B]`` per-pair margin m ≥ 0 (``None``: no margin). A larger margin asks for a
            larger reward gap before the pair stops contributing.
        center_rewards_coefficient: c ≥ 0 (``None`` or 0: no centring term).

    Returns:
        :class:`RewardLossOutput` with un-reduced ``[B]`` losses.
    """
    if chosen_rewards.dim() != 1 or rejected_rewards.shape != chosen_rewards.shape:
        raise ValueError(
            "chosen_rewards and rejected_rewards must share one 1-D [B] shape, got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    if margin is not None and margin.shape != chosen_rewards.shape:
        raise ValueError(f"margin must have shape {tuple(chosen_rewards.shape)}, got {tuple(margin.shape)}")
    if center_rewards_coefficient is not None and not (
        math.isfinite(center_rewards_coefficient) and center_rewards_coefficient >= 0
    ):
        raise ValueError(
            f"center_rewards_coefficient must be a finite number >= 0, got {center_rewards_coefficient!r}"
        )
    gap = chosen_rewards - rejected_rewards
    logits = gap if margin is None else gap - margin.to(gap.dtype)
    # logsigmoid is exact for large |logits| (no log(0) when the gap is very negative).
    losses = -F.logsigmoid(logits)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards).square()
    return RewardLossOutput(
        losses=losses,
        accuracies=(gap > 0).to(gap.dtype).detach(),
        margins=gap.detach(),
    )
