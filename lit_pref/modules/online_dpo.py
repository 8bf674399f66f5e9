"""Online DPO (Guo et al. 2024): DPO on pairs the current policy samples and the rewards rank."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_pref.losses.dpo import DPOLossConfig, dpo_loss
from lit_pref.metrics import reward_metrics
from lit_pref.modules.online import OnlineRLModule
from lit_pref.rewards import import_object
from lit_pref.rollout import CompletionTensors, Rollout, score_in_chunks

# A pairwise judge: (prompts, [(completion a, completion b)]) → per pair 0 if a is better, 1 if b.
PairwiseJudge = Callable[[Sequence[Any], Sequence[tuple[Any, Any]]], Sequence[int]]


def best_and_worst(scores: Tensor, num_generations: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per prompt group of ``num_generations`` adjacent rows: the row of the highest score (chosen),
    of the lowest (rejected), and whether they differ in score (a tie teaches nothing).

    Ties for the highest (lowest) score go to the first (last) such row, so that a chosen and a
    rejected row are always two different completions.
    """
    grouped = scores.view(-1, num_generations)
    k = num_generations
    chosen = grouped.argmax(1)
    rejected = k - 1 - grouped.flip(1).argmin(1)
    offsets = torch.arange(grouped.shape[0], device=scores.device) * k
    return chosen + offsets, rejected + offsets, grouped.amax(1) > grouped.amin(1)


def pair_rollout(rollout: Rollout, chosen: Tensor, rejected: Tensor) -> Rollout:
    """The rollout of each prompt's (chosen, rejected) completions, in that order (two per prompt)."""
    rows = torch.stack([chosen, rejected], 1).reshape(-1).to(rollout.completion_input_ids.device)
    index = rows.tolist()
    return dataclasses.replace(
        rollout,
        completion_input_ids=rollout.completion_input_ids[rows],
        completion_attention_mask=rollout.completion_attention_mask[rows],
        ended=rollout.ended[rows],
        num_generations=2,
        completions=[rollout.completions[i] for i in index],
        sampler_logps=None if rollout.sampler_logps is None else rollout.sampler_logps[rows],
    )


@dataclass
class _Sums(CompletionTensors):
    """``[N]`` summed completion log-probs of one scoring chunk."""

    values: Tensor


@dataclass
class OnlineDPOTensors(CompletionTensors):
    """Per-completion tensors of an Online DPO rollout.

    Attributes:
        role: ``[N]`` +1 for each prompt's chosen completion, −1 for its rejected one, 0 otherwise.
        ref_logps: ``[N]`` the reference's summed log-prob of chosen / rejected completions (0
            elsewhere; all 0 reference-free).
        decided: ``[N]`` whether the completion's group has a preference (its scores not all tied).
    """

    role: Tensor
    ref_logps: Tensor
    decided: Tensor


class OnlineDPO(OnlineRLModule["OnlineDPOTensors"]):
    """Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").

    Each training step takes a batch of prompts and:

    1. samples ``num_generations`` completions per prompt from the current policy;
    2. ranks them: by the configured ``rewards`` (reward-model directories or
       ``pkg.module:fn`` functions, weighted, ``missing_eos_penalty``), the best as chosen and the
       worst as rejected; or, with ``judge`` (two generations), by a pairwise judge (the rewards
       are then only logged);
    3. trains any DPO-family loss of :mod:`lit_pref.losses.dpo` on the (chosen, rejected) pairs
       against the reference (``loss_type``, ``beta``… as :class:`~lit_pref.modules.dpo.DPO`),
       both scored at the sampling temperature.

    Groups whose completions all scored the same carry no preference and are left out of the
    loss (``tie_fraction``). Only the two selected completions per prompt are scored by the policy
    and the reference. Logged: ``score`` (mean reward of every sample), ``rewards/chosen_score`` and
    ``rewards/rejected_score`` (their rewards), ``win_rate`` (how often the chosen completion's reward
    is strictly higher), the DPO reward metrics (``rewards/margins``, ``rewards/accuracies``…) and
    completion statistics; ``val/score`` held out.

    Args:
        num_generations: completions sampled per prompt (≥ 2; the best and the worst are paired).
        max_new_tokens: completion length limit.
        beta: β of the DPO loss.
        loss_type: a DPO loss name or a list (see :class:`~lit_pref.modules.dpo.DPO`).
        loss_weights: one weight per loss type.
        label_smoothing: cDPO / robust label noise ε.
        judge: a pairwise judge ``fn(prompts, pairs) -> [0 | 1 per pair]`` (or its
            ``pkg.module:fn`` path) that prefers one of two completions; needs
            ``num_generations: 2``; the rewards are then only logged (``score``, ``val/score``),
            they do not pick the pair.
        **kwargs: :class:`~lit_pref.modules.online.OnlineRLModule` arguments (rewards, sampling,
            mini-batches, rollout engine), the reference choice and the model, LoRA, optimizer and
            export arguments every module takes.
    """

    default_lr = 5e-7

    def __init__(
        self,
        num_generations: int = 2,
        max_new_tokens: int = 64,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        judge: str | PairwiseJudge | None = None,
        **kwargs: Any,
    ) -> None:
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 to form a pair, got {num_generations}")
        if judge is not None and num_generations != 2:
            raise ValueError(f"a pairwise judge compares two completions; set num_generations: 2, not {num_generations}")
        self.loss_config = DPOLossConfig(
            loss_type=tuple([loss_type] if isinstance(loss_type, str) else loss_type),
            loss_weights=None if loss_weights is None else tuple(loss_weights),
            beta=beta,
            label_smoothing=label_smoothing,
        )
        super().__init__(max_new_tokens=max_new_tokens, **kwargs)
        self.num_generations = num_generations
        self.judge: PairwiseJudge | None = import_object(judge) if isinstance(judge, str) else judge

    # -------------------------------------------------------------- rollout
    def rank(self, rollout: Rollout, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Chosen rows, rejected rows and which groups are decided (see :func:`best_and_worst`)."""
        if self.judge is None:
            return best_and_worst(scores, self.num_generations)
        pairs = list(zip(rollout.completions[0::2], rollout.completions[1::2], strict=True))
        verdicts = torch.as_tensor(list(self.judge(rollout.prompts, pairs)), device=scores.device)
        if verdicts.shape != (rollout.num_prompts,) or not bool(((verdicts == 0) | (verdicts == 1)).all()):
            raise ValueError(f"the judge must return 0 or 1 for each of the {rollout.num_prompts} pairs, got {verdicts.tolist()}")
        first = torch.arange(rollout.num_prompts, device=scores.device) * 2
        return first + verdicts, first + 1 - verdicts, torch.ones_like(verdicts, dtype=torch.bool)

    @torch.no_grad()
    def _reference_sums(self, chunk: Rollout) -> _Sums:
        return _Sums(self.reference_logps(chunk.batch(), temperature=self.generation.temperature).sum)

    def prepare(self, rollout: Rollout) -> OnlineDPOTensors:
        """Rank the samples, and score each prompt's pair under the reference (no grad)."""
        scores, _ = self.score(rollout)
        chosen, rejected, decided = self.rank(rollout, scores)
        n = rollout.num_completions
        role = torch.zeros(n, dtype=torch.long, device=scores.device)
        role[chosen], role[rejected] = 1, -1
        ref = torch.zeros(n, device=scores.device)
        if self.reference.kind != "none":
            pairs = pair_rollout(rollout, chosen, rejected)
            sums = score_in_chunks(pairs, self.rollout_batch_size, self._reference_sums)
            ref[torch.stack([chosen, rejected], 1).reshape(-1)] = sums.values.float().to(ref.device)
        ties = int((~decided).sum())
        if ties:
            warnings.warn(
                f"{ties} of {rollout.num_prompts} prompts got the same reward for all {self.num_generations} samples: "
                "no preference, left out of the loss; raise num_generations or temperature if this is frequent",
                stacklevel=2,
            )
        self.train_metrics.update({
            "rewards/chosen_score": scores[chosen],
            "rewards/rejected_score": scores[rejected],
            "win_rate": (scores[chosen] > scores[rejected]).float(),
            "tie_fraction": (~decided).float(),
        })  # fmt: skip
        group_decided = decided.repeat_interleave(self.num_generations)
        return OnlineDPOTensors(role, ref, group_decided)

    # ----------------------------------------------------------------- losses
    def rollout_loss(
        self, rollout: Rollout, tensors: OnlineDPOTensors, num_items: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The DPO loss of the micro-batch's (chosen, rejected) pairs; undecided pairs weigh 0."""
        chosen = (tensors.role == 1).nonzero().squeeze(1)
        rejected = (tensors.role == -1).nonzero().squeeze(1)
        pairs = pair_rollout(rollout, chosen, rejected)
        policy = self.logps(self.policy, pairs.batch(), temperature=self.generation.temperature)
        sums = policy.sum.view(-1, 2)
        ref = None
        if self.reference.kind != "none":
            ref = torch.stack([tensors.ref_logps[chosen], tensors.ref_logps[rejected]], 1).to(sums.dtype)
        counts = policy.count.view(-1, 2)
        out = dpo_loss(
            sums[:, 0], sums[:, 1], None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
            self.loss_config, chosen_lengths=counts[:, 0], rejected_lengths=counts[:, 1],
        )  # fmt: skip
        weight = tensors.decided[chosen].to(out.losses.dtype)
        # Undecided pairs count 0; a micro-batch of ties only has loss 0 (no gradient, no 0/0).
        loss = (out.losses * weight).sum() / weight.sum().clamp(min=1)
        metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards, sums[:, 0], sums[:, 1])
        return loss, metrics | {"loss": loss.detach()}
