"""Packing: several short supervised examples share one row, with no attention between them.

A batch of tokenised SFT rows (``prompt_input_ids``, ``completion_input_ids``,
``completion_mask``) becomes a few rows of at most ``max_length`` tokens. Each example keeps its
own positions (``position_ids`` restart at 0) and its own segment number (``sequence_ids``), so a
model run with :func:`block_causal_mask` (or, for flash-attention kernels, with the position ids
alone) computes for every token exactly what it would compute for the example on its own row.

Layout of a packed batch (``R`` rows, width ``T``):

* ``input_ids`` ``[R, T]``: the examples' prompt + completion tokens back to back, then padding.
* ``attention_mask`` ``[R, T]``: 1 on real tokens.
* ``position_ids`` ``[R, T]``: 0, 1, … within each example (the padding tail counts from 0 too,
  so position-id based segment detection sees it as a separate sequence).
* ``sequence_ids`` ``[R, T]``: the example's number within its row (0, 1, …), −1 on padding.
* ``loss_mask`` ``[R, T]``: 1 where the token is a training target (predicted from the token
  before it in the same example); never set on an example's first token.
* ``num_examples``: how many examples the batch holds; other per-example columns follow in
  packing order (``index`` as a tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_pref.data.collate import TENSOR_COLUMNS, TOKEN_COLUMNS, pad

PACKED_COLUMNS = ("input_ids", "attention_mask", "position_ids", "sequence_ids", "loss_mask")


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length ≤ ``capacity`` (longest items placed first).

    Deterministic; items keep their original relative order inside a bin.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"an example of {lengths[i]} tokens does not fit in a packed row of {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` came from :class:`PackingCollator`."""
    return "sequence_ids" in batch


@dataclass
class PackingCollator:
    """Collate tokenised SFT rows into packed rows of at most ``max_length`` tokens.

    The loss over a packed batch equals the loss over the same examples unpacked: every example
    is scored on its own tokens only. ``batch_size`` in the data module counts examples, which
    are packed into as few rows as first-fit decreasing finds.

    Args:
        pad_token_id: id used for padding (masks, not this id, say what is real).
        max_length: the most tokens one packed row holds.
        pad_to_multiple_of: round the padded width up to a multiple of this.
    """

    pad_token_id: int
    max_length: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.max_length is None or self.max_length < 1:
            raise ValueError(
                f"packing needs a positive max_length (the packed row size), got {self.max_length}"
            )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if "completion_input_ids" not in rows[0] or "chosen_input_ids" in rows[0]:
            raise ValueError("packing applies to supervised (target 'sft') rows only")
        ids, targets = [], []
        for r in rows:
            mask = r.get("completion_mask") or [1] * len(r["completion_input_ids"])
            ids.append(list(r["prompt_input_ids"]) + list(r["completion_input_ids"]))
            targets.append([0] * len(r["prompt_input_ids"]) + list(mask))
        bins = first_fit_decreasing([len(x) for x in ids], self.max_length)
        order = [i for b in bins for i in b]
        packed: dict[str, list[list[int]]] = {name: [] for name in PACKED_COLUMNS}
        for b in bins:
            row: dict[str, list[int]] = {name: [] for name in PACKED_COLUMNS}
            for segment, i in enumerate(b):
                n = len(ids[i])
                row["input_ids"] += ids[i]
                row["attention_mask"] += [1] * n
                row["position_ids"] += list(range(n))
                row["sequence_ids"] += [segment] * n
                row["loss_mask"] += [0, *targets[i][1:]]
            for name in PACKED_COLUMNS:
                packed[name].append(row[name])
        width = max(len(r) for r in packed["input_ids"])
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        for name, value in (("attention_mask", 0), ("sequence_ids", -1), ("loss_mask", 0)):
            packed[name] = [r + [value] * (width - len(r)) for r in packed[name]]
        packed["position_ids"] = [r + list(range(width - len(r))) for r in packed["position_ids"]]
        batch: dict[str, Any] = {
            name: pad(
                packed[name],
                self.pad_token_id if name == "input_ids" else 0,
                multiple_of=self.pad_to_multiple_of,
            )
            for name in PACKED_COLUMNS
        }
        batch["num_examples"] = len(rows)
        for key in rows[0]:
            if key in TOKEN_COLUMNS:
                continue
            values = [rows[i][key] for i in order]
            batch[key] = torch.tensor(values, dtype=TENSOR_COLUMNS[key]) if key in TENSOR_COLUMNS else values
        return batch


def block_causal_mask(sequence_ids: Tensor, dtype: torch.dtype = torch.bool) -> Tensor:
    """``[R, 1, T, T]`` attention mask: causal within each segment, nothing across segments.

    Query ``q`` may attend to key ``k`` when both lie in the same example and ``k ≤ q``; a padding
    position attends to itself only, so no softmax row is empty. With ``dtype=torch.bool`` the
    mask is True where attention is allowed (SDPA's format); with a floating dtype it is additive,
    0 where allowed and the dtype's most negative value elsewhere (eager attention's format).
    """
    width = sequence_ids.shape[-1]
    positions = torch.arange(width, device=sequence_ids.device)
    causal = positions[None, :] <= positions[:, None]
    same = (sequence_ids[:, :, None] == sequence_ids[:, None, :]) & (sequence_ids[:, :, None] >= 0)
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool, device=sequence_ids.device)
    allowed = allowed[:, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
