"""Supervised fine-tuning: the first stage of the pipeline."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import SumMetric

from lit_pref.modules.base import AlignmentModule
from lit_pref.types import CompletionBatch


class NEFTuneNoise:
    """Forward hook on the input embeddings adding NEFTune noise while the module is training.

    A standalone object (not a bound method of the LightningModule), so copying the model for
    export never drags the module along.
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def __call__(self, module: torch.nn.Module, args: Any, output: Tensor) -> Tensor | None:
        # The embedding's training flag follows Lightning's train / eval switches: no noise in
        # validation, generation or export.
        if not module.training:
            return None
        length, dim = output.shape[-2], output.shape[-1]
        bound = self.alpha / math.sqrt(length * dim)
        return output + torch.empty_like(output).uniform_(-bound, bound)


class SFT(AlignmentModule):
    """Supervised fine-tuning with the NLL of completion tokens.

    Which tokens count is decided by the data module: completion (or assistant-turn) tokens by
    default, every token after the first with ``completion_only_loss: false``. The loss is the
    mean over all counted tokens of the batch, so long and short examples weigh per token.

    Packed batches (``packing: true`` in the data module, :mod:`lit_pref.data.packing`) are scored
    with per-example position ids and attention kept within each example (``packed_attention``:
    span attention, a block-diagonal causal mask or the varlen kernel), so each example sees only
    its own tokens and the loss equals the unpacked one.

    Logged: ``loss`` (mean NLL per counted token), ``token_accuracy`` (share of counted tokens the
    model ranks first) and, in training, ``tokens_seen`` (counted tokens trained on so far, all
    ranks).

    Args:
        neftune_noise_alpha: NEFTune (Jain et al. 2023, arXiv:2310.05914, Alg. 1): in training,
            add uniform noise in ±α/√(L·d) to the input embeddings (L the sequence length, d the
            embedding width; for packed rows L is the row length). ``None`` disables it; the
            paper uses α ∈ {5, 10, 15}.
        **kwargs: :class:`~lit_pref.modules.base.AlignmentModule` arguments (model, LoRA,
            optimizer, export…).
    """

    data_target = "sft"
    default_lr = 2e-5

    def __init__(
        self,
        neftune_noise_alpha: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if neftune_noise_alpha is not None and not (
            neftune_noise_alpha > 0 and math.isfinite(neftune_noise_alpha)
        ):
            raise ValueError(
                f"neftune_noise_alpha must be a positive number or null, got {neftune_noise_alpha}"
            )
        self.neftune_noise_alpha = neftune_noise_alpha
        self.tokens_seen = SumMetric().set_dtype(torch.float64)
        self.tokens_seen.persistent(True)  # resumes count on from the checkpoint
        self._neftune_handle: torch.utils.hooks.RemovableHandle | None = None

    # ----------------------------------------------------------------- networks
    def build_networks(self) -> None:
        super().build_networks()
        if self.neftune_noise_alpha is not None:
            embeddings = self.policy.get_input_embeddings()
            self._neftune_handle = embeddings.register_forward_hook(NEFTuneNoise(self.neftune_noise_alpha))

    # ------------------------------------------------------------------- steps
    def shared_step(self, batch: CompletionBatch, split: str = "train") -> tuple[Tensor, dict[str, Tensor]]:
        logps = self.logps(self.policy, batch, with_argmax=True)
        targets = batch["completion_input_ids"]
        mask = logps.mask
        assert logps.argmax is not None
        nll = -logps.token_logps[mask]
        loss = nll.mean()
        # Per-token values: the logged means weigh every counted token once, over the whole
        # accumulation window and every rank.
        metrics = {"loss": nll, "token_accuracy": (logps.argmax[mask] == targets[mask]).float()}
        return loss, metrics

    def training_step(self, batch: CompletionBatch, batch_idx: int) -> Tensor:
        loss, metrics = self.shared_step(batch)
        self.train_metrics.update(metrics)
        self.tokens_seen.update(
            torch.tensor(metrics["loss"].numel(), dtype=torch.float64, device=loss.device)
        )
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        logged = self._last_logged_step
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self._last_logged_step != logged:
            # Same once-per-optimizer-step cadence on every rank, so the sum's all-reduce is symmetric.
            self.log(
                "train/tokens_seen", self.tokens_seen.compute(), on_step=True, on_epoch=False, batch_size=1
            )
