"""Group-relative policy optimisation: group advantages, RLOO baselines and the GRPO loss family.

References:
    Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
    Language Models" (GRPO, eq. 3; k3 KL estimator, eq. 4; outcome advantages, §4.1.2).
    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO:
    no length or std normalisation).
    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"
    (clip-higher, §3.1; token-level loss, §3.3).
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
    from Human Feedback in LLMs" (RLOO; the leave-one-out baseline of Kool et al. 2019).

Layout: a batch of ``P`` prompts with ``G`` generations each is flat, ``[P·G]``, with the
generations of one prompt adjacent: row ``j`` belongs to prompt ``j // G``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lit_pref.losses.ppo import clipped_policy_loss, kl_penalty
from lit_pref.ops import masked_mean, masked_sum

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]

LOSS_TYPES: tuple[str, ...] = get_args(LossType)
SCALE_REWARDS: tuple[str, ...] = get_args(ScaleRewards)
# TRL's GRPOConfig also takes scale_rewards as a bool; these are the scalings it means.
SCALE_REWARDS_ALIASES: dict[bool, ScaleRewards] = {True: "group", False: "none"}


def resolve_scale_rewards(value: ScaleRewards | bool) -> ScaleRewards:
    """``scale_rewards`` as one of :data:`SCALE_REWARDS`, with TRL's bool spellings mapped."""
    if isinstance(value, bool):
        return SCALE_REWARDS_ALIASES[value]
    if value not in SCALE_REWARDS:
        raise ValueError(
            f"unknown scale_rewards {value!r}; expected one of {SCALE_REWARDS} (or true / false)"
        )
    return value


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    """``[P·G]`` → ``[P, G]`` following the adjacent-generations layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat [P·G] tensor, got shape {tuple(rewards.shape)}")
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 for a group baseline, got {num_generations}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {num_generations}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, num_generations)


@dataclass
class GroupAdvantages:
    """Result of :func:`group_advantages`.

    Attributes:
        advantages: ``[P·G]`` one advantage per completion, broadcast to all its tokens.
        group_std: ``[P]`` (unbiased) standard deviation of each prompt's rewards, whatever the
            scaling, for logging.
        zero_std_groups: number of prompts whose generations all got the same reward; their
            advantages are exactly 0, so they contribute no policy gradient (DAPO §3.2 filters
            them out by dynamic sampling; at least the caller can warn).
    """

    advantages: Tensor
    group_std: Tensor
    zero_std_groups: int


def group_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: ScaleRewards | bool = "group", eps: float = 1e-4
) -> GroupAdvantages:
    """Group-relative outcome advantages ``A_i = (r_i − mean_group(r)) / (σ + eps)``.

    * ``"group"``: σ is the std of the prompt's own group (Shao et al. 2024, §4.1.2).
    * ``"batch"``: σ is the std of all rewards in the batch: still centred per prompt, but
      groups with a small spread (very easy or very hard prompts) are not up-weighted.
    * ``"none"``: no scaling (Liu et al. 2025, Dr. GRPO: the std division is a
      question-level difficulty bias).

    Stds are Bessel-corrected (unbiased), matching ``torch.std``.

    Args:
        rewards: ``[P·G]`` scalar reward per completion, generations of a prompt adjacent.
        num_generations: G ≥ 2.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"`` (TRL's ``True`` / ``False``: group / none).
        eps: added to the std in the denominator so zero-spread groups stay finite.

    Returns:
        :class:`GroupAdvantages`; ``advantages`` are detached.
    """
    scale_rewards = resolve_scale_rewards(scale_rewards)
    with torch.no_grad():
        grouped = _grouped(rewards.detach(), num_generations)
        group_std = grouped.std(dim=1)
        # Equality of max and min is exact; a std computed in floating point may not be 0.
        zero_spread = grouped.amax(dim=1) == grouped.amin(dim=1)
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        centred = torch.where(zero_spread[:, None], torch.zeros_like(centred), centred)
        if scale_rewards == "group":
            centred = centred / (group_std[:, None] + eps)
        elif scale_rewards == "batch":
            centred = centred / (grouped.std() + eps)
    return GroupAdvantages(centred.reshape(-1), group_std, int(zero_spread.sum()))


def rloo_advantages(rewards: Tensor, num_generations: int) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024; Kool et al. 2019).

    Each sample's baseline is the mean reward of the other ``G − 1`` samples of its prompt, which
    keeps the baseline independent of the sample and the estimator unbiased:
    ``A_i = r_i − (Σ_j r_j − r_i)/(G − 1) = G/(G − 1) · (r_i − mean(r))``.

    Args:
        rewards: ``[P·G]`` scalar reward per completion, generations of a prompt adjacent.
        num_generations: G ≥ 2 (a leave-one-out baseline needs another sample).

    Returns:
        ``[P·G]`` detached advantages.
    """
    with torch.no_grad():
        grouped = _grouped(rewards.detach(), num_generations)
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        return (centred * (num_generations / (num_generations - 1))).reshape(-1)


@dataclass
class GRPOLossOutput:
    """Result of :func:`grpo_policy_loss`.

    Attributes:
        loss: scalar to minimise.
        per_token_loss: ``[B, T]`` clipped surrogate plus β·KL, 0 at masked positions.
        kl_mean: detached masked mean of the k3 KL estimate (0 when β = 0).
        clip_frac_low: detached fraction of tokens clipped at ``1 − ε_low`` (with A < 0).
        clip_frac_high: detached fraction of tokens clipped at ``1 + ε_high`` (with A > 0).
        clip_frac_region: detached fraction of tokens clipped on either side (the sum of the two).
    """

    loss: Tensor
    per_token_loss: Tensor
    kl_mean: Tensor
    clip_frac_low: Tensor
    clip_frac_high: Tensor
    clip_frac_region: Tensor


def grpo_policy_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: LossType = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
) -> GRPOLossOutput:
    """The GRPO clipped objective with a KL penalty and a choice of normalisation.

    Per token (Shao et al. 2024, eq. 3, with DAPO's asymmetric clip range, Yu et al. 2025 §3.1):
    ``ℓ_{i,t} = −min(ρ A_i, clip(ρ, 1 − ε_low, 1 + ε_high) A_i) + β k3_{i,t}`` with
    ``ρ = π/π_old`` and ``k3 = exp(ref − logp) − (ref − logp) − 1`` (eq. 4). The
    normalisations, for ``B`` sequences of ``|o_i|`` completion tokens:

    * ``"grpo"``: ``(1/B) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}`` (Shao et al. 2024). Tokens of short
      completions weigh more, which favours short correct and long wrong answers (Liu et al.
      2025).
    * ``"bnpo"``: ``Σ_{i,t} ℓ_{i,t} / Σ_i |o_i|`` over this (micro-)batch: every token of the
      batch weighs the same.
    * ``"dapo"``: ``Σ_{i,t} ℓ_{i,t} / N`` with ``N`` the number of completion tokens of the
      whole *global* batch (Yu et al. 2025, §3.3). Without ``num_items_in_batch`` it equals
      ``"bnpo"``; the difference is that DAPO's count spans all gradient-accumulation steps and
      ranks, so summing the micro-batch losses gives the exact token-level mean, whereas
      ``"bnpo"`` averages per micro-batch and micro-batches of different length then weigh
      their tokens differently.
    * ``"dr_grpo"``: ``Σ_{i,t} ℓ_{i,t} / (B · L_max)`` (Liu et al. 2025): a constant normaliser,
      so no sequence length enters the weighting.

    Args:
        logps: ``[B, T]`` log π of the completion tokens under the current policy.
        old_logps: ``[B, T]`` log π_old under the rollout policy, or ``None`` for a single
            update per rollout, where π_old = π (ρ = 1 with the gradient of log π).
        ref_logps: ``[B, T]`` log π_ref; ignored (may be ``None``) when β = 0.
        advantages: ``[B]`` per-completion advantages (see :func:`group_advantages`).
        mask: ``[B, T]`` completion mask.
        loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"`` or ``"dapo"``.
        epsilon_low: ε_low ≥ 0.
        epsilon_high: ε_high ≥ 0.
        beta: KL coefficient β ≥ 0.
        max_completion_length: L_max, required by ``"dr_grpo"``.
        num_items_in_batch: completion tokens in the global batch, used only by ``"dapo"``.

    Returns:
        :class:`GRPOLossOutput`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
    keep = mask.bool()
    if old_logps is None:
        old_logps = logps.detach()
    policy = clipped_policy_loss(logps, old_logps, advantages, keep, epsilon_low, epsilon_high)
    per_token_loss = policy.per_token_loss
    kl_mean = torch.zeros((), dtype=logps.dtype, device=logps.device)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError(f"beta={beta} needs ref_logps")
        # Masked positions are replaced before exp so padded garbage cannot reach the gradient.
        safe_logps = torch.where(keep, logps, torch.zeros_like(logps))
        safe_ref = torch.where(keep, ref_logps.detach(), torch.zeros_like(logps))
        kl = torch.where(keep, kl_penalty(safe_logps, safe_ref, "k3"), torch.zeros_like(logps))
        per_token_loss = per_token_loss + beta * kl
        kl_mean = masked_mean(kl.detach(), keep)

    total = masked_sum(per_token_loss, keep)
    if loss_type == "grpo":
        loss = masked_mean(per_token_loss, keep, dim=-1).mean()
    elif loss_type == "dr_grpo":
        assert max_completion_length is not None  # checked on entry
        loss = total / (logps.shape[0] * max_completion_length)
    elif loss_type == "dapo" and num_items_in_batch is not None:
        count = torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
        loss = total / count.clamp(min=1)
    else:
        loss = total / keep.sum().clamp(min=1)
    return GRPOLossOutput(
        loss=loss,
        per_token_loss=per_token_loss,
        kl_mean=kl_mean,
        clip_frac_low=policy.clip_frac_low,
        clip_frac_high=policy.clip_frac_high,
        clip_frac_region=policy.clip_frac_low + policy.clip_frac_high,
    )


@dataclass(frozen=True)
class GRPOLossConfig:
    """Validated hyper-parameters of the GRPO loss family.

    Defaults follow Shao et al. 2024 (ε = 0.2, β = 0.04, group-std scaling, per-sequence mean);
    DAPO is ``loss_type="dapo", epsilon_high=0.28, beta=0``, Dr. GRPO is
    ``loss_type="dr_grpo", scale_rewards="none", beta=0`` with ``max_completion_length`` set.
    """

    loss_type: LossType = "grpo"
    num_generations: int = 8
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.04
    scale_rewards: ScaleRewards = "group"
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        # Frozen dataclass: TRL's bool spellings become the named scaling.
        object.__setattr__(self, "scale_rewards", resolve_scale_rewards(self.scale_rewards))
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 for a group baseline, got {self.num_generations}")
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError(
                f"epsilon_low and epsilon_high must be >= 0, got {self.epsilon_low} and {self.epsilon_high}"
            )
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`grpo_policy_loss` taken from this config."""
        return {
            "loss_type": self.loss_type,
            "epsilon_low": self.epsilon_low,
            "epsilon_high": self.epsilon_high,
            "beta": self.beta,
            "max_completion_length": self.max_completion_length,
        }
