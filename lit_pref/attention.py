"""Span attention for padding-free rows: SDPA run once per prompt and completion span.

A packed row (:mod:`lit_pref.data.packing`) holds several groups, each a prompt followed by its
completions. The dense block-causal mask (:func:`lit_pref.ops.block_causal_mask`) makes SDPA
compute the whole ``T × T`` score matrix of a row: across groups, between a prompt's
completions and above the diagonal, all of it masked out. Span attention computes only what a
token may see, in one SDPA call per piece of a group:

* the prompt with its first completion, which follow each other in the row: plain causal
  attention over that run (SDPA's causal kernel, no mask; an SFT or unpaired group is this
  piece alone);
* each further completion (a pair's rejected one): its queries over the prompt's keys, all
  visible, followed by its own, causal (a small ``[c, P + c]`` mask).

The outputs are laid back into the row, with zeros on the padding tail (whose hidden states no
loss reads). The values are those of the dense mask's attention, to float rounding.

``transformers`` picks a model's attention function by name at every call, so a model running
``sdpa`` is switched to :data:`SPAN_SDPA` (:func:`use_span_attention`), registered here as an
attention and a mask function. It is ``sdpa`` itself on every call that carries no
:class:`PackedSpans` (padded batches, generation), so the switch changes nothing else; the name
is not written by ``save_pretrained``. The spans reach each attention layer as a keyword argument
of the decoder's forward, passed down by the ``transformers`` decoders that forward their
``**kwargs`` (Llama, Qwen, Mistral, Gemma…); :func:`check_spans_used` fails loudly where they
did not arrive.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SPAN_SDPA = "lit_pref_span_sdpa"


@dataclass(frozen=True)
class Piece:
    """One SDPA call's queries: row positions ``start … end − 1``.

    ``prompt`` (a later completion's) is the span of the prompt it attends to besides itself,
    ``mask`` that call's ``[1, 1, c, P + c]`` mask; ``padding`` marks the row's tail, computed
    as zeros.
    """

    start: int
    end: int
    prompt: tuple[int, int] | None = None
    mask: Tensor | None = None
    padding: bool = False


@dataclass
class PackedSpans:
    """The pieces of every packed row, in row order; ``calls`` counts the attention layers that
    have used them (:func:`check_spans_used`)."""

    rows: list[list[Piece]]
    calls: int = field(default=0, compare=False)


def packed_spans(sequence_ids: Tensor, branch_ids: Tensor) -> PackedSpans:
    """The :class:`PackedSpans` of packed rows from their ``packed_sequence_ids`` and
    ``packed_branch_ids`` (``[R, T]``: group number and 0 prompt / ``j`` completion, −1 padding)."""
    rows = []
    for sequence_row, branch_row in zip(sequence_ids.tolist(), branch_ids.tolist(), strict=True):
        pieces: list[Piece] = []
        prompt = (0, 0)
        at = 0
        for (sequence, branch), run in itertools.groupby(zip(sequence_row, branch_row, strict=True)):
            end = at + sum(1 for _ in run)
            if sequence < 0:
                pieces.append(Piece(at, end, padding=True))
            elif branch == 0:
                prompt = (at, end)
                pieces.append(Piece(at, end))
            elif pieces and pieces[-1] == Piece(*prompt) and prompt[1] == at:
                # The completion right after its prompt: causal attention over both covers it.
                pieces[-1] = Piece(prompt[0], end)
            else:
                length, context = end - at, prompt[1] - prompt[0] + end - at
                mask = torch.ones(length, context, dtype=torch.bool, device=sequence_ids.device).tril(prompt[1] - prompt[0])
                pieces.append(Piece(at, end, prompt=prompt, mask=mask[None, None]))
            at = end
        rows.append(pieces)
    return PackedSpans(rows)


def span_sdpa_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    packed_spans: PackedSpans | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``transformers``' SDPA attention function, run per piece of ``packed_spans`` when given
    (``query`` ``[R, H, T, D]``, ``key`` / ``value`` ``[R, KV, T, D]``; returns ``[R, T, H, D]``),
    else ``sdpa`` unchanged."""
    if packed_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    packed_spans.calls += 1
    rows = []
    for r, pieces in enumerate(packed_spans.rows):
        outputs = []
        for piece in pieces:
            queries = query[r : r + 1, :, piece.start : piece.end]
            if piece.padding:
                outputs.append(query.new_zeros(1, piece.end - piece.start, query.shape[1], value.shape[-1]))
                continue
            keys, values = key[r : r + 1, :, piece.start : piece.end], value[r : r + 1, :, piece.start : piece.end]
            if piece.prompt is not None:
                start, end = piece.prompt
                keys = torch.cat([key[r : r + 1, :, start:end], keys], 2)
                values = torch.cat([value[r : r + 1, :, start:end], values], 2)
            outputs.append(sdpa_attention_forward(module, queries, keys, values, piece.mask, **kwargs)[0])
        rows.append(torch.cat(outputs, 1))
    return torch.cat(rows, 0), None


AttentionInterface.register(SPAN_SDPA, span_sdpa_attention)
AttentionMaskInterface.register(SPAN_SDPA, sdpa_mask)


def use_span_attention(decoder: torch.nn.Module) -> bool:
    """Switch ``decoder`` (and the model sharing its config) from ``sdpa`` to :data:`SPAN_SDPA`;
    whether it now runs span attention."""
    config: Any = getattr(decoder, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        config._attn_implementation = SPAN_SDPA
    return config is not None and config._attn_implementation == SPAN_SDPA


def check_spans_used(spans: PackedSpans, model: torch.nn.Module) -> None:
    """Raise when a forward pass given ``spans`` ran no attention layer on them: the
    architecture does not pass its forward's keyword arguments down to its attention, whose
    causal attention then ran across each whole packed row."""
    if spans.calls == 0:
        raise ValueError(
            f"{type(model).__name__} does not pass the packed spans down to its attention layers, so span "
            "attention cannot keep packed examples apart: set packed_attention: mask"
        )
