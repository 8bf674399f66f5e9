"""Recognise, validate and normalise dataset rows into the shapes the algorithms consume.

Shapes (columns beyond these are passed through untouched):

* ``paired``: ``prompt``, ``chosen``, ``rejected`` — or ``chosen``/``rejected`` alone with the
  prompt implicit in their shared prefix (Anthropic HH's ``\\n\\nHuman: … \\n\\nAssistant: …``
  text, or full conversations).
* ``unpaired``: ``prompt``, ``completion``, boolean ``label`` (KTO, BCO).
* ``prompt_completion``: ``prompt``, ``completion`` (SFT).
* ``language_modeling``: ``text`` or ``messages`` (SFT).
* ``prompt_only``: ``prompt`` (PPO, GRPO).

Each field is plain text or a conversation (a list of ``{"role", "content"}`` messages).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Shape = Literal["paired", "unpaired", "prompt_completion", "language_modeling", "prompt_only"]
# What each algorithm asks the data module for; see ``convert``.
Target = Literal["paired", "unpaired", "sft", "prompt_only"]

SHAPE_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "paired": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "unpaired": (("prompt", "completion", "label"),),
    "prompt_completion": (("prompt", "completion"),),
    "language_modeling": (("messages",), ("text",)),
    "prompt_only": (("prompt",),),
}
# Which source shapes can feed each target, and in what order of preference.
CONVERTIBLE: dict[str, tuple[str, ...]] = {
    "paired": ("paired",),
    "unpaired": ("unpaired", "paired"),
    "sft": ("prompt_completion", "language_modeling", "paired"),
    "prompt_only": ("prompt_only", "prompt_completion", "paired", "unpaired"),
}
TURN_MARKERS = ("\n\nAssistant:", "\nAssistant:", "Assistant:")


class DataFormatError(ValueError):
    """A dataset that does not fit any accepted shape, or a malformed row."""


def _accepted() -> str:
    return "; ".join(
        f"{shape}: " + " or ".join("(" + ", ".join(cols) + ")" for cols in options)
        for shape, options in SHAPE_COLUMNS.items()
    )


def detect_shape(columns: list[str] | tuple[str, ...]) -> Shape:
    """The shape a dataset's columns describe; raises naming the columns found and the shapes accepted."""
    present = set(columns)
    for shape, options in SHAPE_COLUMNS.items():
        if any(set(cols) <= present for cols in options):
            return shape  # type: ignore[return-value]
    raise DataFormatError(f"unrecognised dataset columns {sorted(present)}; accepted shapes are {_accepted()}")


def check_convertible(shape: str, target: str) -> None:
    """Raise unless rows of ``shape`` can be turned into what ``target`` needs."""
    if target not in CONVERTIBLE:
        raise DataFormatError(f"unknown data target {target!r}; expected one of {sorted(CONVERTIBLE)}")
    if shape not in CONVERTIBLE[target]:
        raise DataFormatError(
            f"a {shape!r} dataset cannot be used where {target!r} data is needed; "
            f"accepted: {', '.join(CONVERTIBLE[target])}"
        )


def is_conversation(value: Any) -> bool:
    """Whether ``value`` is a list of ``{"role", "content"}`` messages."""
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m for m in value)


def _check_field(value: Any, column: str, index: int, allow_empty: bool = False) -> None:
    if is_conversation(value):
        if not value and not allow_empty:
            raise DataFormatError(f"row {index}: column {column!r} is an empty conversation")
        for message in value:
            if not isinstance(message.get("content"), str):
                raise DataFormatError(
                    f"row {index}: column {column!r} has a message whose content is "
                    f"{type(message.get('content')).__name__}, expected str"
                )
        return
    if not isinstance(value, str):
        raise DataFormatError(
            f"row {index}: column {column!r} is {type(value).__name__}, expected str or a list of messages"
        )
    if not value.strip() and not allow_empty:
        raise DataFormatError(f"row {index}: column {column!r} is empty")


def split_implicit_prompt(chosen: Any, rejected: Any, index: int) -> tuple[Any, Any, Any]:
    """Split ``chosen``/``rejected`` that share their prompt into (prompt, chosen, rejected).

    Conversations split after the longest common run of messages. Text splits after the last
    ``Assistant:`` marker in the common prefix, or else at the last whitespace in it, so a word
    is never cut in two.
    """
    if is_conversation(chosen) and is_conversation(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataFormatError(f"row {index}: chosen and rejected share no leading messages (no prompt)")
        return chosen[:n], chosen[n:], rejected[n:]
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise DataFormatError(f"row {index}: chosen and rejected must both be text or both conversations")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    common = chosen[:n]
    cut = max((common.rfind(m) + len(m) for m in TURN_MARKERS if m in common), default=-1)
    if cut < 0:
        cut = max(common.rfind(" "), common.rfind("\n"))
    if cut <= 0:
        raise DataFormatError(f"row {index}: chosen and rejected share no prompt prefix ending at a word boundary")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def normalise_row(row: dict[str, Any], index: int, shape: str) -> dict[str, Any]:
    """Validate one row of ``shape`` and return it with an explicit prompt (extras kept)."""
    out = dict(row)
    if shape == "paired":
        if "prompt" not in row or row["prompt"] is None:
            out["prompt"], out["chosen"], out["rejected"] = split_implicit_prompt(row["chosen"], row["rejected"], index)
        for column in ("prompt", "chosen", "rejected"):
            _check_field(out[column], column, index)
        if "margin" in row and not isinstance(row["margin"], int | float):
            raise DataFormatError(f"row {index}: column 'margin' must be a number, got {type(row['margin']).__name__}")
    elif shape == "unpaired":
        for column in ("prompt", "completion"):
            _check_field(row[column], column, index)
        if not isinstance(row["label"], bool):
            raise DataFormatError(f"row {index}: column 'label' must be a bool, got {row['label']!r}")
    elif shape == "prompt_completion":
        for column in ("prompt", "completion"):
            _check_field(row[column], column, index)
    elif shape == "language_modeling":
        column = "messages" if "messages" in row else "text"
        _check_field(row[column], column, index)
    elif shape == "prompt_only":
        _check_field(row["prompt"], "prompt", index)
    return out


def paired_to_unpaired(batch: dict[str, list]) -> dict[str, list]:
    """Batched map: each (prompt, chosen, rejected) row becomes a desirable and an undesirable row.

    Extra columns are copied onto both rows, except ``index`` (it numbered pairs, and the data
    module numbers the new rows itself).
    """
    extras = [k for k in batch if k not in ("prompt", "chosen", "rejected", "completion", "label", "index")]
    out: dict[str, list] = {"prompt": [], "completion": [], "label": [], **{k: [] for k in extras}}
    for i, (prompt, chosen, rejected) in enumerate(zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=True)):
        out["prompt"] += [prompt, prompt]
        out["completion"] += [chosen, rejected]
        out["label"] += [True, False]
        for k in extras:
            out[k] += [batch[k][i], batch[k][i]]
    return out
