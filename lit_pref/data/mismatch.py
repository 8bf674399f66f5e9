"""Mismatched prompt/completion pairs: the rows KTO estimates its KL reference point z0 from.

Ethayarajh et al. 2024 (arXiv:2402.01306, §4) estimate z0 = KL(π_θ ‖ π_ref) from completions
scored under a prompt they were not written for. The mismatch is a fixed column of the tokenised
split, so it is the same on every rank and every epoch, and the reference log-probs of the
mismatched pairs can be precomputed and cached like any other per-row value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations: datasets loads with the data (see lit_pref.data.datamodule)
    from datasets import Dataset

KL_COLUMN = "kl_completion_input_ids"


def mismatched_rows(prompts: Sequence[Sequence[int]]) -> list[int]:
    """For each row ``i``, the row whose completion becomes its mismatched completion.

    The next row ``(i + 1) % N``, except that rows with the same prompt as row ``i`` are skipped:
    paired data converted to unpaired puts a prompt's desirable and undesirable completions next
    to each other, and scoring a completion under its own prompt is no mismatch. When every
    prompt is the same there is nothing to skip to and the next row is used.
    """
    n = len(prompts)
    keys = [tuple(p) for p in prompts]
    # next_other[i]: the first row after i (no wrap-around) with a different prompt, else n.
    next_other = [n] * n
    for i in range(n - 2, -1, -1):
        next_other[i] = i + 1 if keys[i + 1] != keys[i] else next_other[i + 1]
    out = []
    for i in range(n):
        j = next_other[i]
        if j == n:  # wrap around to the start of the split
            j = 0 if keys[0] != keys[i] else next_other[0]
        out.append(j if j < n else (i + 1) % n)
    return out


def add_mismatched_completions(ds: Dataset, max_length: int | None = None) -> Dataset:
    """Add :data:`KL_COLUMN`: each row's prompt gets the completion of :func:`mismatched_rows`.

    The borrowed completion is cut so that prompt + completion stays within ``max_length``
    (keeping at least one token): the KL pass sees no longer sequences than training does.
    """
    columns = ds.select_columns(["prompt_input_ids", "completion_input_ids"])[:]
    prompts, completions = columns["prompt_input_ids"], columns["completion_input_ids"]
    borrowed = []
    for prompt, j in zip(prompts, mismatched_rows(prompts), strict=True):
        completion = completions[j]
        if max_length is not None:
            completion = completion[: max(max_length - len(prompt), 1)]
        borrowed.append(completion)
    return ds.add_column(KL_COLUMN, borrowed)
