"""PPO for language models: KL-shaped rewards, GAE, clipped surrogate and value losses.

References:
    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation" (GAE).
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate, eq. 7).
    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (KL-penalised
    reward and adaptive KL coefficient, §2.2).
    Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
    (the per-token KL penalty of InstructGPT, eq. 2).
    Schulman 2020, "Approximating KL Divergence" (blog post; the k1/k2/k3 estimators).

Conventions: per-token tensors are ``[B, T]`` and come with a 0/1 (or bool) completion mask
``mask`` of the same shape. Masked positions may hold anything (even ``inf``/``nan``); they are
replaced before any arithmetic that could leak into a result or a gradient, and every per-token
output is exactly 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lit_pref.ops import last_token_index, masked_mean, masked_var

KLEstimator = Literal["k1", "k2", "k3"]


def _zero_masked(values: Tensor, mask: Tensor) -> Tensor:
    # torch.where (not multiplication) so that inf/nan at padded positions cannot survive as 0·inf.
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def kl_penalty(logps: Tensor, ref_logps: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token single-sample estimates of KL(π ‖ π_ref) from tokens sampled from π.

    With ``log r = log π(y_t) − log π_ref(y_t)`` (Schulman 2020, "Approximating KL Divergence"):

    * ``k1 = log r`` — unbiased, high variance, can be negative per token. This is the penalty
      of Ziegler et al. 2019 and Ouyang et al. 2022 (eq. 2).
    * ``k2 = ½ (log r)²`` — biased but low variance and always ≥ 0; its expectation agrees
      with KL to second order in ``log r`` when π is close to π_ref.
    * ``k3 = (ρ − 1) − log ρ`` with ``ρ = π_ref / π = exp(−log r)`` — unbiased (E_π[ρ] = 1) and
      always ≥ 0 because ``log x ≤ x − 1``. This is the estimator in the GRPO objective
      (Shao et al. 2024, eq. 4).

    Args:
        logps: ``[B, T]`` log π of the sampled tokens.
        ref_logps: ``[B, T]`` log π_ref of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``[B, T]`` per-token estimates (unmasked; callers reduce them over the completion mask).
    """
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # expm1 keeps precision when π ≈ π_ref, where ρ − 1 and log ρ nearly cancel.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of 'k1', 'k2', 'k3'")


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards of RLHF-PPO: a KL penalty on every token and the score on the last one.

    ``R_t = −β·KL_t + 1[t = last completion token]·score`` (Ziegler et al. 2019, §2.2; Ouyang
    et al. 2022, eq. 2). The reward model scores a whole completion, so its scalar is credited
    to the final action; the KL term shapes every action.

    Args:
        scores: ``[B]`` reward-model score of each completion.
        kl: ``[B, T]`` per-token KL estimates (see :func:`kl_penalty`).
        mask: ``[B, T]`` completion mask; the "last token" is the last position where it is set,
            whichever side the padding is on. A row with no completion tokens gets no score.
        kl_coef: β ≥ 0.

    Returns:
        ``[B, T]`` rewards, 0 at masked positions.
    """
    rewards = _zero_masked(-kl_coef * kl, mask)
    last = last_token_index(mask)
    has_tokens = mask.bool().any(-1)
    score = torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(1, last[:, None], score[:, None])


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over completion tokens (Schulman et al. 2016, eq. 16).

    ``δ_t = r_t + γ V(s_{t+1}) − V(s_t)`` and ``Â_t = Σ_l (γλ)^l δ_{t+l}``, computed by the
    recursion ``Â_t = δ_t + γλ Â_{t+1}``. The episode ends after the last completion token, so
    the value after it is 0 (no bootstrap). Masked positions are skipped: the recursion runs
    over the completion tokens of each row as if they were contiguous, so a masked token in the
    middle (e.g. tool output) neither contributes reward nor breaks the chain.

    Advantages and returns are targets, never differentiated through (Schulman et al. 2017 treat
    Â_t as fixed), so both inputs are detached.

    Args:
        rewards: ``[B, T]`` per-token rewards (see :func:`token_rewards`).
        values: ``[B, T]`` value estimates V(s_t) under the rollout policy.
        mask: ``[B, T]`` completion mask.
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` and 0 at masked positions;
        ``returns = advantages + values`` (the TD(λ) targets of the value head).
    """
    keep = mask.bool()
    rewards = _zero_masked(rewards.detach(), keep)
    values = _zero_masked(values.detach(), keep)
    if rewards.shape[1] == 0:
        return torch.zeros_like(values), torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages: list[Tensor] = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # A masked position passes the successor's state through unchanged, so it is skipped.
        next_advantage = torch.where(keep[:, t], advantage, next_advantage)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        advantages.append(torch.where(keep[:, t], advantage, torch.zeros_like(advantage)))
    advantages_t = torch.stack(advantages[::-1], dim=1)
    return advantages_t, _zero_masked(advantages_t + values, keep)


class KLController:
    """The β of the KL-penalised reward, as a small stateful object with a checkpointable state."""

    def __init__(self, init_kl_coef: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust β after ``n_steps`` samples whose mean KL(π ‖ π_ref) was ``current_kl``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = float(state_dict["value"])


class FixedKLController(KLController):
    """A constant β; :meth:`update` is a no-op (Ouyang et al. 2022 use a fixed coefficient)."""

    def update(self, current_kl: float, n_steps: int) -> None:
        return None


class AdaptiveKLController(KLController):
    """β steered towards a target KL with a clipped proportional controller (Ziegler et al. 2019, §2.2).

    ``e = clip(KL / KL_target − 1, −0.2, 0.2)`` and ``β ← β (1 + e · n_steps / horizon)``: the
    clipping bounds the per-update change, and ``n_steps / horizon`` makes the rate depend on
    how many samples the measurement covers rather than on how often ``update`` is called.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(init_kl_coef)
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


@dataclass
class PolicyLossOutput:
    """Result of :func:`clipped_policy_loss`.

    Attributes:
        per_token_loss: ``[B, T]`` clipped surrogate loss, 0 at masked positions.
        clip_frac_low: detached scalar, fraction of completion tokens clipped at ``1 − ε_low``.
        clip_frac_high: detached scalar, fraction of completion tokens clipped at ``1 + ε_high``.
        approx_kl: detached scalar, masked mean of ``½ (log π − log π_old)²``.
    """

    per_token_loss: Tensor
    clip_frac_low: Tensor
    clip_frac_high: Tensor
    approx_kl: Tensor


def clipped_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange_low: float = 0.2,
    cliprange_high: float = 0.2,
) -> PolicyLossOutput:
    """Per-token PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), negated for minimisation.

    ``ρ = π / π_old = exp(log π − log π_old)`` and
    ``ℓ_t = max(−Â ρ, −Â clip(ρ, 1 − ε_low, 1 + ε_high)) = −min(ρ Â, clip(ρ) Â)``.
    Separate lower and upper ranges allow DAPO's "clip-higher" (Yu et al. 2025, §3.1); with
    ``ε_low = ε_high`` this is the original objective. When the clipped branch is active the
    loss is constant in ρ, so the token contributes no gradient: that happens only at the low
    side with Â < 0 (ρ < 1 − ε_low) and at the high side with Â > 0 (ρ > 1 + ε_high).

    Args:
        logps: ``[B, T]`` log π of the sampled tokens under the current policy.
        old_logps: ``[B, T]`` log π_old under the rollout policy (treated as a constant).
        advantages: ``[B, T]`` per-token advantages, or ``[B]`` per-sequence ones (GRPO/RLOO),
            treated as constants.
        mask: ``[B, T]`` completion mask.
        cliprange_low: ε_low ≥ 0.
        cliprange_high: ε_high ≥ 0.

    Returns:
        :class:`PolicyLossOutput`; the caller chooses how to reduce ``per_token_loss``.
    """
    keep = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.detach().expand_as(logps)
    # Sanitising the log-ratio before exp keeps padded garbage from producing inf·0 = nan in backward.
    log_ratio = _zero_masked(logps - old_logps.detach(), keep)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange_low, 1.0 + cliprange_high)
    per_token_loss = _zero_masked(torch.maximum(unclipped, clipped), keep)
    with torch.no_grad():
        low = (ratio < 1.0 - cliprange_low) & (advantages < 0)
        high = (ratio > 1.0 + cliprange_high) & (advantages > 0)
        clip_frac_low = masked_mean(low.to(ratio.dtype), keep)
        clip_frac_high = masked_mean(high.to(ratio.dtype), keep)
        approx_kl = masked_mean(0.5 * log_ratio.square(), keep)
    return PolicyLossOutput(per_token_loss, clip_frac_low, clip_frac_high, approx_kl)


@dataclass
class ValueLossOutput:
    """Result of :func:`clipped_value_loss`.

    Attributes:
        per_token_loss: ``[B, T]`` clipped value loss, 0 at masked positions.
        clip_frac: detached scalar, fraction of completion tokens where the clipped branch wins.
    """

    per_token_loss: Tensor
    clip_frac: Tensor


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float = 0.2
) -> ValueLossOutput:
    """Per-token clipped value loss ``½ max((V − R)², (clip(V, V_old ± ε) − R)²)``.

    The value head is kept within ε of its rollout-time prediction, the value-function
    counterpart of the policy's trust region (used in the PPO baselines of Schulman et al. 2017
    and in Ziegler et al. 2019); taking the max makes it a pessimistic bound like the policy
    objective.

    Args:
        values: ``[B, T]`` current value predictions.
        old_values: ``[B, T]`` value predictions at rollout time (constants).
        returns: ``[B, T]`` regression targets from :func:`gae` (constants).
        mask: ``[B, T]`` completion mask.
        cliprange_value: ε ≥ 0.

    Returns:
        :class:`ValueLossOutput`.
    """
    keep = mask.bool()
    values = _zero_masked(values, keep)
    old_values = _zero_masked(old_values.detach(), keep)
    returns = _zero_masked(returns.detach(), keep)
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    per_token_loss = _zero_masked(0.5 * torch.maximum(unclipped_error, clipped_error), keep)
    with torch.no_grad():
        clip_frac = masked_mean((clipped_error > unclipped_error).to(values.dtype), keep)
    return ValueLossOutput(per_token_loss, clip_frac)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 − Var(R − V) / Var(R)`` over completion tokens: how much of the return the value head explains.

    1 is a perfect value function, 0 is no better than predicting the mean return, negative is
    worse. Undefined (NaN) when the returns are constant.

    Args:
        values: ``[B, T]`` value predictions.
        returns: ``[B, T]`` returns.
        mask: ``[B, T]`` completion mask.

    Returns:
        Detached scalar.
    """
    keep = mask.bool()
    values, returns = _zero_masked(values, keep), _zero_masked(returns, keep)
    var_returns = masked_var(returns, keep)
    var_residual = masked_var(returns - values, keep)
    return torch.where(
        var_returns > 0,
        1.0 - var_residual / var_returns.clamp(min=torch.finfo(var_returns.dtype).tiny),
        torch.full_like(var_returns, float("nan")),
    )
