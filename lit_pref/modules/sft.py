"""Supervised fine-tuning: the first stage of the pipeline."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lit_pref.modules.base import AlignmentModule


class SFT(AlignmentModule):
    """Supervised fine-tuning with the NLL of completion tokens.

    Which tokens count is decided by the data module: completion (or assistant-turn) tokens by
    default, every token after the first with ``completion_only_loss: false``. The loss is the
    mean over all counted tokens of the batch, so long and short examples weigh per token.

    Args:
        **kwargs: :class:`~lit_pref.modules.base.AlignmentModule` arguments (model, LoRA,
            optimizer, export…).
    """

    data_target = "sft"
    default_lr = 2e-5

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def shared_step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        logps = self.logps(self.policy, batch)
        tokens = logps.count.sum()
        loss = -logps.token_logps.sum() / tokens.clamp(min=1)
        return loss, {"loss": loss, "tokens": tokens.float()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, metrics = self.shared_step(batch)
        self.train_metrics.update(metrics)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, metrics = self.shared_step(batch)
        self.val_metrics.update(metrics)
        return loss
