"""The online-RL base (PPO, GRPO/RLOO): rewards, sampling through a rollout engine, the manual
epochs × mini-batches loop, validation and sample logging, written once.

One training step of an online module, top to bottom (:meth:`OnlineRLModule.training_step`):

1. **sample** ``num_generations`` completions per prompt through the rollout engine;
2. **prepare** the algorithm's typed per-completion tensors (:meth:`~OnlineRLModule.prepare`:
   old / reference log-probs, values, rewards, advantages);
3. **optimise**: ``num_epochs`` passes over ``num_mini_batches`` shuffled mini-batches of whole
   prompt groups, each one optimizer step over ``gradient_accumulation_steps`` micro-batches of
   :meth:`~OnlineRLModule.rollout_loss`, clipped to ``max_grad_norm``; the engine is told the
   weights changed after each step.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lit_pref.engines import EngineName, GenerationSettings, RolloutEngine, engine_from_name
from lit_pref.losses.sampler import logp_mismatch, truncated_is_weights
from lit_pref.modules.base import manual_optimizer_step
from lit_pref.modules.reference import ReferenceModule
from lit_pref.ops import masked_mean
from lit_pref.resume import CHECKPOINT_KEY
from lit_pref.rewards import RewardSet
from lit_pref.rollout import CompletionTensors, Rollout, generate_rollout, score_rollout
from lit_pref.types import PromptBatch

TensorsT = TypeVar("TensorsT", bound=CompletionTensors)


class OnlineRLModule(ReferenceModule, Generic[TensorsT]):
    """Base of the modules that learn from completions they sample (PPO, GRPO, RLOO).

    A subclass sets :attr:`num_generations` and :attr:`num_epochs` and implements
    :meth:`prepare` (the rollout's per-completion tensors, typed) and :meth:`rollout_loss`
    (the loss of one micro-batch); optionally :meth:`minibatch_num_items` and
    :meth:`after_rollout`.

    Optimisation is manual, so ``trainer.global_step`` counts optimizer steps:
    ``num_epochs × num_mini_batches`` per batch of prompts. Trainer-level
    ``gradient_clip_val`` and ``accumulate_grad_batches`` are not available under manual
    optimisation; use ``max_grad_norm`` and ``gradient_accumulation_steps``.

    Args:
        rewards: reward sources: reward-model directories and/or reward functions
            ``"pkg.module:fn"`` (see :mod:`lit_pref.rewards`).
        reward_weights: one weight per reward source (default all 1).
        missing_eos_penalty: subtracted from the score of completions cut at
            ``max_new_tokens`` without an EOS token.
        max_new_tokens: completion length limit.
        temperature: sampling temperature (also divides the logits when scoring).
        top_p: nucleus sampling (1 disables it).
        top_k: top-k sampling (``None`` or 0 disables it).
        rollout_batch_size: completions per engine call and per no-grad scoring pass (rounded
            down to whole prompt groups).
        num_mini_batches: optimizer steps per pass over a rollout.
        gradient_accumulation_steps: micro-batches per mini-batch.
        max_grad_norm: gradient-norm clipping per optimizer step (``None``: off).
        rollout_engine: what samples the completions: ``generate`` (default: the policy's own
            ``generate``, :class:`~lit_pref.engines.GenerateEngine`), ``vllm``
            (:class:`~lit_pref.engines.vllm.VLLMEngine` with its defaults), or an engine object
            with its settings (``class_path`` / ``init_args``).
        rollout_is_cap: with an engine that returns its sampled tokens' log-probs (vLLM), weigh
            each token's policy loss by ``min(π_old / π_engine, cap)`` (truncated importance
            sampling, TRL's ``vllm_importance_sampling_correction`` in its ``token_truncate``
            mode; TRL's cap is 3); ``None``: no correction. The mismatch
            ``|log π_old − log π_engine|`` is logged either way (``rollout/logp_diff_mean`` /
            ``_max``).
        **kwargs: :class:`~lit_pref.modules.reference.ReferenceModule` arguments (the reference
            choice) and :class:`~lit_pref.modules.base.AlignmentModule` ones (model, LoRA,
            optimizer, export…).
    """

    data_target = "prompt_only"
    # Completions sampled per prompt, and optimisation passes over each rollout (set by subclasses).
    num_generations: int = 1
    num_epochs: int = 1
    # Whether prepare() weighs the policy loss by sampler_correction's weights (rollout_is_cap).
    corrects_sampler: bool = False

    def __init__(
        self,
        rewards: str | list[str] | None = None,
        reward_weights: list[float] | None = None,
        missing_eos_penalty: float | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        rollout_batch_size: int = 64,
        num_mini_batches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        rollout_engine: RolloutEngine | EngineName | None = None,
        rollout_is_cap: float | None = None,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        if rewards is None:
            raise ValueError(f"{name} needs rewards: a reward-model directory and/or a function 'pkg.module:fn'")
        for arg, value in (("num_mini_batches", num_mini_batches),
                           ("gradient_accumulation_steps", gradient_accumulation_steps),
                           ("rollout_batch_size", rollout_batch_size)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {max_grad_norm}")
        if rollout_is_cap is not None and not rollout_is_cap > 0:
            raise ValueError(f"rollout_is_cap must be > 0 or null (no correction), got {rollout_is_cap}")
        if rollout_is_cap is not None and not self.corrects_sampler:
            raise ValueError(f"{name} has no importance-sampling correction of the rollout engine: drop rollout_is_cap")
        generation = GenerationSettings(max_new_tokens, temperature, top_p, top_k)
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.reward_set = RewardSet(rewards, reward_weights, missing_eos_penalty, batch_size=rollout_batch_size)
        self.generation = generation
        self.rollout_batch_size = rollout_batch_size
        self.num_mini_batches = num_mini_batches
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.rollout_engine = (
            engine_from_name(rollout_engine or "generate", rollout_batch_size)
            if rollout_engine is None or isinstance(rollout_engine, str)
            else rollout_engine
        )
        self.rollout_is_cap = rollout_is_cap
        self._resumed_engine_state: dict[str, Any] | None = None
        # The last rollout's samples, for lit_pref.callbacks.SampleTable.
        self.latest_samples: list[dict[str, Any]] = []

    def build_networks(self) -> None:
        super().build_networks()
        self.reward_set.load_models(self.tokenizer)

    # --------------------------------------------------------- algorithm hooks
    def prepare(self, rollout: Rollout) -> TensorsT:
        """The per-completion tensors the loss needs (no grad): log-probs, rewards, advantages…"""
        raise NotImplementedError

    def rollout_loss(
        self, rollout: Rollout, tensors: TensorsT, num_items: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, metrics)`` of one micro-batch (a sub-rollout of whole prompt groups).

        ``num_items`` is :meth:`minibatch_num_items` of its mini-batch: when set, the loss is
        already normalised by it and is backpropagated as is; when ``None``, the loss is a mean
        over the micro-batch and weighs by its share of the mini-batch's completions.
        """
        raise NotImplementedError

    def minibatch_num_items(self, rollout: Rollout, tensors: TensorsT, rows: Tensor) -> Tensor | None:
        """The normaliser of a loss that is a mean over a whole mini-batch (prompt ``rows``), e.g.
        DAPO's token count; ``None`` (default): micro-batch means weighted by their share."""
        return None

    def after_rollout(self, rollout: Rollout, tensors: TensorsT) -> None:
        """Called once the optimizer steps of a rollout are taken (PPO's adaptive KL update)."""

    # ------------------------------------------------------------------ rollout
    def sample(self, batch: PromptBatch, num_generations: int | None = None) -> Rollout:
        """``num_generations`` (default :attr:`num_generations`) completions per prompt of ``batch``."""
        k = self.num_generations if num_generations is None else num_generations
        rollout = generate_rollout(self.rollout_engine, self.policy, batch, self.generation, self.tokenizer, k)
        timings = self.rollout_engine.metrics()
        if timings:
            metrics = self.train_metrics if self.training else self.val_metrics
            metrics.update({f"rollout/{name}": torch.tensor(value, device=self.device) for name, value in timings.items()})
        return rollout

    def sampler_correction(self, rollout: Rollout, old_logps: Tensor | None) -> Tensor | None:
        """Compare the engine's log-probs of the sampled tokens with the trainer's (``old_logps``,
        π_old): log ``rollout/logp_diff_mean`` / ``_max`` and return the truncated importance
        weights when ``rollout_is_cap`` is set (``None``: no weighting)."""
        if rollout.sampler_logps is None:
            if self.rollout_is_cap is not None:
                raise ValueError(
                    f"rollout_is_cap corrects the rollout engine's log-probs, but {type(self.rollout_engine).__name__} "
                    "returns none (it samples from the policy itself, so there is no mismatch): set rollout_is_cap "
                    "to null, or use an engine that returns them (vllm)"
                )
            return None
        assert old_logps is not None, "the trainer's π_old log-probs are scored when the engine returns its own"
        mask = rollout.mask
        mean, largest = logp_mismatch(old_logps, rollout.sampler_logps, mask)
        metrics = {"rollout/logp_diff_mean": mean, "rollout/logp_diff_max": largest}
        weights = None
        if self.rollout_is_cap is not None:
            weights = truncated_is_weights(old_logps, rollout.sampler_logps, mask, self.rollout_is_cap)
            metrics["rollout/is_weight_mean"] = masked_mean(weights, mask)
        self.train_metrics.update(metrics)
        return weights

    def score(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """Reward every completion: the weighted total (on the rollout's device) and each source's raw
        reward; logs ``score``, ``rewards/<source>`` and completion statistics, keeps the samples."""
        scores, per_source = score_rollout(self.reward_set.to(self.device), rollout, self.tokenizer.pad_token_id)
        self.train_metrics.update(score_metrics(scores, per_source) | completion_stats(rollout))
        self.latest_samples = sample_rows(rollout, scores, per_source, self.tokenizer)
        return scores, per_source

    # -------------------------------------------------------------------- steps
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:  # manual optimisation: no loss returned
        rollout = self.sample(batch)
        tensors = self.prepare(rollout)
        for _ in range(self.num_epochs):
            for micro_batches in minibatch_indices(
                rollout.num_prompts, self.num_mini_batches, self.gradient_accumulation_steps
            ):
                num_items = self.minibatch_num_items(rollout, tensors, torch.cat(micro_batches))
                size = sum(m.numel() for m in micro_batches)
                for rows in micro_batches:
                    loss, metrics = self.rollout_loss(
                        rollout.select(rows), tensors.select(rollout.completion_rows(rows)), num_items
                    )
                    self.manual_backward(loss if num_items is not None else loss * (rows.numel() / size))
                    self.train_metrics.update(metrics)
                self.step_optimizer(loss.detach())
        self.after_rollout(rollout, tensors)

    def step_optimizer(self, loss: Tensor) -> None:
        """:func:`~lit_pref.modules.base.manual_optimizer_step` (clip, step, schedulers, zero),
        then tell the engine the weights changed."""
        manual_optimizer_step(self, loss, self.max_grad_norm)
        self.rollout_engine.weights_changed(self.policy)

    # ------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["rollout_engine"] = self.rollout_engine.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._resumed_engine_state = checkpoint.get(CHECKPOINT_KEY, {}).get("rollout_engine")

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._resumed_engine_state is not None:
            self.rollout_engine.load_state_dict(self._resumed_engine_state)
            self._resumed_engine_state = None

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Score one completion per held-out prompt: ``val/score`` and completion statistics."""
        rollout = self.sample(batch, num_generations=1)
        scores, per_source = score_rollout(self.reward_set.to(self.device), rollout, self.tokenizer.pad_token_id)
        self.val_metrics.update(score_metrics(scores, per_source) | completion_stats(rollout))


# ------------------------------------------------------------------ helpers
def minibatch_indices(
    num_prompts: int, num_mini_batches: int, accumulation_steps: int, generator: torch.Generator | None = None
) -> list[list[Tensor]]:
    """A shuffled split of prompt rows into mini-batches, each a list of micro-batches.

    One optimizer step is taken per mini-batch; its micro-batches are accumulated. Empty
    micro-batches (more splits than prompts) are left out, and a mini-batch with none at all.
    """
    order = torch.randperm(num_prompts, generator=generator)
    plan = []
    for mini in torch.tensor_split(order, num_mini_batches):
        micros = [m for m in torch.tensor_split(mini, accumulation_steps) if m.numel()]
        if micros:
            plan.append(micros)
    return plan


def completion_stats(rollout: Rollout) -> dict[str, Tensor]:
    """Completion length (mean / min / max, in tokens) and the fraction that end with EOS."""
    lengths = rollout.lengths.float()
    return {
        "completions/mean_length": lengths,
        "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(),
        "completions/eos_fraction": rollout.ended.float(),
    }


def score_metrics(scores: Tensor, per_source: dict[str, Tensor]) -> dict[str, Tensor]:
    """``score`` (the weighted total, penalty included) and ``rewards/<source>`` (raw, where scored)."""
    metrics = {"score": scores.float()}
    if len(per_source) > 1 or any(v.isnan().any() for v in per_source.values()):
        for name, values in per_source.items():
            scored = values[~values.isnan()]
            if scored.numel():
                metrics[f"rewards/{name}"] = scored.to(scores.device)
    return metrics


def sample_rows(
    rollout: Rollout, scores: Tensor, per_source: dict[str, Tensor], tokenizer: PreTrainedTokenizerBase
) -> list[dict[str, Any]]:
    """One plain dict per completion (prompt text, completion text, rewards) for sample tables."""
    prompt_text = tokenizer.batch_decode(
        [
            ids[m.bool()].tolist()
            for ids, m in zip(rollout.prompt_input_ids, rollout.prompt_attention_mask, strict=True)
        ],
        skip_special_tokens=True,
    )
    score_list = scores.float().cpu().tolist()
    sources = {name: values.tolist() for name, values in per_source.items()}
    rows = []
    for j, completion in enumerate(rollout.completions):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        row = {
            "prompt": prompt_text[j // rollout.num_generations],
            "completion": text,
            "score": score_list[j],
        }
        if len(sources) > 1:
            row |= {f"reward/{name}": values[j] for name, values in sources.items()}
        rows.append(row)
    return rows
