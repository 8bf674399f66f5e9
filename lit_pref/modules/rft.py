"""Rejection-sampling fine-tuning (RAFT, ReST-EM, expert iteration) on the online-RL base, and
:class:`IterativeSFT`: SFT updates on (prompt, completion) pairs that user code produces."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_pref.callbacks.faults import TrainingDiverged
from lit_pref.data.collate import Collator
from lit_pref.data.tokenize import TruncationConfig, tokenize_row
from lit_pref.losses.rft import KEEP_RULES, KeepRule, rft_loss, select_completions
from lit_pref.modules.base import AlignmentModule
from lit_pref.modules.online import OnlineRLModule
from lit_pref.rollout import CompletionTensors, Rollout
from lit_pref.types import CompletionBatch


@dataclass
class RFTTensors(CompletionTensors):
    """Per-completion tensors of a rejection-sampling round.

    Attributes:
        keep: ``[N]`` bool, the completions the round fine-tunes on.
    """

    keep: Tensor


def kept_batch(rollout: Rollout, rows: Tensor) -> CompletionBatch:
    """Completion ``rows`` of ``rollout``, each after its own copy of its prompt (one completion per
    prompt), so that the policy runs on the kept completions only."""
    prompts = rows // rollout.num_generations
    return CompletionBatch(
        prompt_input_ids=rollout.prompt_input_ids[prompts],
        prompt_attention_mask=rollout.prompt_attention_mask[prompts],
        completion_input_ids=rollout.completion_input_ids[rows],
        completion_attention_mask=rollout.completion_attention_mask[rows],
    )


class RFT(OnlineRLModule["RFTTensors"]):
    """Rejection-sampling fine-tuning: RAFT (Dong et al. 2023), ReST-EM (Singh et al. 2023), expert
    iteration.

    Each training step is one round on a batch of prompts:

    1. sample ``num_generations`` (k) completions per prompt from the current policy;
    2. reward them (reward models and/or functions, weighted; ``missing_eos_penalty``);
    3. keep, per prompt (:func:`lit_pref.losses.rft.select_completions`):

       * ``keep: top1`` — the best of the k (RAFT's best-of-k); with ``reward_threshold`` also
         set, only when it reaches the threshold (expert iteration);
       * ``keep: threshold`` — every completion whose reward is ≥ ``reward_threshold``
         (ReST-EM's binary filter; a prompt may keep several or none);

    4. fine-tune on the kept completions with the token-mean NLL of their tokens
       (:func:`lit_pref.losses.rft.rft_loss`; the policy at temperature 1, prompts not counted)
       for ``sft_epochs`` passes over ``num_mini_batches`` shuffled mini-batches of whole prompt
       groups, one optimizer step each, accumulated over ``gradient_accumulation_steps``
       micro-batches. Only the kept completions go through the policy.

    No reference model is used (``reference`` must stay ``auto`` / ``none``).

    A round in which no completion is kept (possible with ``reward_threshold``) changes no weight:
    its backward passes reach no parameter, so its optimizer steps have no gradient to apply;
    ``trainer.global_step`` and step-interval schedulers still advance. A warning counts such
    rounds; lower ``reward_threshold`` or raise ``num_generations`` / ``temperature`` if they are
    frequent.

    ``trainer.global_step`` counts optimizer steps: ``sft_epochs × num_mini_batches`` per round;
    see :class:`~lit_pref.modules.online.OnlineRLModule`.

    Logged per round: ``score`` (mean reward of all samples), ``rft/kept_score`` (of the kept
    ones), ``rft/keep_rate`` (share of samples kept), ``rft/prompt_keep_rate`` (share of prompts
    that kept at least one), ``loss`` (NLL per kept token, over the round's steps), completion
    statistics; ``val/score`` held out. Sample tables get a ``kept`` column.

    Args:
        num_generations: completions sampled per prompt k (≥ 1; ≥ 2 for ``top1`` without a
            threshold, which would otherwise keep every sample).
        keep: ``top1`` or ``threshold`` (see above).
        reward_threshold: the reward a kept completion must reach (required by ``threshold``,
            optional with ``top1``).
        sft_epochs: fine-tuning passes over each round's kept completions.
        **kwargs: :class:`~lit_pref.modules.online.OnlineRLModule` arguments (rewards, sampling,
            mini-batches, the rollout engine) and the model, LoRA, optimizer and export arguments
            every module takes.
    """

    def __init__(
        self,
        num_generations: int = 8,
        keep: KeepRule = "top1",
        reward_threshold: float | None = None,
        sft_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if keep not in KEEP_RULES:
            raise ValueError(f"keep must be one of {KEEP_RULES}, got {keep!r}")
        if reward_threshold is not None and not math.isfinite(reward_threshold):
            raise ValueError(f"reward_threshold must be a finite number or null, got {reward_threshold}")
        if keep == "threshold" and reward_threshold is None:
            raise ValueError(
                "keep: threshold keeps the completions whose reward is >= reward_threshold; set it"
            )
        if keep == "top1" and reward_threshold is None and num_generations == 1:
            raise ValueError(
                "keep: top1 of num_generations=1 keeps every sample (plain SFT on the policy's own outputs); "
                "sample num_generations >= 2 or set reward_threshold"
            )
        if sft_epochs < 1:
            raise ValueError(f"sft_epochs must be >= 1, got {sft_epochs}")
        if kwargs.get("ref_model_name_or_path") is not None:
            raise ValueError("RFT compares with no reference model; drop ref_model_name_or_path")
        super().__init__(reference_free=True, **kwargs)
        self.num_generations = num_generations
        self.num_epochs = sft_epochs
        self.keep: KeepRule = keep
        self.reward_threshold = reward_threshold
        # Rounds so far in which no completion was kept (counted in their warning).
        self.empty_rounds = 0
        bar = "" if reward_threshold is None else f" with reward >= {reward_threshold:g}"
        rank_zero_info(
            f"RFT: of {num_generations} samples per prompt keep {'the best' if keep == 'top1' else 'every one'}{bar}, "
            f"then {sft_epochs} SFT pass(es) over them per round"
        )

    # -------------------------------------------------------------- rollout
    def prepare(self, rollout: Rollout) -> RFTTensors:
        """Reward the samples and select the ones the round fine-tunes on."""
        k = self.num_generations
        scores, _ = self.score(rollout)
        keep = select_completions(scores, k, self.keep, self.reward_threshold)
        for row, kept in zip(self.latest_samples, keep.tolist(), strict=True):
            row["kept"] = kept
        metrics = {"rft/keep_rate": keep.float(), "rft/prompt_keep_rate": keep.view(-1, k).any(1).float()}
        if keep.any():
            metrics["rft/kept_score"] = scores[keep].float()
        self.train_metrics.update(metrics)
        if not self.trainer.strategy.reduce(keep.sum().float(), reduce_op="sum"):
            self.empty_rounds += 1
            warnings.warn(
                f"RFT kept none of the {rollout.num_completions} samples of this round (keep={self.keep}, "
                f"reward_threshold={self.reward_threshold}): no weight changes; {self.empty_rounds} such round(s) "
                "so far. Lower reward_threshold, or raise num_generations or temperature.",
                stacklevel=2,
            )
        return RFTTensors(keep)

    # ----------------------------------------------------------------- losses
    def minibatch_num_items(self, rollout: Rollout, tensors: RFTTensors, rows: Tensor) -> Tensor:
        """Kept tokens of the whole mini-batch (prompt ``rows``), averaged over ranks (DDP averages
        gradients), so the accumulated micro-batch losses are its exact token mean."""
        completions = rollout.completion_rows(rows.to(rollout.mask.device))
        tokens = (rollout.mask[completions] & tensors.keep[completions, None]).sum().float()
        return self.trainer.strategy.reduce(tokens, reduce_op="mean")

    def rollout_loss(
        self, rollout: Rollout, tensors: RFTTensors, num_items: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Token-mean NLL of the micro-batch's kept completions, over the mini-batch's kept tokens."""
        assert num_items is not None, "RFT's loss is normalised by minibatch_num_items"
        if not num_items:
            # Nothing kept in the mini-batch on any rank: a backward that reaches no weight, so
            # the optimizer step that follows has no gradient to apply (no 0/0, no momentum step).
            return torch.zeros((), device=self.device, requires_grad=True), {}
        kept = tensors.keep.nonzero().squeeze(1)
        # A micro-batch that kept nothing here while the mini-batch kept some still runs one
        # completion, weighted 0, so that every rank takes the same forward and backward passes.
        rows = kept if kept.numel() else kept.new_zeros(1)
        logps = self.logps(self.policy, kept_batch(rollout, rows))
        mask = logps.mask & tensors.keep[rows, None]
        loss = rft_loss(logps.token_logps, mask, num_items)
        return loss, {"loss": -logps.token_logps.detach()[mask]}


# ------------------------------------------------------- user-driven SFT updates
@dataclass
class SFTUpdate:
    """What one :meth:`IterativeSFT.train_on` call did.

    Attributes:
        steps: optimizer steps taken.
        tokens: completion tokens trained on, summed over the steps.
        loss: NLL per completion token over the call's steps, before each step's update
            (``None`` when there was nothing to train on).
    """

    steps: int
    tokens: int
    loss: float | None


class IterativeSFT:
    """SFT updates on (prompt, completion) pairs your own code produces, driven from a plain Python
    loop with no Lightning ``Trainer`` (the use of TRL's former ``IterativeSFTTrainer``): generate,
    filter, label or correct completions however you like, then call :meth:`train_on`.

    The pairs are tokenised as the data module tokenises SFT rows (chat templates for
    conversational prompts, EOS appended, the completion split from the prompt in token space),
    and the loss is the token-mean NLL of the completion tokens through the shared log-prob path
    (:func:`lit_pref.losses.rft.rft_loss`). One process, no gradient accumulation; for
    distributed runs train through the ``Trainer`` (e.g. :class:`RFT`, ``configs/rft.yaml``).

    Example::

        module = SFT(model_name_or_path="outputs/sft/model", optimizer=partial(torch.optim.AdamW, lr=1e-5))
        sft = IterativeSFT(module, batch_size=8)
        for _ in range(rounds):
            prompts, completions = my_round(module.policy, module.tokenizer)
            print(sft.train_on(prompts, completions).loss)
        module.save_pretrained("outputs/iterative")

    Args:
        module: the lit_pref module whose policy is trained (e.g. :class:`~lit_pref.modules.SFT`):
            its networks are built here (``configure_model``) if they are not yet, and its
            optimizer and scheduler factories, tokenizer and ``chunk_size`` are used. Export
            the result with ``module.save_pretrained``.
        batch_size: pairs per optimizer step.
        epochs: passes over each call's pairs (reshuffled every pass).
        max_grad_norm: gradient-norm clipping per step (``None``: off).
        truncation: length limits for the pairs (default none).
        device: where to train (moves the module there); ``None`` leaves it where it is.
    """

    def __init__(
        self,
        module: AlignmentModule,
        batch_size: int = 8,
        epochs: int = 1,
        max_grad_norm: float | None = 1.0,
        truncation: TruncationConfig | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("epochs", epochs)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {max_grad_norm}")
        module.configure_model()
        if device is not None:
            module.to(device)
        configured = module.configure_optimizers()
        if isinstance(configured, dict):
            self.optimizer: torch.optim.Optimizer = configured["optimizer"]
            self.scheduler: Any = configured["lr_scheduler"]["scheduler"]
        else:
            self.optimizer, self.scheduler = configured, None
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                "IterativeSFT steps its scheduler every optimizer step; ReduceLROnPlateau needs a monitor"
            )
        self.module = module
        self.batch_size = batch_size
        self.epochs = epochs
        self.max_grad_norm = max_grad_norm
        self.truncation = truncation or TruncationConfig()
        self.collate = Collator(module.tokenizer.pad_token_id)

    def tokenize(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[dict[str, Any]]:
        """Token columns of each pair (prompt / completion ids, completion mask); rows that
        ``truncation`` drops are left out, with a warning."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        columns = ("prompt_input_ids", "completion_input_ids", "completion_mask")
        rows = [
            tokenize_row(
                {"prompt": prompt, "completion": completion},
                i,
                tokenizer=self.module.tokenizer,
                target="sft",
                truncation=self.truncation,
            )
            for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True))
        ]
        kept = [{c: row[c] for c in columns} for row in rows if not row["_drop"]]
        if len(kept) < len(rows):
            warnings.warn(f"truncation dropped {len(rows) - len(kept)} of {len(rows)} pairs", stacklevel=3)
        return kept

    def train_on(self, prompts: Sequence[Any], completions: Sequence[Any]) -> SFTUpdate:
        """Fine-tune on ``completions[i]`` following ``prompts[i]`` (text, or message lists for
        conversational prompts): ``epochs`` passes of ``ceil(n / batch_size)`` optimizer steps.

        An empty call (no pairs, or all dropped by truncation) warns and changes nothing. A
        non-finite loss raises :class:`~lit_pref.callbacks.faults.TrainingDiverged` before its
        step is applied.
        """
        rows = self.tokenize(prompts, completions)
        if not rows:
            warnings.warn(
                "IterativeSFT.train_on got no (prompt, completion) pair to train on: no update", stacklevel=2
            )
            return SFTUpdate(steps=0, tokens=0, loss=None)
        module = self.module
        module.policy.train()
        params = [p for p in module.parameters() if p.requires_grad]
        steps, nll, counted = 0, 0.0, 0
        for _ in range(self.epochs):
            for chunk in torch.randperm(len(rows)).split(self.batch_size):
                batch = cast(
                    CompletionBatch,
                    move_data_to_device(self.collate([rows[i] for i in chunk.tolist()]), module.device),
                )
                logps = module.logps(module.policy, batch)
                loss = rft_loss(logps.token_logps, logps.mask)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"IterativeSFT: the loss is {float(loss)} at step {steps + 1} of this call; the step was not applied"
                    )
                loss.backward()
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.scheduler is not None:
                    self.scheduler.step()
                steps += 1
                tokens = int(logps.mask.sum())
                nll += float(loss.detach()) * tokens
                counted += tokens
        return SFTUpdate(steps=steps, tokens=counted, loss=nll / counted)
