"""Padding-free batches: each prompt once, followed by its completions, with no padding between.

A *group* is one prompt and the completions that continue it (an SFT or unpaired row: one; a
preference pair: chosen and rejected). Groups are laid back to back in a few rows of at most
``max_length`` tokens (first-fit decreasing; a longer group gets a row of its own). Inside a
group, the prompt's positions are 0 … P − 1 and every completion's continue from P, and each
completion token attends to its own prompt and its own earlier tokens only (span attention,
:mod:`lit_pref.attention`, or :func:`lit_pref.ops.block_causal_mask` with the branch ids): the
same attention, hence the same log-probs, as
the padded layout where each completion is concatenated with its prompt, with the prompt
encoded once and no padding tokens computed at all.

Columns added to the padded batch (which keeps its ``completion_*`` columns: the losses read
log-probs in that layout, see :func:`lit_pref.ops.packed_logps`):

* ``packed_input_ids`` ``[R, T]``: the groups' tokens, then padding up to the widest row.
* ``packed_position_ids`` ``[R, T]``: positions as above (the padding tail counts from 0).
* ``packed_sequence_ids`` ``[R, T]``: the group's number within its row, −1 on padding.
* ``packed_branch_ids`` ``[R, T]``: 0 on prompt tokens, ``j`` on the ``j``-th completion's, −1 on padding.
* ``packed_source`` ``[Bc, L]``: for each token of the padded completions, the flat index
  (``row · T + column``) of the packed position whose hidden state predicts it: the previous
  token of the same completion, or the prompt's last token for its first one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_pref.data.collate import Collator, padded_width

PACKED_COLUMNS = ("packed_input_ids", "packed_position_ids", "packed_sequence_ids", "packed_branch_ids")


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


def is_packed(batch: Any) -> bool:
    """Whether ``batch`` has the padding-free layout (:class:`PackingCollator`)."""
    return "packed_source" in batch


def pack_groups(
    prompts: list[list[int]],
    completions: list[list[list[int]]],
    max_length: int,
    pad_token_id: int,
    completion_width: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """The padding-free layout (the module docstring's columns) of ``prompts[i]`` followed by
    each of ``completions[i]``; completion rows of ``packed_source`` follow group order and are
    ``completion_width`` wide (the padded completions' width, whose layout it indexes)."""
    if any(not prompt for prompt in prompts):
        raise ValueError("every packed prompt needs at least one token (it predicts the first completion token)")
    lengths = [len(p) + sum(len(c) for c in cs) for p, cs in zip(prompts, completions, strict=True)]
    rows = first_fit_decreasing(lengths, max(max_length, *lengths))
    width = padded_width(max(sum(lengths[i] for i in row) for row in rows), pad_to_multiple_of)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.full(shape, -1, dtype=torch.long)
    first_completion_row = [0]
    for cs in completions:
        first_completion_row.append(first_completion_row[-1] + len(cs))
    source = torch.zeros((first_completion_row[-1], completion_width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for number, i in enumerate(row):
            prompt = prompts[i]
            end = at + len(prompt)
            input_ids[r, at:end] = torch.tensor(prompt)
            position_ids[r, at:end] = torch.arange(len(prompt))
            sequence_ids[r, at:end] = number
            branch_ids[r, at:end] = 0
            last_prompt = r * width + end - 1
            for j, completion in enumerate(completions[i]):
                start, end = end, end + len(completion)
                input_ids[r, start:end] = torch.tensor(completion, dtype=torch.long)
                position_ids[r, start:end] = torch.arange(len(prompt), len(prompt) + len(completion))
                sequence_ids[r, start:end] = number
                branch_ids[r, start:end] = j + 1
                # Token t of the completion is predicted from token t − 1, the first from the prompt's last.
                predictors = torch.arange(r * width + start - 1, r * width + end - 1)
                predictors[0] = last_prompt
                source[first_completion_row[i] + j, : len(completion)] = predictors
            at = end
        # The padding tail counts from 0, so position-id based segment detection sees it as a sequence of its own.
        position_ids[r, at:] = torch.arange(width - at)
    return {
        "packed_input_ids": input_ids,
        "packed_position_ids": position_ids,
        "packed_sequence_ids": sequence_ids,
        "packed_branch_ids": branch_ids,
        "packed_source": source,
    }


@dataclass
class PackingCollator:
    """Collate tokenised rows with completions (SFT, paired, unpaired) padding-free (``packing: true``).

    The batch holds the padded columns of :class:`~lit_pref.data.collate.Collator` (the losses
    read completions in that layout; the integer tensors cost next to nothing) plus the packed
    layout the forward pass runs on. The log-probs, losses and gradients equal the padded path's.
    ``batch_size`` in the data module counts rows (groups), packed into as few sequences of
    ``max_length`` tokens as first-fit decreasing finds.

    Args:
        pad_token_id: id used for padding (masks, not this id, say what is real).
        max_length: the most tokens one packed sequence holds (a longer group gets its own).
        pad_to_multiple_of: round the padded widths up to a multiple of this.
    """

    pad_token_id: int
    max_length: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.max_length is None or self.max_length < 1:
            raise ValueError(f"packing needs a positive max_length (the packed row size), got {self.max_length}")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if "chosen_input_ids" in rows[0]:
            completions = [[list(r["chosen_input_ids"]), list(r["rejected_input_ids"])] for r in rows]
        elif "completion_input_ids" in rows[0]:
            completions = [[list(r["completion_input_ids"])] for r in rows]
        else:
            raise ValueError("packing applies to rows with completions (SFT, paired, unpaired), not to prompts only")
        batch = Collator(self.pad_token_id, self.pad_to_multiple_of)(rows)
        prompts = [list(r["prompt_input_ids"]) for r in rows]
        width = batch["completion_input_ids"].shape[1]
        batch.update(pack_groups(prompts, completions, self.max_length, self.pad_token_id, width, self.pad_to_multiple_of))
        return batch
