"""KTO: alignment from binary (desirable / undesirable) feedback, with a KL reference point."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_pref.data.mismatch import KL_COLUMN
from lit_pref.distributed import all_reduce_sum
from lit_pref.losses.kto import KTOLossConfig, kto_kl_estimate, kto_loss, kto_weight_ratio_warning
from lit_pref.metrics import UnpairedMetricGroup
from lit_pref.modules.reference import OfflineReferenceModule
from lit_pref.types import CompletionBatch, UnpairedBatch


def kl_batch(batch: UnpairedBatch) -> CompletionBatch:
    """The batch's prompts with their mismatched completions (the pairs z0 is estimated from)."""
    if KL_COLUMN not in batch:
        raise ValueError(
            f"KTO needs the {KL_COLUMN!r} / 'kl_completion_attention_mask' batch columns (each prompt with "
            "another row's completion, for the KL reference point); PreferenceDataModule adds them for "
            "unpaired data, a custom data pipeline must provide them too"
        )
    return CompletionBatch(
        prompt_input_ids=batch["prompt_input_ids"],
        prompt_attention_mask=batch["prompt_attention_mask"],
        completion_input_ids=batch["kl_completion_input_ids"],
        completion_attention_mask=batch["kl_completion_attention_mask"],
        # A vision-language batch's prompts come with their images.
        **{key: batch[key] for key in ("vision_inputs", "image_counts") if key in batch},  # type: ignore[typeddict-item]
    )


class KTO(OfflineReferenceModule):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306).

    Trains on unpaired rows (prompt, completion, desirable or not); paired data is converted to
    one desirable and one undesirable row per pair. The implicit reward is the summed log-ratio
    ``r = log π_θ(y|x) − log π_ref(y|x)`` and the loss compares it with the reference point z0.

    z0 is estimated every step from mismatched pairs: each prompt of the batch with the
    completion of another row (the data module's ``kl_completion_input_ids`` column: the next
    row with a different prompt, fixed per row). It is ``max(0, mean log-ratio)`` over the pairs
    of all ranks (sum and count all-reduced, then clamped), detached, so the policy side of the
    KL pass runs without grad. ``apo_zero_unpaired`` ignores z0; it is still logged as ``kl``.

    The reference is any :class:`~lit_pref.reference.Reference` choice. With
    ``precompute_ref_logps`` the table holds two values per row (``reference_values``): the
    reference log-prob of the row's completion and of its mismatched completion.

    Args:
        beta: β, the sharpness of the sigmoid value function.
        loss_type: ``kto`` or ``apo_zero_unpaired`` (APO-zero on unpaired labels).
        desirable_weight: λ_D, the weight of desirable rows.
        undesirable_weight: λ_U, the weight of undesirable rows. The paper recommends
            λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3] over the training set; a warning with the counts is
            shown once per fit when it is outside.
        **kwargs: :class:`~lit_pref.modules.reference.OfflineReferenceModule` arguments (the
            reference choice, precomputed reference log-probs) and :class:`~lit_pref.modules.base.AlignmentModule` ones (model, LoRA,
            optimizer, export…).
    """

    data_target = "unpaired"
    default_lr = 1e-6

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["kto", "apo_zero_unpaired"] = "kto",
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self.reference.kind == "none":
            raise ValueError(
                "KTO needs a reference model; reference='none' / reference_free are not available"
            )
        self.loss_config = KTOLossConfig(
            loss_type=loss_type,
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
        )
        # Untrained (policy == reference, z0 = 0): every row's loss is λ_y·σ(0) = λ_y / 2.
        self.stuck_loss = desirable_weight / 2 if desirable_weight == undesirable_weight else None
        self.train_metrics = UnpairedMetricGroup("train/")
        self.val_metrics = UnpairedMetricGroup("val/")

    def reference_values(self, batch: UnpairedBatch) -> Tensor:
        """``[B, 2]``: reference log-prob of each row's completion and of its mismatched completion."""
        return torch.stack([self.reference_logps(batch).sum, self.reference_logps(kl_batch(batch)).sum], -1)

    # ------------------------------------------------------------------- steps
    def shared_step(self, batch: UnpairedBatch, split: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and per-example metrics of one batch (``split`` is ``train`` or ``val``)."""
        labels = batch["label"]
        policy = self.logps(self.policy, batch).sum
        with torch.no_grad():
            policy_kl = self.logps(self.policy, kl_batch(batch)).sum
        reference = self.reference_values_for(batch, split)
        z0 = kto_kl_estimate(policy_kl, reference[:, 1].to(policy_kl.dtype), all_reduce_sum=all_reduce_sum)
        out = kto_loss(policy, reference[:, 0].to(policy.dtype), labels, z0, self.loss_config)
        metrics = {
            "loss": out.losses,
            "kl": out.kl,
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "logps/chosen": policy[labels],
            "logps/rejected": policy[~labels],
        }
        return out.losses.mean(), metrics

    # ------------------------------------------------------------------ checks
    def on_fit_start(self) -> None:
        super().on_fit_start()
        labels = self.training_labels()
        if labels is None:
            rank_zero_info("KTO: no training-set labels to check λ_D·n_D/(λ_U·n_U) against [1, 4/3]")
            return
        message = kto_weight_ratio_warning(labels, self.loss_config)
        if message is not None:
            rank_zero_warn(message)

    def training_labels(self) -> Tensor | None:
        """The ``label`` column of the whole training split, when the data module exposes it."""
        splits = getattr(self.datamodule(), "splits", None)
        train = splits.get("train") if isinstance(splits, dict) else None
        if train is None or "label" not in train.column_names:
            return None
        return torch.tensor(train.select_columns(["label"])[:]["label"], dtype=torch.bool)
