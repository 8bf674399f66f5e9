"""GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024) as one LightningModule."""

from __future__ import annotations

import warnings
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
    rloo_advantages,
)
from lit_pref.modules.reference import ReferenceModule
from lit_pref.ops import masked_mean
from lit_pref.rewards import RewardSet
from lit_pref.rollout import (
    GenerationSettings,
    Rollout,
    completion_stats,
    generate_rollout,
    map_chunks,
    minibatch_indices,
    optimizer_step,
    reward_metrics,
    sample_rows,
    score_rollout,
)

AdvantageEstimator = Literal["grpo", "rloo"]


class GRPO(ReferenceModule):
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

    Optimisation is manual, so ``trainer.global_step`` counts optimizer steps:
    ``num_iterations × num_mini_batches`` per batch of prompts.

    Logged per batch of prompts: ``score``, ``rewards/<source>`` (several sources),
    ``reward_std`` (mean within-group std), ``frac_reward_zero_std``,
    ``completions/{mean,min,max}_length``, ``completions/eos_fraction``; averaged over
    optimizer steps: ``loss``, ``kl`` (k3, β > 0), ``entropy``, ``policy/clip_frac_low``,
    ``policy/clip_frac_high``, ``policy/clip_frac``, ``policy/approx_kl`` (when π_old is
    scored).

    Args:
        rewards: reward sources: reward-model directories and/or reward functions
            ``"pkg.module:fn"`` (see :mod:`lit_pref.rewards`).
        reward_weights: one weight per reward source (default all 1).
        missing_eos_penalty: subtracted from the reward of completions cut at
            ``max_new_tokens`` without an EOS token.
        num_generations: completions per prompt G (≥ 2).
        max_new_tokens: completion length limit (also L_max of ``dr_grpo``).
        temperature: sampling temperature (also divides the logits when scoring).
        top_p: nucleus sampling (1 disables it).
        top_k: top-k sampling (``None`` or 0 disables it).
        rollout_batch_size: completions per ``generate`` call and per no-grad scoring pass
            (rounded down to whole groups).
        advantage_estimator: ``grpo`` (group-normalised) or ``rloo`` (leave-one-out).
        scale_rewards: ``group``, ``batch`` or ``none``; default ``group`` for GRPO. RLOO
            advantages are not scaled (only ``none`` is accepted).
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (see
            :func:`lit_pref.losses.grpo.grpo_policy_loss`).
        epsilon: lower clip range ε.
        epsilon_high: upper clip range (default ε; DAPO uses 0.28).
        beta: KL coefficient; 0 loads no reference model.
        num_iterations: optimisation passes over each rollout (importance ratios against π_old).
        num_mini_batches: optimizer steps per pass.
        gradient_accumulation_steps: micro-batches per mini-batch.
        max_grad_norm: gradient-norm clipping per optimizer step (``None``: off).
        mask_truncated_completions: leave completions that hit ``max_new_tokens`` without an
            EOS token out of the loss (DAPO's overlong filtering).
        **kwargs: :class:`~lit_pref.modules.reference.ReferenceModule` arguments (the reference
            choice) and :class:`~lit_pref.modules.base.AlignmentModule` ones (model, LoRA,
            optimizer, export…).
    """

    data_target = "prompt_only"
    default_lr = 1e-6

    def __init__(
        self,
        rewards: str | list[str] | None = None,
        reward_weights: list[float] | None = None,
        missing_eos_penalty: float | None = None,
        num_generations: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        rollout_batch_size: int = 64,
        advantage_estimator: AdvantageEstimator = "grpo",
        scale_rewards: ScaleRewards | None = None,
        loss_type: LossType = "grpo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.04,
        num_iterations: int = 1,
        num_mini_batches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        mask_truncated_completions: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("precompute_ref_logps"):
            raise ValueError("precompute_ref_logps does not apply to GRPO: completions are sampled online")
        if rewards is None:
            raise ValueError("GRPO needs rewards: a reward-model directory and/or a function 'pkg.module:fn'")
        if advantage_estimator not in ("grpo", "rloo"):
            raise ValueError(f"advantage_estimator must be grpo or rloo, got {advantage_estimator!r}")
        if advantage_estimator == "rloo" and scale_rewards not in (None, "none"):
            raise ValueError("RLOO advantages are not scaled; drop scale_rewards or set it to none")
        if beta == 0 and kwargs.get("reference", "auto") not in ("auto", "none"):
            raise ValueError(
                f"beta=0 uses no reference, so reference={kwargs['reference']!r} would load one for nothing"
            )
        for name, value in (("num_iterations", num_iterations), ("num_mini_batches", num_mini_batches),
                            ("gradient_accumulation_steps", gradient_accumulation_steps),
                            ("rollout_batch_size", rollout_batch_size)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {max_grad_norm}")
        self.loss_config = GRPOLossConfig(
            loss_type=loss_type,
            num_generations=num_generations,
            epsilon_low=epsilon,
            epsilon_high=epsilon if epsilon_high is None else epsilon_high,
            beta=beta,
            scale_rewards=("none" if advantage_estimator == "rloo" else "group")
            if scale_rewards is None
            else scale_rewards,
            max_completion_length=max_new_tokens,
        )
        super().__init__(reference_free=beta == 0, **kwargs)
        self.automatic_optimization = False
        self.reward_set = RewardSet(
            rewards, reward_weights, missing_eos_penalty, batch_size=rollout_batch_size
        )
        self.generation = GenerationSettings(max_new_tokens, temperature, top_p, top_k)
        self.num_generations = num_generations
        self.rollout_batch_size = rollout_batch_size
        self.advantage_estimator = advantage_estimator
        self.num_iterations = num_iterations
        self.num_mini_batches = num_mini_batches
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.mask_truncated_completions = mask_truncated_completions
        self.latest_samples: list[dict[str, Any]] = []
        rank_zero_info(
            f"{type(self).__name__}: {advantage_estimator} advantages (scale_rewards={self.loss_config.scale_rewards}), "
            f"loss {loss_type}, {num_generations} generations per prompt"
        )

    # ----------------------------------------------------------------- networks
    def configure_model(self) -> None:
        first = self.policy is None
        super().configure_model()
        if first:
            self.reward_set.load_models(self.tokenizer)

    @property
    def reuses_rollout(self) -> bool:
        """Whether a rollout outlives an optimizer step, so that π_old must be scored separately."""
        return self.num_iterations > 1 or self.num_mini_batches > 1

    # -------------------------------------------------------------- rollout
    @torch.no_grad()
    def _score_chunk(self, chunk: Rollout) -> dict[str, Tensor | None]:
        batch, temperature = chunk.batch(), self.generation.temperature
        old = self.logps(self.policy, batch, temperature=temperature) if self.reuses_rollout else None
        ref = self.reference_logps(batch, temperature=temperature) if self.loss_config.beta else None
        return {
            "old_logps": None if old is None else old.token_logps,
            "ref_logps": None if ref is None else ref.token_logps,
        }

    def advantages(self, scores: Tensor) -> tuple[Tensor, int]:
        """Per-completion advantages and the number of groups with zero reward spread."""
        k = self.num_generations
        if self.advantage_estimator == "rloo":
            grouped = scores.view(-1, k)
            return rloo_advantages(scores, k), int((grouped.amax(1) == grouped.amin(1)).sum())
        out = group_advantages(scores, k, self.loss_config.scale_rewards)
        return out.advantages, out.zero_std_groups

    def collect_rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample G completions per prompt, score them (π_old, reference, rewards) and compute advantages."""
        k = self.num_generations
        rollout = generate_rollout(
            self.policy, batch, self.generation, self.tokenizer, k, self.rollout_batch_size
        )
        if self.reuses_rollout or self.loss_config.beta:
            rollout.data.update(map_chunks(rollout, self.rollout_batch_size, self._score_chunk))
        scores, per_source = score_rollout(
            self.reward_set.to(self.device), rollout, self.tokenizer.pad_token_id
        )
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
        rollout.data |= {"scores": scores, "advantages": advantages, "loss_mask": loss_mask}
        metrics = reward_metrics(scores, per_source) | completion_stats(rollout)
        metrics["reward_std"] = scores.view(-1, k).std(1)
        metrics["frac_reward_zero_std"] = torch.tensor(zero_std / rollout.num_prompts, device=scores.device)
        self.train_metrics.update(metrics)
        self.latest_samples = sample_rows(rollout, scores, per_source, self.tokenizer)
        return rollout

    # ----------------------------------------------------------------- losses
    def grpo_loss(self, rollout: Rollout, num_items: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The configured GRPO-family loss of a (micro-)batch of the rollout."""
        data = rollout.data
        logps = self.logps(
            self.policy, rollout.batch(), temperature=self.generation.temperature, with_entropy=True
        )
        out = grpo_policy_loss(
            logps.token_logps,
            data.get("old_logps"),
            data.get("ref_logps"),
            data["advantages"],
            data["loss_mask"],
            num_items_in_batch=num_items,
            **self.loss_config.loss_kwargs(),
        )
        metrics = {
            "loss": out.loss.detach(),
            "entropy": masked_mean(logps.entropy, rollout.mask, dim=-1),
            "policy/clip_frac_low": out.clip_frac_low,
            "policy/clip_frac_high": out.clip_frac_high,
            "policy/clip_frac": out.clip_frac_region,
        }
        if self.loss_config.beta:
            metrics["kl"] = out.kl_mean
        if "old_logps" in data:
            with torch.no_grad():
                log_ratio = torch.where(rollout.mask, logps.token_logps - data["old_logps"], 0.0)
                metrics["policy/approx_kl"] = masked_mean(0.5 * log_ratio.square(), rollout.mask)
        return out.loss, metrics

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.collect_rollout(batch)
        dapo = self.loss_config.loss_type == "dapo"
        for _ in range(self.num_iterations):
            for micro_batches in minibatch_indices(
                rollout.num_prompts, self.num_mini_batches, self.gradient_accumulation_steps
            ):
                size = sum(m.numel() for m in micro_batches)
                num_items = None
                if dapo:
                    # Loss tokens of the whole mini-batch, averaged over ranks (DDP averages gradients),
                    # so the accumulated micro-batch losses are the exact token-level mean.
                    rows = rollout.completion_rows(torch.cat(micro_batches).to(rollout.mask.device))
                    tokens = rollout.data["loss_mask"][rows].sum().float()
                    num_items = self.trainer.strategy.reduce(tokens, reduce_op="mean")
                for rows in micro_batches:
                    loss, metrics = self.grpo_loss(rollout.select(rows), num_items)
                    self.manual_backward(loss if dapo else loss * (rows.numel() / size))
                    self.train_metrics.update(metrics)
                optimizer_step(self, self.max_grad_norm)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Score one completion per held-out prompt: ``val/score`` and completion statistics."""
        rollout = generate_rollout(
            self.policy, batch, self.generation, self.tokenizer, 1, self.rollout_batch_size
        )
        scores, per_source = score_rollout(
            self.reward_set.to(self.device), rollout, self.tokenizer.pad_token_id
        )
        self.val_metrics.update(reward_metrics(scores, per_source) | completion_stats(rollout))
