"""GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024) as one LightningModule."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_pref.losses.grpo import (
    GRPOLossConfig,
    LossType,
    ScaleRewards,
    group_advantages,
    grpo_policy_loss,
    resolve_scale_rewards,
    rloo_advantages,
)
from lit_pref.modules.online import OnlineRLModule
from lit_pref.ops import masked_mean
from lit_pref.rollout import CompletionTensors, Rollout, score_in_chunks

AdvantageEstimator = Literal["grpo", "rloo"]


@dataclass
class RolloutLogps(CompletionTensors):
    """``[N, L]`` log-probs of a rollout's tokens from the no-grad scoring pass (``None`` when not needed).

    Attributes:
        old_logps: under the rollout policy π_old (only when the rollout outlives an optimizer step).
        ref_logps: under the reference (only with β > 0).
    """

    old_logps: Tensor | None
    ref_logps: Tensor | None


@dataclass
class GRPOTensors(RolloutLogps):
    """Per-completion tensors of a GRPO / RLOO rollout.

    Attributes:
        advantages: ``[N]`` one advantage per completion.
        loss_mask: ``[N, L]`` bool, the tokens the loss counts.
    """

    advantages: Tensor
    loss_mask: Tensor


class GRPO(OnlineRLModule["GRPOTensors"]):
    """Group Relative Policy Optimization (Shao et al. 2024) and RLOO (Ahmadian et al. 2024).

    Each training step takes a batch of prompts and:

    1. samples ``num_generations`` completions per prompt (adjacent rows; policy in eval mode,
       no grad), and — when the rollout is reused (``num_iterations > 1`` or several
       mini-batches) — scores them under the rollout policy (π_old); with ``beta > 0`` also
       under the reference, through the shared log-prob path at the sampling temperature;
    2. rewards them (reward models and/or functions, weighted; ``missing_eos_penalty``);
    3. turns rewards into one advantage per completion: the group-normalised
       ``(r − mean_group) / σ`` of GRPO (``scale_rewards``: σ of the group, of the batch, or
       none — Dr. GRPO), or RLOO's leave-one-out baseline ``r − mean of the other G − 1``
       (``advantage_estimator: rloo``, unscaled);
    4. optimises the clipped objective with a k3 KL penalty β (``loss_type``: ``grpo``,
       ``bnpo``, ``dr_grpo``, ``dapo``; ``epsilon_high`` for DAPO's clip-higher) for
       ``num_iterations`` passes over ``num_mini_batches`` mini-batches of whole prompt groups,
       one optimizer step each, accumulated over ``gradient_accumulation_steps`` micro-batches.

    RLOO here is the leave-one-out estimator on the same machinery (sampling, clipped
    objective, optional KL to the reference), not a separate class: set
    ``advantage_estimator: rloo`` (``configs/rloo.yaml``).

    Groups whose completions all got the same reward have zero advantage and teach nothing; a
    warning gives their count, and ``frac_reward_zero_std`` logs the fraction.

    ``trainer.global_step`` counts optimizer steps: ``num_iterations × num_mini_batches`` per
    batch of prompts; see :class:`~lit_pref.modules.online.OnlineRLModule`.

    Logged per batch of prompts: ``score``, ``rewards/<source>`` (several sources),
    ``reward_std`` (mean within-group std), ``frac_reward_zero_std``,
    ``completions/{mean,min,max}_length``, ``completions/eos_fraction``; averaged over
    optimizer steps: ``loss``, ``kl`` (k3, β > 0), ``entropy``, ``policy/clip_frac_low``,
    ``policy/clip_frac_high``, ``policy/clip_frac``, ``policy/approx_kl`` (when π_old is
    scored).

    Args:
        num_generations: completions per prompt G (≥ 2).
        max_new_tokens: completion length limit (also L_max of ``dr_grpo``).
        advantage_estimator: ``grpo`` (group-normalised) or ``rloo`` (leave-one-out).
        scale_rewards: ``group``, ``batch`` or ``none`` (TRL's ``true`` / ``false`` are
            ``group`` / ``none``); default ``group`` for GRPO. RLOO
            advantages are not scaled (only ``none`` is accepted).
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (see
            :func:`lit_pref.losses.grpo.grpo_policy_loss`).
        epsilon: lower clip range ε.
        epsilon_high: upper clip range (default ε; DAPO uses 0.28).
        beta: KL coefficient; 0 loads no reference model.
        num_iterations: optimisation passes over each rollout (importance ratios against π_old).
        mask_truncated_completions: leave completions that hit ``max_new_tokens`` without an
            EOS token out of the loss (DAPO's overlong filtering).
        **kwargs: :class:`~lit_pref.modules.online.OnlineRLModule` arguments (rewards, sampling,
            mini-batches, the rollout engine), the reference choice and the model, LoRA,
            optimizer and export arguments every module takes.
    """

    default_lr = 1e-6

    def __init__(
        self,
        num_generations: int = 8,
        max_new_tokens: int = 512,
        advantage_estimator: AdvantageEstimator = "grpo",
        scale_rewards: ScaleRewards | bool | None = None,
        loss_type: LossType = "grpo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.04,
        num_iterations: int = 1,
        mask_truncated_completions: bool = False,
        **kwargs: Any,
    ) -> None:
        if advantage_estimator not in ("grpo", "rloo"):
            raise ValueError(f"advantage_estimator must be grpo or rloo, got {advantage_estimator!r}")
        scale = None if scale_rewards is None else resolve_scale_rewards(scale_rewards)
        if advantage_estimator == "rloo" and scale not in (None, "none"):
            raise ValueError("RLOO advantages are not scaled; drop scale_rewards or set it to none")
        if beta == 0 and kwargs.get("reference", "auto") not in ("auto", "none"):
            raise ValueError(
                f"beta=0 uses no reference, so reference={kwargs['reference']!r} would load one for nothing"
            )
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        self.loss_config = GRPOLossConfig(
            loss_type=loss_type,
            num_generations=num_generations,
            epsilon_low=epsilon,
            epsilon_high=epsilon if epsilon_high is None else epsilon_high,
            beta=beta,
            scale_rewards=("none" if advantage_estimator == "rloo" else "group") if scale is None else scale,
            max_completion_length=max_new_tokens,
        )
        super().__init__(max_new_tokens=max_new_tokens, reference_free=beta == 0, **kwargs)
        self.num_generations = num_generations
        self.num_epochs = num_iterations
        self.advantage_estimator = advantage_estimator
        self.mask_truncated_completions = mask_truncated_completions
        rank_zero_info(
            f"{type(self).__name__}: {advantage_estimator} advantages (scale_rewards={self.loss_config.scale_rewards}), "
            f"loss {loss_type}, {num_generations} generations per prompt"
        )

    @property
    def reuses_rollout(self) -> bool:
        """Whether a rollout outlives an optimizer step, so that π_old must be scored separately."""
        return self.num_epochs > 1 or self.num_mini_batches > 1

    # -------------------------------------------------------------- rollout
    @torch.no_grad()
    def _score_chunk(self, chunk: Rollout) -> RolloutLogps:
        batch, temperature = chunk.batch(), self.generation.temperature
        old = self.logps(self.policy, batch, temperature=temperature) if self.reuses_rollout else None
        ref = self.reference_logps(batch, temperature=temperature) if self.loss_config.beta else None
        return RolloutLogps(
            None if old is None else old.token_logps, None if ref is None else ref.token_logps
        )

    def advantages(self, scores: Tensor) -> tuple[Tensor, int]:
        """Per-completion advantages and the number of groups with zero reward spread."""
        k = self.num_generations
        if self.advantage_estimator == "rloo":
            grouped = scores.view(-1, k)
            return rloo_advantages(scores, k), int((grouped.amax(1) == grouped.amin(1)).sum())
        out = group_advantages(scores, k, self.loss_config.scale_rewards)
        return out.advantages, out.zero_std_groups

    def prepare(self, rollout: Rollout) -> GRPOTensors:
        """Score the G completions per prompt (π_old, reference, rewards) and compute advantages."""
        k = self.num_generations
        logps = RolloutLogps(None, None)
        if self.reuses_rollout or self.loss_config.beta:
            logps = score_in_chunks(rollout, self.rollout_batch_size, self._score_chunk)
        scores, _ = self.score(rollout)
        advantages, zero_std = self.advantages(scores)
        if zero_std:
            warnings.warn(
                f"{zero_std} of {rollout.num_prompts} prompt groups have zero reward variance (all {k} completions "
                "scored the same): their advantages are 0 and they teach nothing. Many such groups mean the task is "
                "too easy / too hard for the policy, or the reward is too coarse; raise num_generations or temperature.",
                stacklevel=2,
            )
        loss_mask = rollout.mask
        if self.mask_truncated_completions:
            loss_mask = loss_mask & rollout.ended[:, None]
        self.train_metrics.update({
            "reward_std": scores.view(-1, k).std(1),
            "frac_reward_zero_std": torch.tensor(zero_std / rollout.num_prompts, device=scores.device),
        })  # fmt: skip
        return GRPOTensors(logps.old_logps, logps.ref_logps, advantages, loss_mask)

    # ----------------------------------------------------------------- losses
    def minibatch_num_items(self, rollout: Rollout, tensors: GRPOTensors, rows: Tensor) -> Tensor | None:
        """DAPO: loss tokens of the whole mini-batch, averaged over ranks (DDP averages gradients),
        so the accumulated micro-batch losses are the exact token-level mean."""
        if self.loss_config.loss_type != "dapo":
            return None
        tokens = tensors.loss_mask[rollout.completion_rows(rows.to(rollout.mask.device))].sum().float()
        return self.trainer.strategy.reduce(tokens, reduce_op="mean")

    def rollout_loss(
        self, rollout: Rollout, tensors: GRPOTensors, num_items: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The configured GRPO-family loss of a micro-batch of the rollout."""
        logps = self.logps(
            self.policy, rollout.batch(), temperature=self.generation.temperature, with_entropy=True
        )
        out = grpo_policy_loss(
            logps.token_logps,
            tensors.old_logps,
            tensors.ref_logps,
            tensors.advantages,
            tensors.loss_mask,
            num_items_in_batch=num_items,
            **self.loss_config.loss_kwargs(),
        )
        assert logps.entropy is not None
        metrics = {
            "loss": out.loss.detach(),
            "entropy": masked_mean(logps.entropy, rollout.mask, dim=-1),
            "policy/clip_frac_low": out.clip_frac_low,
            "policy/clip_frac_high": out.clip_frac_high,
            "policy/clip_frac": out.clip_frac_region,
        }
        if self.loss_config.beta:
            metrics["kl"] = out.kl_mean
        if tensors.old_logps is not None:
            with torch.no_grad():
                log_ratio = torch.where(rollout.mask, logps.token_logps - tensors.old_logps, 0.0)
                metrics["policy/approx_kl"] = masked_mean(0.5 * log_ratio.square(), rollout.mask)
        return out.loss, metrics
