"""GRPO (Shao et al. 2024) and its family — RLOO, REINFORCE++, GSPO, CISPO, SAPO, DAPO, Dr. GRPO,
GDPO-style reward aggregation — as one LightningModule."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_pref.losses.grpo import (
    MULTI_OBJECTIVE_AGGREGATIONS,
    GRPOLossConfig,
    ImportanceSamplingLevel,
    LossType,
    MultiObjectiveAggregation,
    ScaleRewards,
    batch_normalize,
    decoupled_advantages,
    group_advantages,
    grpo_policy_loss,
    reinforce_plus_plus_advantages,
    resolve_scale_rewards,
    rloo_advantages,
    top_entropy_mask,
)
from lit_pref.losses.ppo import kl_penalty
from lit_pref.modules.online import OnlineRLModule
from lit_pref.ops import masked_mean
from lit_pref.rollout import CompletionTensors, Rollout, score_in_chunks

AdvantageEstimator = Literal["grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
# Estimators whose advantages are already normalised over the batch.
_WHITENED = ("reinforce_plus_plus", "reinforce_plus_plus_baseline")


@dataclass
class RolloutLogps(CompletionTensors):
    """``[N, L]`` log-probs of a rollout's tokens from the no-grad scoring pass (``None`` when not needed).

    Attributes:
        old_logps: under the rollout policy π_old (when the rollout outlives an optimizer step,
            or for a KL in the reward).
        ref_logps: under the reference (only with β > 0).
    """

    old_logps: Tensor | None
    ref_logps: Tensor | None


@dataclass
class GRPOTensors(RolloutLogps):
    """Per-completion tensors of a GRPO-family rollout.

    Attributes:
        advantages: ``[N]`` one advantage per completion, or ``[N, L]`` per token (REINFORCE++).
        loss_mask: ``[N, L]`` bool, the tokens the loss counts.
        sampler_weights: ``[N, L]`` truncated importance weights π_old / π_engine of the
            rollout engine's samples (``rollout_is_cap``; ``None``: not weighted).
    """

    advantages: Tensor
    loss_mask: Tensor
    sampler_weights: Tensor | None = None


class GRPO(OnlineRLModule["GRPOTensors"]):
    """Group Relative Policy Optimization (Shao et al. 2024) and its family.

    Each training step takes a batch of prompts and:

    1. samples ``num_generations`` completions per prompt (adjacent rows; policy in eval mode,
       no grad), and — when the rollout is reused (``num_iterations > 1`` or several
       mini-batches) or the KL is in the reward — scores them under the rollout policy (π_old);
       with ``beta > 0`` also under the reference, through the shared log-prob path at the
       sampling temperature;
    2. rewards them (reward models and/or functions, weighted; ``missing_eos_penalty``);
    3. turns rewards into advantages (``advantage_estimator``):

       * ``grpo``: ``(r − mean_group) / σ`` (``scale_rewards``: σ of the group, of the batch,
         or none — Dr. GRPO). With several rewards, ``multi_objective_aggregation:
         normalize_then_sum`` normalises each reward within its group before the weighted sum
         and then normalises the sum over the batch (GDPO), instead of normalising the sum;
       * ``rloo``: RLOO's leave-one-out baseline ``r − mean of the other G − 1`` (Ahmadian et
         al. 2024), unscaled;
       * ``reinforce_plus_plus`` / ``reinforce_plus_plus_baseline``: REINFORCE++ (Hu et al.
         2025): per-token returns of the (KL-shaped, with ``kl_in_reward``) reward, minus the
         group mean score for ``_baseline``, normalised over the batch's tokens;

       ``normalize_advantages`` normalises ``grpo`` / ``rloo`` advantages over the batch, and
       ``kl_in_reward`` subtracts ``β Σ_t (log π_old − log π_ref)`` from each reward (per token
       for REINFORCE++) instead of adding a k3 KL to the loss (RLOO's and REINFORCE++'s KL);
    4. optimises the ``loss_type``'s objective — clipped (``grpo``, ``bnpo``, ``dr_grpo``,
       ``dapo``; ``epsilon_high`` for DAPO's clip-higher, ``delta`` for two-sided clipping),
       ``cispo`` (capped, stopped IS weight) or ``sapo`` (soft gate) — on token ratios or GSPO's
       sequence ratio (``importance_sampling_level``), optionally only on the top-entropy tokens
       (``top_entropy_quantile``) and with an entropy bonus (``entropy_coef``), for
       ``num_iterations`` passes over ``num_mini_batches`` mini-batches of whole prompt groups,
       one optimizer step each, accumulated over ``gradient_accumulation_steps`` micro-batches.

    RLOO and REINFORCE++ run on the same machinery (sampling, objective, optional KL), not in
    separate classes (``configs/rloo.yaml``, ``configs/reinforce_pp.yaml``; GSPO and CISPO:
    ``configs/gspo.yaml``, ``configs/cispo.yaml``).

    Groups whose completions all got the same reward carry no signal about which completion is
    better; a warning gives their count, and ``frac_reward_zero_std`` logs the fraction.

    ``trainer.global_step`` counts optimizer steps: ``num_iterations × num_mini_batches`` per
    batch of prompts; see :class:`~lit_pref.modules.online.OnlineRLModule`.

    Logged per batch of prompts: ``score``, ``rewards/<source>`` (several sources),
    ``reward_std`` (mean within-group std), ``frac_reward_zero_std``,
    ``completions/{mean,min,max}_length``, ``completions/eos_fraction``, ``kl`` (k1 per token,
    with ``kl_in_reward``); averaged over optimizer steps: ``loss``, ``kl`` (k3, β > 0 in the
    loss), ``entropy``, ``policy/clip_frac_low``, ``policy/clip_frac_high``,
    ``policy/clip_frac``, ``policy/approx_kl`` (when π_old is scored), ``policy_loss`` (the
    loss without the entropy bonus, when ``entropy_coef`` > 0), ``policy/top_entropy_frac``
    (share of loss tokens the top-entropy mask keeps).

    Args:
        num_generations: completions per prompt G (≥ 2).
        max_new_tokens: completion length limit (also L_max of ``dr_grpo``).
        advantage_estimator: ``grpo``, ``rloo``, ``reinforce_plus_plus`` or
            ``reinforce_plus_plus_baseline``.
        scale_rewards: ``group``, ``batch`` or ``none`` (TRL's ``true`` / ``false`` are
            ``group`` / ``none``); default ``group`` for GRPO. Only the ``grpo`` estimator with
            ``sum_then_normalize`` scales rewards (the others accept only ``none``).
        multi_objective_aggregation: how several rewards combine (TRL's name):
            ``sum_then_normalize`` (weighted sum, then ``scale_rewards``) or
            ``normalize_then_sum`` (GDPO: each reward normalised within its group, weighted,
            summed, then normalised over the batch; the missing-EOS penalty is one more reward
            there). ``grpo`` estimator only.
        normalize_advantages: normalise the advantages to mean 0 and std 1 over the batch
            (TRL's RLOOConfig option; ``grpo`` and ``rloo`` estimators).
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo`` or ``sapo`` (see
            :func:`lit_pref.losses.grpo.grpo_policy_loss`).
        importance_sampling_level: ``token`` (one ratio per token) or ``sequence`` (GSPO's
            length-normalised sequence ratio; use it with ``loss_type: grpo``).
        epsilon: lower clip range ε.
        epsilon_high: upper clip range (default ε; DAPO uses 0.28). For ``cispo`` the cap
            ε_max on the importance weight, an absolute bound (ScaleRL uses 5.0); required there.
        delta: two-sided clipping (INTELLECT-2): cap on the ratio of negative-advantage tokens,
            > 1 + ``epsilon_high``; ``null``: off. Clipped loss types only.
        sapo_temperature_pos: SAPO's gate temperature for tokens with positive advantage.
        sapo_temperature_neg: SAPO's gate temperature for the others.
        beta: KL coefficient; 0 loads no reference.
        kl_in_reward: put β·KL (k1 of π_old against the reference, summed over the completion,
            or per token for REINFORCE++) into the reward instead of a k3 term into the loss.
        top_entropy_quantile: keep in the policy loss only the tokens in this top quantile of
            entropy (Wang et al. 2025 use 0.2; 1 keeps all), over the loss tokens of each
            micro-batch on all ranks.
        entropy_coef: weight of an entropy bonus (the mean per-token entropy of the policy-loss
            tokens, with its gradient) subtracted from the loss; 0: off.
        num_iterations: optimisation passes over each rollout (importance ratios against π_old).
        mask_truncated_completions: leave completions that hit ``max_new_tokens`` without an
            EOS token out of the loss (DAPO's overlong filtering).
        **kwargs: :class:`~lit_pref.modules.online.OnlineRLModule` arguments (rewards, sampling,
            mini-batches, the rollout engine), the reference choice and the model, LoRA,
            optimizer and export arguments every module takes.
    """

    default_lr = 1e-6
    corrects_sampler = True

    def __init__(
        self,
        num_generations: int = 8,
        max_new_tokens: int = 512,
        advantage_estimator: AdvantageEstimator = "grpo",
        scale_rewards: ScaleRewards | bool | None = None,
        multi_objective_aggregation: MultiObjectiveAggregation = "sum_then_normalize",
        normalize_advantages: bool = False,
        loss_type: LossType = "grpo",
        importance_sampling_level: ImportanceSamplingLevel = "token",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        beta: float = 0.04,
        kl_in_reward: bool = False,
        top_entropy_quantile: float = 1.0,
        entropy_coef: float = 0.0,
        num_iterations: int = 1,
        mask_truncated_completions: bool = False,
        **kwargs: Any,
    ) -> None:
        if advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got {advantage_estimator!r}"
            )
        if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(
                f"unknown multi_objective_aggregation {multi_objective_aggregation!r}; "
                f"expected one of {MULTI_OBJECTIVE_AGGREGATIONS}"
            )
        decoupled = multi_objective_aggregation == "normalize_then_sum"
        scale = None if scale_rewards is None else resolve_scale_rewards(scale_rewards)
        if advantage_estimator == "rloo" and scale not in (None, "none"):
            raise ValueError("RLOO advantages are not scaled; drop scale_rewards or set it to none")
        if advantage_estimator in _WHITENED and scale not in (None, "none"):
            raise ValueError(
                f"{advantage_estimator} normalises its advantages over the batch; drop scale_rewards or set it to none"
            )
        if decoupled and advantage_estimator != "grpo":
            raise ValueError(
                "multi_objective_aggregation normalize_then_sum is a grpo-estimator option (GDPO)"
            )
        if decoupled and scale is not None:
            raise ValueError(
                "normalize_then_sum normalises each reward within its group and the sum over the batch; "
                "drop scale_rewards"
            )
        if normalize_advantages and (advantage_estimator in _WHITENED or decoupled):
            raise ValueError(
                "normalize_advantages: these advantages are already normalised over the batch "
                f"({advantage_estimator}, {multi_objective_aggregation})"
            )
        if loss_type == "cispo" and epsilon_high is None:
            raise ValueError(
                "loss_type cispo caps the importance weight at epsilon_high, an absolute bound (ScaleRL uses 5.0): "
                "set epsilon_high"
            )
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
            scale_rewards=("group" if advantage_estimator == "grpo" else "none") if scale is None else scale,
            max_completion_length=max_new_tokens,
            importance_sampling_level=importance_sampling_level,
            delta=delta,
            sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg,
            top_entropy_quantile=top_entropy_quantile,
            entropy_coef=entropy_coef,
            kl_in_reward=kl_in_reward,
        )
        if importance_sampling_level == "sequence" and self.loss_config.aggregation != "sequence_mean":
            rank_zero_warn(
                f"importance_sampling_level=sequence with loss_type {loss_type!r} sums token terms, which weighs "
                "each sequence's ratio by its length; GSPO's objective is loss_type grpo"
            )
        super().__init__(max_new_tokens=max_new_tokens, reference_free=beta == 0, **kwargs)
        self.num_generations = num_generations
        self.num_epochs = num_iterations
        self.advantage_estimator = advantage_estimator
        self.multi_objective_aggregation = multi_objective_aggregation
        self.normalize_advantages = normalize_advantages
        self.mask_truncated_completions = mask_truncated_completions
        rank_zero_info(
            f"{type(self).__name__}: {advantage_estimator} advantages (scale_rewards={self.loss_config.scale_rewards}, "
            f"{multi_objective_aggregation}), loss {loss_type} with {importance_sampling_level} ratios, "
            f"KL {'in the reward' if kl_in_reward else 'in the loss'}, {num_generations} generations per prompt"
        )

    @property
    def reuses_rollout(self) -> bool:
        """Whether a rollout outlives an optimizer step, so that π_old must be scored separately."""
        return self.num_epochs > 1 or self.num_mini_batches > 1

    # -------------------------------------------------------------- rollout
    @torch.no_grad()
    def _score_chunk(self, chunk: Rollout) -> RolloutLogps:
        batch, temperature = chunk.batch(), self.generation.temperature
        # An engine's own log-probs are compared with the trainer's π_old (OnlineRLModule.sampler_correction).
        needs_old = self.reuses_rollout or self.loss_config.kl_in_reward or chunk.sampler_logps is not None
        old = self.logps(self.policy, batch, temperature=temperature) if needs_old else None
        ref = self.reference_logps(batch, temperature=temperature) if self.loss_config.beta else None
        return RolloutLogps(
            None if old is None else old.token_logps, None if ref is None else ref.token_logps
        )

    def reward_columns(self, rollout: Rollout, per_source: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``[N, K]`` each source's raw rewards (NaN where a function gave ``None``) and ``[K]`` their
        weights; the missing-EOS penalty, when set, is one more column of weight 1."""
        columns = [values.float() for values in per_source.values()]
        weights = [source.weight for source in self.reward_set.sources]
        penalty = self.reward_set.missing_eos_penalty
        if penalty is not None:
            columns.append(-penalty * (~rollout.ended.cpu().bool()).float())
            weights.append(1.0)
        device = rollout.completion_input_ids.device
        return torch.stack(columns, -1).to(device), torch.tensor(weights, device=device)

    def advantages(
        self,
        scores: Tensor,
        mask: Tensor | None = None,
        token_kl: Tensor | None = None,
        reward_columns: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, int]:
        """Advantages (``[N]``, or ``[N, L]`` for REINFORCE++) and the number of groups with zero reward spread.

        Args:
            scores: ``[N]`` total reward per completion.
            mask: ``[N, L]`` loss tokens (REINFORCE++ normalises over them).
            token_kl: ``[N, L]`` per-token KL of π_old against the reference, 0 off the mask,
                when the KL is in the reward.
            reward_columns: :meth:`reward_columns`, for ``normalize_then_sum``.
        """
        k, config = self.num_generations, self.loss_config
        whitened = self.advantage_estimator in _WHITENED
        if token_kl is not None and not whitened:
            scores = scores - config.beta * token_kl.sum(-1)
        grouped = scores.view(-1, k)
        zero_std = int((grouped.amax(1) == grouped.amin(1)).sum())
        if whitened:
            if mask is None:
                raise ValueError(f"{self.advantage_estimator} advantages need the loss mask")
            baseline = self.advantage_estimator == "reinforce_plus_plus_baseline"
            return reinforce_plus_plus_advantages(
                scores, mask, num_generations=k if baseline else None, token_kl=token_kl, kl_coef=config.beta
            ), zero_std
        if self.advantage_estimator == "rloo":
            advantages = rloo_advantages(scores, k)
        elif self.multi_objective_aggregation == "normalize_then_sum":
            if reward_columns is None:
                raise ValueError("normalize_then_sum needs each reward's column")
            out = decoupled_advantages(*reward_columns, k)
            advantages, zero_std = out.advantages, out.zero_std_groups
        else:
            out = group_advantages(scores, k, config.scale_rewards)
            advantages, zero_std = out.advantages, out.zero_std_groups
        if self.normalize_advantages:
            advantages = batch_normalize(advantages)
        return advantages, zero_std

    def prepare(self, rollout: Rollout) -> GRPOTensors:
        """Score the G completions per prompt (π_old, reference, rewards) and compute advantages."""
        k, config = self.num_generations, self.loss_config
        logps = RolloutLogps(None, None)
        if self.reuses_rollout or config.beta or rollout.sampler_logps is not None:
            logps = score_in_chunks(rollout, self.rollout_batch_size, self._score_chunk)
        sampler_weights = self.sampler_correction(rollout, logps.old_logps)
        scores, per_source = self.score(rollout)
        loss_mask = rollout.mask
        if self.mask_truncated_completions:
            loss_mask = loss_mask & rollout.ended[:, None]
        token_kl = None
        if config.kl_in_reward:
            assert logps.old_logps is not None and logps.ref_logps is not None
            token_kl = torch.where(loss_mask, kl_penalty(logps.old_logps, logps.ref_logps, "k1"), 0.0)
            self.train_metrics.update({"kl": masked_mean(token_kl, loss_mask)})
        columns = (
            self.reward_columns(rollout, per_source)
            if self.multi_objective_aggregation == "normalize_then_sum"
            else None
        )
        advantages, zero_std = self.advantages(scores, loss_mask, token_kl, columns)
        if zero_std:
            warnings.warn(
                f"{zero_std} of {rollout.num_prompts} prompt groups have zero reward variance (all {k} completions "
                "scored the same): they carry no signal about which completion is better. Many such groups mean the "
                "task is too easy / too hard for the policy, or the reward is too coarse; raise num_generations or "
                "temperature.",
                stacklevel=2,
            )
        self.train_metrics.update({
            "reward_std": scores.view(-1, k).std(1),
            "frac_reward_zero_std": torch.tensor(zero_std / rollout.num_prompts, device=scores.device),
        })  # fmt: skip
        return GRPOTensors(
            logps.old_logps if self.reuses_rollout else None,
            None if config.kl_in_reward else logps.ref_logps,
            advantages,
            loss_mask,
            sampler_weights,
        )

    # ----------------------------------------------------------------- losses
    def minibatch_num_items(self, rollout: Rollout, tensors: GRPOTensors, rows: Tensor) -> Tensor | None:
        """DAPO / CISPO: loss tokens of the whole mini-batch, averaged over ranks (DDP averages
        gradients), so the accumulated micro-batch losses are the exact token-level mean."""
        if self.loss_config.aggregation != "global_token_mean":
            return None
        tokens = tensors.loss_mask[rollout.completion_rows(rows.to(rollout.mask.device))].sum().float()
        return self.trainer.strategy.reduce(tokens, reduce_op="mean")

    def all_ranks(self, values: Tensor) -> Tensor:
        """A 1-D tensor's values from every rank, concatenated (the ranks' lengths may differ)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return values
        counts = self.all_gather(torch.tensor(values.numel(), device=values.device))
        assert isinstance(counts, Tensor)
        counts = counts.reshape(-1)
        width = int(counts.max())
        gathered = self.all_gather(torch.cat([values, values.new_zeros(width - values.numel())]))
        assert isinstance(gathered, Tensor)
        return gathered.reshape(-1, width)[torch.arange(width, device=values.device) < counts[:, None]]

    def rollout_loss(
        self, rollout: Rollout, tensors: GRPOTensors, num_items: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The configured GRPO-family loss of a micro-batch of the rollout."""
        config = self.loss_config
        logps = self.logps(
            self.policy,
            rollout.batch(),
            temperature=self.generation.temperature,
            with_entropy=True,
            entropy_grad=config.entropy_coef != 0,
        )
        assert logps.entropy is not None
        entropy_mask = None
        if config.top_entropy_quantile < 1.0:
            pooled = self.all_ranks(logps.entropy.detach()[tensors.loss_mask])
            entropy_mask = top_entropy_mask(
                logps.entropy, tensors.loss_mask, config.top_entropy_quantile, pooled
            )
        out = grpo_policy_loss(
            logps.token_logps,
            tensors.old_logps,
            tensors.ref_logps,
            tensors.advantages,
            tensors.loss_mask,
            num_items_in_batch=num_items,
            entropy=logps.entropy,
            entropy_mask=entropy_mask,
            sampler_weights=tensors.sampler_weights,
            **config.loss_kwargs(),
        )
        metrics = {
            "loss": out.loss.detach(),
            "entropy": masked_mean(logps.entropy.detach(), rollout.mask, dim=-1),
            "policy/clip_frac_low": out.clip_frac_low,
            "policy/clip_frac_high": out.clip_frac_high,
            "policy/clip_frac": out.clip_frac_region,
        }
        if config.kl_loss_coef:
            metrics["kl"] = out.kl_mean
        if config.entropy_coef:
            metrics["policy_loss"] = out.policy_loss
        if entropy_mask is not None:
            metrics["policy/top_entropy_frac"] = masked_mean(entropy_mask.float(), tensors.loss_mask)
        if tensors.old_logps is not None:
            with torch.no_grad():
                log_ratio = torch.where(rollout.mask, logps.token_logps - tensors.old_logps, 0.0)
                metrics["policy/approx_kl"] = masked_mean(0.5 * log_ratio.square(), rollout.mask)
        return out.loss, metrics
