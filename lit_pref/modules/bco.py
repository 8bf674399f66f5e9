"""BCO: alignment from binary feedback as a binary classifier on the implicit reward."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_pref.distributed import all_reduce_sum
from lit_pref.losses.kto import RunningMean, bco_loss
from lit_pref.metrics import UnpairedMetricGroup
from lit_pref.modules.reference import OfflineReferenceModule
from lit_pref.types import UnpairedBatch

CHECKPOINT_KEY = "bco_reward_shift"


class BCO(OfflineReferenceModule):
    """Binary Classifier Optimization (Jung et al. 2024, arXiv:2404.04656).

    Trains on unpaired rows (prompt, completion, desirable or not); paired data is converted to
    one desirable and one undesirable row per pair. The implicit reward
    ``r = β·(log π_θ(y|x) − log π_ref(y|x))`` is the logit of a "desirable?" classifier trained
    with binary cross-entropy on ``r − δ``.

    The reward shift δ is the running mean of every training reward seen so far, over all ranks
    (each micro-batch's reward sum and count are all-reduced before the update, so every rank
    holds the same δ). A step's loss uses δ from the steps before it; validation reads δ without
    updating it. δ is saved in and restored from checkpoints, so a resumed run continues with
    the same shift. (The paper's optional underlying-distribution-matching reweighting, which
    needs a separate embedding classifier, is not implemented.)

    Args:
        beta: β, the scale of the implicit reward.
        **kwargs: :class:`~lit_pref.modules.reference.OfflineReferenceModule` arguments (the
            reference choice, precomputed reference log-probs) and :class:`~lit_pref.modules.base.AlignmentModule` ones (model, LoRA,
            optimizer, export…).
    """

    data_target = "unpaired"
    default_lr = 1e-6
    # Untrained (policy == reference, δ = 0): every row's loss is −log σ(0).
    stuck_loss = math.log(2)

    def __init__(self, beta: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.reference.kind == "none":
            raise ValueError(
                "BCO needs a reference model; reference='none' / reference_free are not available"
            )
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        self.beta = beta
        self.reward_shift = RunningMean()
        self.train_metrics = UnpairedMetricGroup("train/")
        self.val_metrics = UnpairedMetricGroup("val/")

    def reference_values(self, batch: UnpairedBatch) -> Tensor:
        """``[B, 1]`` reference log-prob of each row's completion."""
        return self.reference_logps(batch).sum[:, None]

    # ------------------------------------------------------------------- steps
    def shared_step(self, batch: UnpairedBatch, split: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and per-example metrics of one batch; in training, its rewards then move δ."""
        labels = batch["label"]
        policy = self.logps(self.policy, batch).sum
        reference = self.reference_values_for(batch, split)[:, 0].to(policy.dtype)
        out = bco_loss(policy, reference, labels, self.reward_shift.value, self.beta)
        metrics = {
            "loss": out.losses,
            "delta": self.reward_shift.value.to(policy.device, torch.float32),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "logps/chosen": policy[labels],
            "logps/rejected": policy[~labels],
        }
        if split == "train":
            # After the loss: a step's loss uses δ of the steps before it.
            self.update_reward_shift(self.beta * (policy - reference).detach())
        return out.losses.mean(), metrics

    def update_reward_shift(self, rewards: Tensor) -> None:
        """Add this micro-batch's rewards of every rank to δ (a collective: all ranks call it)."""
        totals = torch.stack(
            [rewards.float().sum(), torch.tensor(float(rewards.numel()), device=rewards.device)]
        )
        totals = all_reduce_sum(totals)
        self.reward_shift.update_from_totals(totals[0], totals[1].round())

    # -------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = self.reward_shift.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if CHECKPOINT_KEY in checkpoint:
            self.reward_shift.load_state_dict(checkpoint[CHECKPOINT_KEY])
        else:
            rank_zero_warn("the checkpoint holds no BCO reward shift δ; it restarts from 0")
