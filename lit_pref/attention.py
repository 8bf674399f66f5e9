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

A layer that attends through a sliding window (the ``sliding_window`` its attention function is
given) gets it within each example: a piece longer than the window gets a banded mask.

The outputs are laid back into the row, with zeros on the padding tail (whose hidden states no
loss reads). The values are those of the dense mask's attention, to float rounding.

``transformers`` picks a model's attention function by name at every call, so a model running
``sdpa`` is switched to :data:`SPAN_SDPA` (:func:`use_span_attention`), registered here as an
attention and a mask function. It is ``sdpa`` itself on every call that carries no
:class:`PackedSpans` (padded batches, generation), so the switch changes nothing else; within a
packed forward (:func:`spans_forward`) its mask function builds no mask at all; the name
is not written by ``save_pretrained``. The spans reach each attention layer as a keyword argument
of the decoder's forward, passed down by the ``transformers`` decoders that forward their
``**kwargs`` (Llama, Qwen, Mistral, Gemma…); :func:`check_spans_used` fails loudly where they
did not arrive.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SPAN_SDPA = "lit_pref_span_sdpa"
# Set while a decoder runs packed rows through span attention, which masks each piece itself: the
# [R, 1, T, T] masks transformers would build from the rows' 2-D mask (a sliding layer's, once a
# row outgrows the window) would go unread.
_SPANS_FORWARD: ContextVar[bool] = ContextVar("lit_pref_spans_forward", default=False)


@dataclass(frozen=True)
class Piece:
    """One SDPA call's queries: row positions ``start … end − 1``.

    ``prompt`` (a later completion's) is the span of the prompt it attends to besides itself;
    ``padding`` marks the row's tail, computed as zeros.
    """

    start: int
    end: int
    prompt: tuple[int, int] | None = None
    padding: bool = False

    @property
    def prefix(self) -> int:
        """Keys before the piece's own: its prompt's length for a later completion, else 0."""
        return 0 if self.prompt is None else self.prompt[1] - self.prompt[0]


@dataclass
class PackedSpans:
    """The pieces of every packed row, in row order.

    ``calls`` counts the attention calls that used them and ``windows`` the sliding windows
    those calls were given (:func:`check_spans_used`); the masks are built once per shape.
    """

    rows: list[list[Piece]]
    device: torch.device
    calls: int = 0
    windows: set[int] = field(default_factory=set)
    _masks: dict[tuple[int, int, int | None], Tensor] = field(default_factory=dict, repr=False)

    @property
    def longest(self) -> int:
        """The most keys one query attends over: the longest prompt with a completion."""
        return max((p.prefix + p.end - p.start for row in self.rows for p in row if not p.padding), default=0)

    def mask(self, piece: Piece, window: int | None) -> Tensor | None:
        """``piece``'s ``[1, 1, c, P + c]`` boolean mask (``P`` its prefix), within a sliding window
        of ``window`` tokens when given; ``None`` where SDPA's causal mode is exact.

        Query ``i`` is the example's position ``P + i`` and key ``j`` its position ``j``: the key
        is seen when ``j ≤ P + i`` and, in a window, ``j > P + i − window`` (``transformers``'
        sliding-window rule)."""
        length = piece.end - piece.start
        windowed = window if window is not None and piece.prefix + length > window else None
        if piece.prefix == 0 and windowed is None:
            return None
        shape = (piece.prefix, length, windowed)
        if shape not in self._masks:
            allowed = torch.ones(length, piece.prefix + length, dtype=torch.bool, device=self.device).tril(piece.prefix)
            if windowed is not None:
                allowed = allowed.triu(piece.prefix - windowed + 1)
            self._masks[shape] = allowed[None, None]
        return self._masks[shape]


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
            elif pieces and pieces[-1] == Piece(*prompt):
                # The completion right after its prompt: causal attention over both covers it.
                pieces[-1] = Piece(prompt[0], end)
            else:
                pieces.append(Piece(at, end, prompt=prompt))
            at = end
        rows.append(pieces)
    return PackedSpans(rows, sequence_ids.device)


def span_sdpa_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    packed_spans: PackedSpans | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``transformers``' SDPA attention function, run per piece of ``packed_spans`` when given
    (``query`` ``[R, H, T, D]``, ``key`` / ``value`` ``[R, KV, T, D]``; returns ``[R, T, H, D]``),
    within the layer's ``sliding_window`` if it has one; else ``sdpa`` unchanged."""
    if packed_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, sliding_window=sliding_window, **kwargs)
    if kwargs.get("position_bias") is not None:
        raise ValueError("span attention does not slice a per-position attention bias: use packed_attention: mask")
    packed_spans.calls += 1
    if sliding_window is not None:
        packed_spans.windows.add(sliding_window)
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
            mask = packed_spans.mask(piece, sliding_window)
            outputs.append(sdpa_attention_forward(module, queries, keys, values, mask, **kwargs)[0])
        rows.append(torch.cat(outputs, 1))
    return torch.cat(rows, 0), None


@contextmanager
def spans_forward() -> Iterator[None]:
    """The scope of a decoder forward over packed rows under span attention, within which
    ``transformers`` builds no attention mask for a :data:`SPAN_SDPA` model."""
    token = _SPANS_FORWARD.set(True)
    try:
        yield
    finally:
        _SPANS_FORWARD.reset(token)


def span_sdpa_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """``transformers``' SDPA mask function; no mask within :func:`spans_forward`."""
    return None if _SPANS_FORWARD.get() else sdpa_mask(*args, **kwargs)


AttentionInterface.register(SPAN_SDPA, span_sdpa_attention)
AttentionMaskInterface.register(SPAN_SDPA, span_sdpa_mask)


def use_span_attention(decoder: torch.nn.Module) -> bool:
    """Switch ``decoder``'s language model (and the model sharing its config) from ``sdpa`` to
    :data:`SPAN_SDPA`; whether it now runs span attention."""
    config: Any = getattr(decoder, "config", None)
    if config is None:
        return False
    # A vision-language model's text config only: the setter would pass the name on to every sub-config.
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(config, "_attn_implementation", None) == "sdpa":
        config._attn_implementation = SPAN_SDPA
    return bool(config._attn_implementation == SPAN_SDPA)


def check_spans_used(spans: PackedSpans, model: torch.nn.Module, window: int | None, attention_layers: int) -> None:
    """Raise when a forward pass given ``spans`` did not run its attention on them: fewer calls
    got them than the model has ``attention_layers`` (the architecture does not pass its
    forward's keyword arguments down to each attention, whose causal attention then ran across
    each whole packed row), or the model's sliding ``window`` (from its config) never reached an
    attention call while an example is longer."""
    if spans.calls < attention_layers:
        raise ValueError(
            f"{type(model).__name__} passes the packed spans down to {spans.calls} of its {attention_layers} "
            "attention layers, so span attention cannot keep packed examples apart: set packed_attention: mask"
        )
    if window is not None and spans.longest > window and window not in spans.windows:
        raise ValueError(
            f"{type(model).__name__} attends through a sliding window of {window} tokens but does not pass it to "
            f"its attention function, and a packed example spans {spans.longest} tokens: set max_length <= {window} "
            "or packing: false"
        )
