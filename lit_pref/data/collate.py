"""Pad tokenised rows into the batch layout the shared log-prob path consumes.

Prompts are left-padded and completions right-padded, so each row's real tokens are contiguous
and the last prompt column always holds the token that predicts the first completion token.
Completions of one prompt are adjacent: paired rows become chosen, rejected, chosen, rejected…
so a single forward pass covers both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_pref.vision.processing import collate_images

# Scalar per-row columns that become tensors; anything else not tokenised is kept as a list.
TENSOR_COLUMNS = {
    "label": torch.bool,
    "margin": torch.float32,
    "ref_chosen_logps": torch.float32,
    "ref_rejected_logps": torch.float32,
    "ref_logps": torch.float32,
    "index": torch.long,
}
TOKEN_COLUMNS = (
    "prompt_input_ids",
    "chosen_input_ids",
    "rejected_input_ids",
    "completion_input_ids",
    "completion_mask",
    "kl_completion_input_ids",
)


def padded_width(width: int, multiple_of: int | None) -> int:
    """``width`` rounded up to a multiple of ``multiple_of`` (unchanged when it is ``None``)."""
    return -(-width // multiple_of) * multiple_of if multiple_of else width


def pad(sequences: Sequence[Sequence[int]], value: int, left: bool = False, multiple_of: int | None = None) -> Tensor:
    """``[B, T]`` tensor of ``sequences`` padded with ``value`` to the longest (rounded up to ``multiple_of``)."""
    width = padded_width(max((len(s) for s in sequences), default=0), multiple_of)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            row = torch.as_tensor(seq, dtype=torch.long)
            if left:
                out[i, width - len(seq) :] = row
            else:
                out[i, : len(seq)] = row
    return out


@dataclass
class Collator:
    """Collate tokenised rows of any target shape.

    Args:
        pad_token_id: id used for padding (masks, not this id, say what is real).
        pad_to_multiple_of: round padded widths up to a multiple of this (tensor-core friendly).
        processor: a vision-language model's processor: the rows' ``images`` become the batch's
            ``vision_inputs`` and ``image_counts`` (the ``images`` column stays, as a list).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    processor: Any = None

    def _pad(self, sequences: Sequence[Sequence[int]], left: bool = False, value: int | None = None) -> Tensor:
        return pad(sequences, self.pad_token_id if value is None else value, left, self.pad_to_multiple_of)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [r["prompt_input_ids"] for r in rows]
        batch: dict[str, Any] = {
            "prompt_input_ids": self._pad(prompts, left=True),
            "prompt_attention_mask": self._pad([[1] * len(p) for p in prompts], left=True, value=0),
        }
        if "chosen_input_ids" in rows[0]:
            completions = [c for r in rows for c in (r["chosen_input_ids"], r["rejected_input_ids"])]
            masks = [[1] * len(c) for c in completions]
        elif "completion_input_ids" in rows[0]:
            completions = [r["completion_input_ids"] for r in rows]
            masks = [r.get("completion_mask") or [1] * len(r["completion_input_ids"]) for r in rows]
        else:
            completions = []
        if completions:
            batch["completion_input_ids"] = self._pad(completions)
            batch["completion_attention_mask"] = self._pad([[1] * len(c) for c in completions], value=0)
            batch["completion_mask"] = self._pad(masks, value=0)
        if "kl_completion_input_ids" in rows[0]:  # KTO's mismatched completions, right-padded
            kl = [r["kl_completion_input_ids"] for r in rows]
            batch["kl_completion_input_ids"] = self._pad(kl)
            batch["kl_completion_attention_mask"] = self._pad([[1] * len(c) for c in kl], value=0)
        if self.processor is not None and "images" in rows[0]:
            batch.update(collate_images(self.processor, [r["images"] for r in rows]))
        for key in rows[0]:
            if key in TOKEN_COLUMNS:
                continue
            values = [r[key] for r in rows]
            batch[key] = torch.tensor(values, dtype=TENSOR_COLUMNS[key]) if key in TENSOR_COLUMNS else values
        return batch
