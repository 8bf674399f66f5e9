"""Recognise, validate and normalise dataset rows into the shapes the algorithms consume.

Shapes (columns beyond these are passed through untouched):

* ``paired``: ``prompt``, ``chosen``, ``rejected`` — or ``chosen``/``rejected`` alone with the
  prompt implicit in their shared prefix (Anthropic HH's ``\\n\\nHuman: … \\n\\nAssistant: …``
  text, or full conversations).
* ``unpaired``: ``prompt``, ``completion``, boolean ``label`` (KTO, BCO).
* ``prompt_completion``: ``prompt``, ``completion`` (SFT).
* ``language_modeling``: ``text`` or ``messages`` (SFT).
* ``prompt_only``: ``prompt`` (PPO, GRPO).

Each field is plain text or a conversation (a list of ``{"role", "content"}`` messages). A
message's content is text or, in vision-language rows, a list of parts (``{"type": "image"}``,
``{"type": "text", "text": …}``); the row's ``images`` column holds one image per image part, all
of them in the prompt.
"""

from __future__ import annotations

import difflib
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


# The roles chat templates render; anything else is a typo or another dataset's convention.
ROLES = ("system", "user", "assistant", "tool")
# Other datasets' names for the same roles, for the hint in the error.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "usr": "user"}


class DataFormatError(ValueError):
    """A dataset that does not fit any accepted shape, or a malformed row.

    A row's error carries ``row`` (its index in the data the row function saw) and ``reason`` (the
    message without the row), so the data module can name the row in the source file and, with
    ``bad_rows="skip"``, skip it. ``skippable`` is false for errors a setting asked for
    (``truncation_mode: error``).
    """

    def __init__(self, message: str, row: int | None = None, reason: str | None = None, skippable: bool = True):
        super().__init__(message)
        self.row, self.reason, self.skippable = row, reason if reason is not None else message, skippable

    def __reduce__(self) -> tuple[Any, ...]:
        # Tokenisation may run in worker processes (num_proc): keep the row through pickling.
        return type(self), (str(self), self.row, self.reason, self.skippable)


def row_error(index: int, reason: str, skippable: bool = True) -> DataFormatError:
    """The error for row ``index``: ``row 5: <reason>``."""
    return DataFormatError(f"row {index}: {reason}", row=index, reason=reason, skippable=skippable)


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


def _role_hint(role: Any) -> str:
    alias = ROLE_ALIASES.get(str(role).lower())
    if alias is None:
        close = difflib.get_close_matches(str(role).lower(), ROLES, n=1)
        alias = close[0] if close else None
    return f"; did you mean {alias!r}?" if alias else ""


def _check_field(value: Any, column: str, index: int, allow_empty: bool = False) -> None:
    if is_conversation(value):
        if not value and not allow_empty:
            raise row_error(index, f"column {column!r} is an empty conversation")
        for n, message in enumerate(value):
            role = message["role"]
            if role not in ROLES:
                raise row_error(
                    index,
                    f"column {column!r} message {n} has role {role!r}; expected one of {', '.join(ROLES)}"
                    + _role_hint(role),
                )
            content = message.get("content")
            if not (isinstance(content, str) or _is_parts(content)):
                raise row_error(
                    index,
                    f"column {column!r} has a message whose content is {type(content).__name__}, expected str "
                    "or a list of {'type': 'text', 'text': str} / {'type': 'image'} parts",
                )
        return
    if not isinstance(value, str):
        raise row_error(index, f"column {column!r} is {type(value).__name__}, expected str or a list of messages")
    if not value.strip() and not allow_empty:
        raise row_error(index, f"column {column!r} is empty")


def _is_parts(content: Any) -> bool:
    return isinstance(content, list) and all(
        isinstance(p, Mapping)
        and (p.get("type") == "image" or (p.get("type") == "text" and isinstance(p.get("text"), str)))
        for p in content
    )


def count_image_parts(value: Any) -> int:
    """``{"type": "image"}`` parts in a conversation (0 for text)."""
    if not is_conversation(value):
        return 0
    return sum(
        sum(1 for p in m["content"] if p.get("type") == "image") for m in value if isinstance(m.get("content"), list)
    )


def _check_images(row: dict[str, Any], index: int, prompt_columns: tuple[str, ...], answer_columns: tuple[str, ...]) -> None:
    """A row's ``images`` match its prompt's image parts one to one, and no answer holds an image."""
    images = row.get("images")
    count = 0 if images is None else len(images) if isinstance(images, list | tuple) else 1
    for column in answer_columns:
        if count_image_parts(row[column]):
            raise row_error(index, f"column {column!r} holds image parts; images belong in the prompt")
    parts = sum(count_image_parts(row[column]) for column in prompt_columns)
    if parts != count:
        raise row_error(
            index,
            f"the prompt has {parts} image parts but column 'images' holds {count} images; each image part "
            "({'type': 'image'} in a conversation's content) takes the next image",
        )


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
            raise row_error(index, "chosen and rejected share no leading messages (no prompt)")
        return chosen[:n], chosen[n:], rejected[n:]
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise row_error(index, "chosen and rejected must both be text or both conversations")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    common = chosen[:n]
    cut = max((common.rfind(m) + len(m) for m in TURN_MARKERS if m in common), default=-1)
    if cut < 0:
        cut = max(common.rfind(" "), common.rfind("\n"))
    if cut <= 0:
        raise row_error(index, "chosen and rejected share no prompt prefix ending at a word boundary")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def normalise_row(row: dict[str, Any], index: int, shape: str) -> dict[str, Any]:
    """Validate one row of ``shape`` and return it with an explicit prompt (extras kept)."""
    out = dict(row)
    if shape == "paired":
        if "prompt" not in row or row["prompt"] is None:
            out["prompt"], out["chosen"], out["rejected"] = split_implicit_prompt(row["chosen"], row["rejected"], index)
        for column in ("prompt", "chosen", "rejected"):
            _check_field(out[column], column, index)
        if "images" in row:
            _check_images(out, index, ("prompt",), ("chosen", "rejected"))
        if "margin" in row and not isinstance(row["margin"], int | float):
            raise row_error(index, f"column 'margin' must be a number, got {type(row['margin']).__name__}")
    elif shape == "unpaired":
        for column in ("prompt", "completion"):
            _check_field(row[column], column, index)
        if not isinstance(row["label"], bool):
            raise row_error(index, f"column 'label' must be a bool, got {row['label']!r}")
        if "images" in row:
            _check_images(row, index, ("prompt",), ("completion",))
    elif shape == "prompt_completion":
        for column in ("prompt", "completion"):
            _check_field(row[column], column, index)
        if "images" in row:
            _check_images(row, index, ("prompt",), ("completion",))
    elif shape == "language_modeling":
        column = "messages" if "messages" in row else "text"
        _check_field(row[column], column, index)
        if "images" in row:
            _check_images(row, index, (column,), ())
    elif shape == "prompt_only":
        _check_field(row["prompt"], "prompt", index)
        if "images" in row:
            _check_images(row, index, ("prompt",), ())
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
