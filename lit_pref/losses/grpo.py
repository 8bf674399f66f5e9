"""Group-relative policy optimisation: advantages (group, RLOO, REINFORCE++, GDPO) and the GRPO loss family.

References:
    Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
    Language Models" (GRPO, eq. 3; k3 KL estimator, eq. 4; outcome advantages, §4.1.2).
    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO:
    no length or std normalisation).
    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"
    (clip-higher, §3.1; token-level loss, §3.3).
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
    from Human Feedback in LLMs" (RLOO; the leave-one-out baseline of Kool et al. 2019; the
    sequence KL in the reward).
    Zheng et al. 2025, "Group Sequence Policy Optimization" (arXiv:2507.18071; GSPO's
    length-normalised sequence importance ratio).
    MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention"
    (arXiv:2506.13585; CISPO), in the capped form of Khatri et al. 2025, "The Art of Scaling
    Reinforcement Learning Compute for LLMs" (arXiv:2510.13786, ScaleRL).
    Gao et al. 2025, "Soft Adaptive Policy Optimization" (arXiv:2511.20347; SAPO).
    Prime Intellect 2025, "INTELLECT-2: A Reasoning Model Trained Through Globally Decentralized
    Reinforcement Learning" (arXiv:2505.07291; two-sided clipping δ).
    Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
    Reinforcement Learning for LLM Reasoning" (arXiv:2506.01939; top-entropy token masking).
    Hu et al. 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and
    Reward Models" (arXiv:2501.03262; REINFORCE++ and REINFORCE++-baseline).
    "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL
    Optimization" (arXiv:2601.05242; each reward normalised per group before the sum).
    Mnih et al. 2016, "Asynchronous Methods for Deep Reinforcement Learning" (§4: the entropy
    bonus added to the policy objective).

Layout: a batch of ``P`` prompts with ``G`` generations each is flat, ``[P·G]``, with the
generations of one prompt adjacent: row ``j`` belongs to prompt ``j // G``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lit_pref.losses.ppo import kl_penalty, token_rewards
from lit_pref.ops import masked_mean, masked_sum, masked_whiten

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceSamplingLevel = Literal["token", "sequence"]
MultiObjectiveAggregation = Literal["sum_then_normalize", "normalize_then_sum"]
# How a loss type reduces its per-token terms (see grpo_policy_loss).
Aggregation = Literal["sequence_mean", "token_mean", "global_token_mean", "constant"]

SCALE_REWARDS: tuple[str, ...] = get_args(ScaleRewards)
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = get_args(ImportanceSamplingLevel)
MULTI_OBJECTIVE_AGGREGATIONS: tuple[str, ...] = get_args(MultiObjectiveAggregation)
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
    """``[P·G, ...]`` → ``[P, G, ...]`` following the adjacent-generations layout."""
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 for a group baseline, got {num_generations}")
    if rewards.shape[0] % num_generations:
        raise ValueError(f"{rewards.shape[0]} rewards cannot be split into groups of {num_generations}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, num_generations, *rewards.shape[1:])


def _flat_grouped(rewards: Tensor, num_generations: int) -> Tensor:
    """:func:`_grouped` of a flat ``[P·G]`` reward vector."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat [P·G] tensor, got shape {tuple(rewards.shape)}")
    return _grouped(rewards, num_generations)


def _group_centred(grouped: Tensor) -> tuple[Tensor, Tensor]:
    """``[P, G]`` rewards minus their group mean, and ``[P]`` whether each group has zero spread.

    Equality of max and min is exact, where a mean or std computed in floating point may not
    be: a zero-spread group is centred to exactly 0.
    """
    zero_spread = grouped.amax(dim=1) == grouped.amin(dim=1)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return torch.where(zero_spread[:, None], torch.zeros_like(centred), centred), zero_spread


@dataclass
class GroupAdvantages:
    """Result of :func:`group_advantages` and :func:`decoupled_advantages`.

    Attributes:
        advantages: ``[P·G]`` one advantage per completion, broadcast to all its tokens.
        group_std: ``[P]`` (unbiased) standard deviation of each prompt's rewards, whatever the
            scaling, for logging.
        zero_std_groups: number of prompts whose generations all got the same reward; their
            group-relative advantages are exactly 0 (before the batch normalisation of
            :func:`decoupled_advantages`), so they carry no signal about which completion is
            better (DAPO §3.2 filters them out by dynamic sampling; at least the caller can warn).
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
        grouped = _flat_grouped(rewards.detach(), num_generations)
        group_std = grouped.std(dim=1)
        centred, zero_spread = _group_centred(grouped)
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
        grouped = _flat_grouped(rewards.detach(), num_generations)
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        return (centred * (num_generations / (num_generations - 1))).reshape(-1)


def batch_normalize(values: Tensor, eps: float = 1e-4) -> Tensor:
    """``(x − mean(x)) / (std(x) + eps)`` over the whole batch (unbiased std; 0 for a single value).

    RLOO's ``normalize_advantages`` (TRL's RLOOConfig) and the last step of
    :func:`decoupled_advantages`.
    """
    with torch.no_grad():
        values = values.detach()
        std = (
            values.std() if values.numel() > 1 else torch.zeros((), dtype=values.dtype, device=values.device)
        )
        return (values - values.mean()) / (std + eps)


def decoupled_advantages(
    rewards_per_func: Tensor, weights: Tensor, num_generations: int, eps: float = 1e-4
) -> GroupAdvantages:
    """GDPO-style advantages: each reward normalised within its group *before* the weighted sum.

    With rewards ``r_{i,k}`` of completion ``i`` from reward function ``k`` (arXiv:2601.05242):

    ``r̂_{i,k} = (r_{i,k} − mean_group(r_{·,k})) / (std_group(r_{·,k}) + eps)``,
    ``A_i = BN(Σ_k w_k r̂_{i,k})`` with ``BN(x) = (x − mean_batch(x)) / (std_batch(x) + eps)``.

    Summing first (:func:`group_advantages`) lets the reward with the largest spread drown the
    others; normalising each one first gives every reward the same say before its weight. Stds
    are unbiased. A reward a function did not give (NaN, its ``None``) stays out of its column's
    group statistics and of the sum; a column with fewer than two scored values in a group, or
    with zero spread there, contributes 0; a completion no function scored gets ``A = 0`` and
    stays out of the batch statistics.

    Args:
        rewards_per_func: ``[P·G, K]`` raw rewards, generations of a prompt adjacent, NaN where unscored.
        weights: ``[K]`` weight of each reward function.
        num_generations: G ≥ 2.
        eps: added to each std.

    Returns:
        :class:`GroupAdvantages` (``group_std`` and ``zero_std_groups`` of the summed normalised rewards).
    """
    if rewards_per_func.dim() != 2 or weights.shape != (rewards_per_func.shape[1],):
        raise ValueError(
            f"rewards_per_func must be [N, K] with one weight per column, got {tuple(rewards_per_func.shape)} "
            f"and weights {tuple(weights.shape)}"
        )
    with torch.no_grad():
        grouped = _grouped(rewards_per_func.detach(), num_generations)  # [P, G, K]
        scored = ~grouped.isnan()
        count = scored.sum(1, keepdim=True)
        values = torch.where(scored, grouped, torch.zeros_like(grouped))
        mean = values.sum(1, keepdim=True) / count.clamp(min=1)
        deviation = torch.where(scored, grouped - mean, torch.zeros_like(grouped))
        std = (deviation.square().sum(1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        spread = torch.where(scored, grouped, -math.inf).amax(1, keepdim=True) > torch.where(
            scored, grouped, math.inf
        ).amin(1, keepdim=True)
        usable = scored & (count >= 2) & spread
        normalised = torch.where(usable, deviation / (std + eps), torch.zeros_like(grouped))
        summed = (normalised * weights.to(normalised)).sum(-1)  # [P, G]
        any_scored = scored.any(-1).reshape(-1)
        flat = summed.reshape(-1)
        advantages = torch.zeros_like(flat)
        advantages[any_scored] = batch_normalize(flat[any_scored], eps)
        zero_spread = summed.amax(1) == summed.amin(1)
    return GroupAdvantages(advantages, summed.std(dim=1), int(zero_spread.sum()))


def reinforce_plus_plus_advantages(
    scores: Tensor,
    mask: Tensor,
    *,
    num_generations: int | None = None,
    token_kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """REINFORCE++ token advantages (Hu et al. 2025): KL-shaped returns, normalised over the batch.

    Per token ``r_t = −β·KL_t + 1[t = |o|]·(score − b)``, return ``G_t = Σ_{s≥t} r_s`` (γ = 1),
    and ``A_t = (G_t − μ) / σ`` with μ, σ (unbiased) over every completion token of the batch
    (global advantage normalisation in place of a critic). ``b = 0`` is REINFORCE++; with
    ``num_generations``, ``b`` is the mean score of the prompt's group (REINFORCE++-baseline,
    which the paper pairs with a KL term in the loss rather than in the reward; exactly equal
    scores in a group centre to 0). Without ``token_kl`` every token of a completion gets the
    same return, its (centred) score.

    Args:
        scores: ``[N]`` scalar reward per completion, generations of a prompt adjacent.
        mask: ``[N, T]`` the completion tokens (the normalisation runs over these).
        num_generations: G ≥ 2 for the group-mean baseline; ``None`` for none.
        token_kl: ``[N, T]`` per-token KL estimates (e.g. k1 of the rollout policy against the
            reference), or ``None``.
        kl_coef: β ≥ 0 of the KL in the reward.

    Returns:
        ``[N, T]`` detached advantages, 0 at masked positions.
    """
    keep = mask.bool()
    with torch.no_grad():
        scores = scores.detach().float() if not scores.is_floating_point() else scores.detach()
        if num_generations is not None:
            scores = _group_centred(_flat_grouped(scores, num_generations))[0].reshape(-1)
        kl = (
            torch.zeros(keep.shape, dtype=scores.dtype, device=keep.device)
            if token_kl is None
            else token_kl.detach()
        )
        rewards = token_rewards(scores.to(keep.device), kl, keep, kl_coef)
        returns = rewards.flip(-1).cumsum(-1).flip(-1)
        return masked_whiten(returns, keep)


def top_entropy_mask(
    entropy: Tensor, mask: Tensor, top_quantile: float, pooled: Tensor | None = None
) -> Tensor:
    """The completion tokens whose entropy is in the top ``top_quantile`` (Wang et al. 2025).

    Keeps the tokens with ``H_t ≥ quantile(H, 1 − ρ)``, the (linearly interpolated) quantile of
    the entropies of the batch's completion tokens: the few high-entropy "forking" tokens
    carry most of the useful policy gradient. ``ρ = 1`` keeps every token, ``ρ = 0`` only the
    highest-entropy one(s); the paper uses 0.2.

    Args:
        entropy: ``[B, T]`` per-token entropies of the policy.
        mask: ``[B, T]`` completion mask.
        top_quantile: ρ ∈ [0, 1].
        pooled: the entropies the quantile is taken over, when wider than this batch (every
            rank's completion tokens); default: ``entropy[mask]``.

    Returns:
        ``[B, T]`` bool mask, a subset of ``mask``.
    """
    if not 0.0 <= top_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {top_quantile}")
    keep = mask.bool()
    entropy = entropy.detach()
    values = entropy[keep] if pooled is None else pooled.detach()
    if values.numel() == 0:
        return torch.zeros_like(keep)
    # torch.quantile takes float32 / float64 only; lower precisions are promoted.
    threshold = torch.quantile(
        values.to(torch.promote_types(values.dtype, torch.float32)), 1.0 - top_quantile
    )
    return (entropy >= threshold) & keep


# ------------------------------------------------------------------------------ the policy loss


def importance_ratio(
    logps: Tensor, old_logps: Tensor, mask: Tensor, level: ImportanceSamplingLevel = "token"
) -> Tensor:
    """The importance ratio of the rollout's tokens under π against π_old.

    * ``"token"``: ``ρ_{i,t} = π(o_{i,t}) / π_old(o_{i,t})``, ``[B, T]`` (PPO, GRPO).
    * ``"sequence"``: ``s_i = (π(o_i) / π_old(o_i))^{1/|o_i|} = exp((1/|o_i|) Σ_t log ρ_{i,t})``,
      ``[B, 1]`` (Zheng et al. 2025, GSPO): one length-normalised ratio per sequence, matching
      the unit of the sequence-level reward, so a few off-policy tokens cannot blow up the
      variance of a long completion's update.

    π_old is a constant; masked positions contribute nothing.
    """
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {level!r}; expected one of {IMPORTANCE_SAMPLING_LEVELS}"
        )
    keep = mask.bool()
    log_ratio = torch.where(keep, logps - old_logps.detach(), torch.zeros_like(logps))
    if level == "sequence":
        log_ratio = masked_mean(log_ratio, keep, dim=-1)[:, None]
    return torch.exp(log_ratio)


@dataclass(frozen=True)
class SurrogateParams:
    """The hyper-parameters of the per-token surrogates (each surrogate reads its own).

    Attributes:
        epsilon_low: ε_low of the clip range (clipped).
        epsilon_high: ε_high of the clip range (clipped); CISPO's cap ε_max on the weight.
        delta: δ, the two-sided clip's cap on the ratio of negative-advantage tokens (clipped;
            ``None``: off).
        sapo_temperature_pos: SAPO's τ for tokens with A > 0.
        sapo_temperature_neg: SAPO's τ for tokens with A ≤ 0.
    """

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


@dataclass
class SurrogateTerms:
    """Per-token surrogate loss and its clip indicators, broadcastable to ``[B, T]``."""

    loss: Tensor
    clipped_low: Tensor
    clipped_high: Tensor


def clipped_surrogate(
    ratio: Tensor, logps: Tensor, advantages: Tensor, params: SurrogateParams
) -> SurrogateTerms:
    """``ℓ = −min(min(ρ, δ)·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)``.

    Without δ this is PPO's clipped objective (Schulman et al. 2017, eq. 7; Shao et al. 2024,
    eq. 3) with DAPO's asymmetric range (Yu et al. 2025, §3.1). For A < 0 the unclipped branch
    ``ρ·|A|`` is unbounded as ρ grows; δ > 1 + ε_high caps it (INTELLECT-2's two-sided
    clipping), so a token whose probability has already risen far cannot produce a huge update.
    A token is counted as clipped low when ρ < 1 − ε_low with A < 0, high when ρ > 1 + ε_high
    with A > 0 (the regions where the clipped branch is active and the gradient is 0).
    """
    clipped = ratio.clamp(1.0 - params.epsilon_low, 1.0 + params.epsilon_high)
    capped = ratio if params.delta is None else ratio.clamp(max=params.delta)
    loss = -torch.minimum(capped * advantages, clipped * advantages)
    return SurrogateTerms(
        loss,
        (ratio < 1.0 - params.epsilon_low) & (advantages < 0),
        (ratio > 1.0 + params.epsilon_high) & (advantages > 0),
    )


def cispo_surrogate(
    ratio: Tensor, logps: Tensor, advantages: Tensor, params: SurrogateParams
) -> SurrogateTerms:
    """CISPO: ``ℓ = −sg(min(ρ, ε_max))·A·log π`` with ``ε_max = epsilon_high``.

    MiniMax 2025 clip the importance-sampling *weight* and stop its gradient instead of clipping
    the update: every token keeps its REINFORCE gradient ``A·∇log π``, scaled by the capped
    weight, where PPO clipping drops tokens outside the trust region (often the rare
    reasoning-fork tokens). The cap is an absolute bound on ρ (ScaleRL's form, e.g. 5), not
    ``1 + ε``. Counted as clipped high: ρ > ε_max with A > 0.
    """
    weight = ratio.detach().clamp(max=params.epsilon_high)
    loss = -weight * advantages * logps
    high = (ratio > params.epsilon_high) & (advantages > 0)
    return SurrogateTerms(loss, torch.zeros_like(high), high)


def sapo_surrogate(
    ratio: Tensor, logps: Tensor, advantages: Tensor, params: SurrogateParams
) -> SurrogateTerms:
    """SAPO: ``ℓ = −f(ρ)·A`` with the soft gate ``f(ρ) = (4/τ)·σ(τ(ρ − 1))`` (Gao et al. 2025).

    ``f′(ρ) = 4σ′(τ(ρ − 1))`` is 1 at ρ = 1, so on-policy the gradient is the plain policy
    gradient, and it decays smoothly as ρ leaves 1 instead of dropping to 0 at a hard clip
    edge. ``τ = τ_pos`` for A > 0 and ``τ_neg`` otherwise; a larger τ_neg damps off-policy
    negative-advantage tokens faster (they destabilise training more). Nothing is clipped.
    """
    tau = torch.where(advantages > 0, ratio.new_tensor(params.sapo_temperature_pos),
                      ratio.new_tensor(params.sapo_temperature_neg))  # fmt: skip
    loss = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * advantages
    none = torch.zeros(loss.shape, dtype=torch.bool, device=loss.device)
    return SurrogateTerms(loss, none, none)


Surrogate = Callable[[Tensor, Tensor, Tensor, SurrogateParams], SurrogateTerms]


@dataclass(frozen=True)
class LossSpec:
    """What a ``loss_type`` is: its per-token surrogate and how the token terms are reduced."""

    surrogate: Surrogate
    aggregation: Aggregation


# The registry of loss types (TRL's GRPOConfig.loss_type names); validation reads it.
LOSS_SPECS: dict[str, LossSpec] = {
    "grpo": LossSpec(clipped_surrogate, "sequence_mean"),
    "bnpo": LossSpec(clipped_surrogate, "token_mean"),
    "dr_grpo": LossSpec(clipped_surrogate, "constant"),
    "dapo": LossSpec(clipped_surrogate, "global_token_mean"),
    "cispo": LossSpec(cispo_surrogate, "global_token_mean"),
    "sapo": LossSpec(sapo_surrogate, "sequence_mean"),
}
LOSS_TYPES: tuple[str, ...] = tuple(LOSS_SPECS)


def _fraction(flags: Tensor, keep: Tensor, dtype: torch.dtype) -> Tensor:
    """Detached share of completion tokens flagged, or of sequences when the flags are ``[B, 1]``."""
    with torch.no_grad():
        if flags.shape[-1] == 1 and keep.shape[-1] != 1:
            return masked_mean(flags[:, 0].to(dtype), keep.any(-1))
        return masked_mean(flags.expand_as(keep).to(dtype), keep)


def _aggregate(
    per_token_loss: Tensor,
    keep: Tensor,
    aggregation: Aggregation,
    max_completion_length: int | None,
    num_items_in_batch: int | float | Tensor | None,
) -> Tensor:
    if aggregation == "sequence_mean":
        return masked_mean(per_token_loss, keep, dim=-1).mean()
    total = masked_sum(per_token_loss, keep)
    if aggregation == "constant":
        assert max_completion_length is not None  # checked on entry
        return total / (per_token_loss.shape[0] * max_completion_length)
    if aggregation == "global_token_mean" and num_items_in_batch is not None:
        count = torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
        return total / count.clamp(min=1)
    return total / keep.sum().clamp(min=1)


@dataclass
class GRPOLossOutput:
    """Result of :func:`grpo_policy_loss`.

    Attributes:
        loss: scalar to minimise (entropy bonus included).
        per_token_loss: ``[B, T]`` surrogate plus β·KL, 0 at masked positions (and, for the
            surrogate, outside the top-entropy mask).
        kl_mean: detached masked mean of the k3 KL estimate (0 when β = 0).
        clip_frac_low: detached fraction of tokens clipped at ``1 − ε_low`` (with A < 0).
        clip_frac_high: detached fraction of tokens clipped at ``1 + ε_high`` (with A > 0); for
            CISPO, whose weight is capped at ε_max (with A > 0). Fractions of sequences when
            the ratio is per sequence.
        clip_frac_region: detached fraction of tokens clipped on either side (the sum of the two).
        policy_loss: detached loss without the entropy bonus.
    """

    loss: Tensor
    per_token_loss: Tensor
    kl_mean: Tensor
    clip_frac_low: Tensor
    clip_frac_high: Tensor
    clip_frac_region: Tensor
    policy_loss: Tensor


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
    importance_sampling_level: ImportanceSamplingLevel = "token",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    entropy: Tensor | None = None,
    entropy_mask: Tensor | None = None,
    entropy_coef: float = 0.0,
    sampler_weights: Tensor | None = None,
) -> GRPOLossOutput:
    """The GRPO family: a per-token surrogate, a KL penalty, a normalisation and an entropy bonus.

    Per token, ``ℓ_{i,t} = surrogate(ρ, A_i) + β k3_{i,t}`` with ``ρ`` the importance ratio
    (:func:`importance_ratio`: per token, or GSPO's per sequence) and
    ``k3 = exp(ref − logp) − (ref − logp) − 1`` (Shao et al. 2024, eq. 4). The surrogate and the
    normalisation are the ``loss_type``'s (:data:`LOSS_SPECS`):

    * ``"grpo"``: clipped (:func:`clipped_surrogate`), ``(1/B) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}``
      (Shao et al. 2024, eq. 3). Tokens of short completions weigh more, which favours short
      correct and long wrong answers (Liu et al. 2025).
    * ``"bnpo"``: clipped, ``Σ_{i,t} ℓ_{i,t} / Σ_i |o_i|`` over this (micro-)batch.
    * ``"dapo"``: clipped, ``Σ_{i,t} ℓ_{i,t} / N`` with ``N`` the number of completion tokens of
      the whole *global* batch (Yu et al. 2025, §3.3). Without ``num_items_in_batch`` it equals
      ``"bnpo"``; with it, summing the micro-batch losses gives the exact token-level mean over
      all gradient-accumulation steps and ranks.
    * ``"dr_grpo"``: clipped, ``Σ_{i,t} ℓ_{i,t} / (B · L_max)`` (Liu et al. 2025).
    * ``"cispo"``: :func:`cispo_surrogate`, normalised like ``"dapo"``.
    * ``"sapo"``: :func:`sapo_surrogate`, normalised like ``"grpo"``.

    With ``entropy_mask`` (:func:`top_entropy_mask`) the surrogate counts only on those tokens;
    the KL term and the normaliser still count every completion token. With ``entropy_coef``
    the loss is ``L − c·H̄`` (Mnih et al. 2016), ``H̄`` the mean entropy over the surrogate's
    tokens, not rescaled by the normalisation: the same ``c`` means the same for every loss type.
    Under the global-token normalisations with ``num_items_in_batch``, ``H̄`` is weighted by this
    micro-batch's share ``Σ_i |o_i| / N`` of the global tokens, so the accumulated bonus is a
    token-weighted mean over the micro-batches. With ``sampler_weights`` ``w_{i,t}``
    (:func:`~lit_pref.losses.sampler.truncated_is_weights`) the surrogate is ``w_{i,t}·ℓ_{i,t}``:
    the rollout engine's samples re-weighted to π_old; the KL term is not weighted (as TRL's
    ``vllm_importance_sampling_correction``).

    Args:
        logps: ``[B, T]`` log π of the completion tokens under the current policy.
        old_logps: ``[B, T]`` log π_old under the rollout policy, or ``None`` for a single
            update per rollout, where π_old = π (ρ = 1 with the gradient of log π).
        ref_logps: ``[B, T]`` log π_ref; ignored (may be ``None``) when β = 0.
        advantages: ``[B]`` per-completion advantages (:func:`group_advantages`…), or ``[B, T]``
            per-token ones (:func:`reinforce_plus_plus_advantages`).
        mask: ``[B, T]`` completion mask.
        loss_type: one of :data:`LOSS_TYPES`.
        epsilon_low: ε_low ≥ 0.
        epsilon_high: ε_high ≥ 0 (CISPO: the cap ε_max on the weight).
        beta: KL coefficient β ≥ 0.
        max_completion_length: L_max, required by ``"dr_grpo"``.
        num_items_in_batch: completion tokens in the global batch, used by ``"dapo"`` and ``"cispo"``.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        delta: δ of the two-sided clip (clipped loss types only), ``None`` for off.
        sapo_temperature_pos: SAPO's τ for A > 0.
        sapo_temperature_neg: SAPO's τ for A ≤ 0.
        entropy: ``[B, T]`` per-token entropies of π, required when ``entropy_coef`` ≠ 0 (with
            their gradient, for the bonus to act).
        entropy_mask: ``[B, T]`` bool, the tokens the surrogate counts (``None``: all).
        entropy_coef: c, the weight of the entropy bonus.
        sampler_weights: ``[B, T]`` detached per-token weights of the surrogate (``None``: 1).

    Returns:
        :class:`GRPOLossOutput`.
    """
    spec = LOSS_SPECS.get(loss_type)
    if spec is None:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if spec.aggregation == "constant" and max_completion_length is None:
        raise ValueError(f"loss_type {loss_type!r} needs max_completion_length")
    if delta is not None and spec.surrogate is not clipped_surrogate:
        raise ValueError(f"delta (two-sided clipping) applies to the clipped loss types, not {loss_type!r}")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy")
    keep = mask.bool()
    # Masked positions may hold anything; they are replaced before any arithmetic.
    safe_logps = torch.where(keep, logps, torch.zeros_like(logps))
    old = (
        safe_logps.detach()
        if old_logps is None
        else torch.where(keep, old_logps.detach(), torch.zeros_like(logps))
    )
    ratio = importance_ratio(safe_logps, old, keep, importance_sampling_level)
    adv = advantages.detach()
    adv = adv[:, None] if adv.dim() == 1 else adv
    params = SurrogateParams(epsilon_low, epsilon_high, delta, sapo_temperature_pos, sapo_temperature_neg)
    terms = spec.surrogate(ratio, safe_logps, adv, params)
    policy_keep = keep if entropy_mask is None else keep & entropy_mask.bool()
    per_token_loss = torch.where(policy_keep, terms.loss.expand_as(logps), torch.zeros_like(logps))
    if sampler_weights is not None:
        per_token_loss = per_token_loss * sampler_weights.detach()
    kl_mean = torch.zeros((), dtype=logps.dtype, device=logps.device)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError(f"beta={beta} needs ref_logps")
        safe_ref = torch.where(keep, ref_logps.detach(), torch.zeros_like(logps))
        kl = torch.where(keep, kl_penalty(safe_logps, safe_ref, "k3"), torch.zeros_like(logps))
        per_token_loss = per_token_loss + beta * kl
        kl_mean = masked_mean(kl.detach(), keep)

    loss = _aggregate(per_token_loss, keep, spec.aggregation, max_completion_length, num_items_in_batch)
    policy_loss = loss.detach()
    if entropy_coef != 0.0:
        assert entropy is not None  # checked on entry
        mean_entropy = masked_mean(entropy, policy_keep)
        if spec.aggregation == "global_token_mean" and num_items_in_batch is not None:
            count = torch.as_tensor(num_items_in_batch, dtype=mean_entropy.dtype, device=mean_entropy.device)
            mean_entropy = mean_entropy * keep.sum() / count.clamp(min=1)
        loss = loss - entropy_coef * mean_entropy
    low = _fraction(terms.clipped_low, keep, logps.dtype)
    high = _fraction(terms.clipped_high, keep, logps.dtype)
    return GRPOLossOutput(
        loss=loss,
        per_token_loss=per_token_loss,
        kl_mean=kl_mean,
        clip_frac_low=low,
        clip_frac_high=high,
        clip_frac_region=low + high,
        policy_loss=policy_loss,
    )


@dataclass(frozen=True)
class GRPOLossConfig:
    """Validated hyper-parameters of the GRPO loss family.

    Defaults follow Shao et al. 2024 (ε = 0.2, β = 0.04, group-std scaling, per-sequence mean);
    DAPO is ``loss_type="dapo", epsilon_high=0.28, beta=0``, Dr. GRPO is
    ``loss_type="dr_grpo", scale_rewards="none", beta=0`` with ``max_completion_length`` set,
    GSPO is ``importance_sampling_level="sequence"`` (with ``loss_type="grpo"``), CISPO is
    ``loss_type="cispo"`` with the cap ``epsilon_high`` (e.g. 5).

    ``kl_in_reward`` moves the β·KL from the loss into the reward (RLOO, REINFORCE++); the loss
    then has no KL term (:attr:`kl_loss_coef` is 0).
    """

    loss_type: LossType = "grpo"
    num_generations: int = 8
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.04
    scale_rewards: ScaleRewards = "group"
    max_completion_length: int | None = None
    importance_sampling_level: ImportanceSamplingLevel = "token"
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    kl_in_reward: bool = False

    def __post_init__(self) -> None:
        spec = LOSS_SPECS.get(self.loss_type)
        if spec is None:
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
        if spec.aggregation == "constant" and self.max_completion_length is None:
            raise ValueError(f"loss_type {self.loss_type!r} needs max_completion_length")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"unknown importance_sampling_level {self.importance_sampling_level!r}; "
                f"expected one of {IMPORTANCE_SAMPLING_LEVELS}"
            )
        if self.delta is not None:
            if spec.surrogate is not clipped_surrogate:
                raise ValueError(
                    f"delta (two-sided clipping) applies to the clipped loss types, not {self.loss_type!r}"
                )
            if not self.delta > 1.0 + self.epsilon_high:
                raise ValueError(
                    f"delta must be > 1 + epsilon_high = {1.0 + self.epsilon_high} (it caps the ratio above the "
                    f"clip range), got {self.delta}"
                )
        if self.loss_type == "cispo" and self.epsilon_high <= 0:
            raise ValueError(
                f"loss_type 'cispo' caps the weight at epsilon_high, which must be > 0, got {self.epsilon_high}"
            )
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            raise ValueError(
                f"sapo temperatures must be > 0, got {self.sapo_temperature_pos} and {self.sapo_temperature_neg}"
            )
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {self.top_entropy_quantile}")
        if not (math.isfinite(self.entropy_coef) and self.entropy_coef >= 0):
            raise ValueError(f"entropy_coef must be a finite number >= 0, got {self.entropy_coef}")
        if self.kl_in_reward and self.beta == 0:
            raise ValueError("kl_in_reward puts beta·KL into the reward: it needs beta > 0")

    @property
    def kl_loss_coef(self) -> float:
        """β of the KL term in the loss: 0 when the KL is in the reward."""
        return 0.0 if self.kl_in_reward else self.beta

    @property
    def aggregation(self) -> Aggregation:
        """How the loss type reduces its token terms (:data:`LOSS_SPECS`)."""
        return LOSS_SPECS[self.loss_type].aggregation

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`grpo_policy_loss` taken from this config."""
        return {
            "loss_type": self.loss_type,
            "epsilon_low": self.epsilon_low,
            "epsilon_high": self.epsilon_high,
            "beta": self.kl_loss_coef,
            "max_completion_length": self.max_completion_length,
            "importance_sampling_level": self.importance_sampling_level,
            "delta": self.delta,
            "sapo_temperature_pos": self.sapo_temperature_pos,
            "sapo_temperature_neg": self.sapo_temperature_neg,
            "entropy_coef": self.entropy_coef,
        }
