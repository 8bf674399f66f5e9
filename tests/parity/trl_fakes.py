"""Shared pieces of the TRL parity tests: the smallest stand-ins that let TRL's own trainer methods run.

TRL's losses live inside trainer methods (``DPOTrainer._compute_loss`` …) that read a few
attributes and call a model. The tests build the trainer with ``object.__new__`` (no
``__init__``: no model loading, no datasets, no accelerate state), set exactly the attributes the
method reads, and give it one of the models below. lit_pref gets the same numbers through its
own containers (:class:`~lit_pref.types.CompletionLogps`), so both sides score identical float64
per-token log-probabilities and every difference comes from the loss code.
"""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from trl.trainer.utils import FusedCausalLMOutput

from lit_pref.data.collate import pad
from lit_pref.types import CompletionLogps

DTYPE = torch.float64
# Everything here is float64, so the two implementations of one formula agree to round-off (~1e-15);
# 1e-6 is the tolerance the parity issue fixes, far above round-off and far below any real difference.
ATOL = 1e-6


def accelerator() -> types.SimpleNamespace:
    """One CPU process: gathers and reductions are the identity."""
    return types.SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=1,
        process_index=0,
        sync_gradients=True,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        unwrap_model=lambda x: x,
    )


def metrics_store() -> dict[str, defaultdict[str, list[float]]]:
    return {"train": defaultdict(list), "eval": defaultdict(list)}


def train_step_state() -> dict[str, Any]:
    """The bookkeeping attributes a TRL trainer's ``_compute_loss`` reads besides its loss settings."""
    return {"aux_loss_enabled": False, "_metrics": metrics_store(), "_total_train_tokens": 0, "_tp_size": 1}


def compute_loss(trainer: Any, policy: Any, batch: Any) -> tuple[Tensor, dict[str, float]]:
    """TRL's training loss of ``batch`` and the metrics it logged for it."""
    loss = trainer._compute_loss(policy, batch, return_outputs=False)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def scatter_rows(mask: Tensor, rows: Sequence[Tensor]) -> Tensor:
    """A ``mask``-shaped tensor holding ``rows[r]`` at the set positions of row ``r``, 0 elsewhere.

    Gradients flow back to ``rows`` (masked_scatter is differentiable in its source).
    """
    mask = mask.bool()
    counts = mask.sum(-1).tolist()
    assert counts == [len(r) for r in rows], (counts, [len(r) for r in rows])
    flat = torch.cat(list(rows)) if rows else torch.zeros(0, dtype=DTYPE)
    return torch.zeros(mask.shape, dtype=flat.dtype).masked_scatter(mask, flat)


class FusedTable(torch.nn.Module):
    """Stands in for a causal LM patched by TRL's ``add_fused_lm_head``, called with
    ``fused_lm_head=True``: for an ``input_ids`` tensor it was given, it returns the given
    next-token log-probs at the labelled positions (0 elsewhere, as the real head does).

    Args:
        entries: ``(input_ids, per-completion-token values of each row[, log Σp² of each row])``.
    """

    # Read by TRL's disable_gradient_checkpointing around the reference forward.
    is_gradient_checkpointing = False

    def __init__(self, entries: Sequence[tuple[Tensor, Sequence[Tensor], Sequence[Tensor] | None]]) -> None:
        super().__init__()
        self.entries = list(entries)

    def forward(
        self, input_ids: Tensor, labels: Tensor, fused_lm_head: bool = False, **_: Any
    ) -> FusedCausalLMOutput:
        assert fused_lm_head, "TRL's trainers score with the fused head"
        matches = [
            (v, sq)
            for ids, v, sq in self.entries
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids)
        ]
        assert len(matches) == 1, "FusedTable got input_ids it was not given (or given twice)"
        values, sq_norm = matches[0]
        mask = labels[:, 1:] != -100
        log_probs = scatter_rows(mask, values)
        zeros = torch.zeros(mask.shape, dtype=log_probs.dtype)
        return FusedCausalLMOutput(
            loss=None,
            log_probs=log_probs,
            entropy=zeros,
            log_sum_sq_probs=None if sq_norm is None else scatter_rows(mask, sq_norm),
            mean_logits=zeros,
            is_top1=torch.zeros(mask.shape, dtype=torch.bool),
            label_mask=mask,
            aux_loss=None,
        )


def lit_logps(rows: Sequence[Tensor], sq_norm: Sequence[Tensor] | None = None) -> CompletionLogps:
    """lit_pref's container for completion rows (right-padded), as the shared log-prob path returns it."""
    mask = pad([[1] * len(r) for r in rows], 0).bool()
    return CompletionLogps(
        token_logps=scatter_rows(mask, rows),
        mask=mask,
        mean_logits=torch.zeros(len(rows), dtype=DTYPE),
        log_sq_norm=None if sq_norm is None else scatter_rows(mask, sq_norm),
    )


def token_values(
    lengths: Sequence[int], generator: torch.Generator, low: float = -3.0, high: float = -0.05
) -> list[Tensor]:
    """Seeded per-token log-probs, one tensor per row (uniform in [low, high], all < 0)."""
    return [low + (high - low) * torch.rand(n, generator=generator, dtype=DTYPE) for n in lengths]
