"""Turn normalised rows into token ids: chat templates, prompt/completion split, truncation.

Rules that hold for every shape:

* Conversations are rendered whole by the tokenizer's chat template and split into prompt and
  completion in token space (the rendered prompt with a generation prompt must be a token prefix
  of the rendered conversation), so nothing is re-tokenised across the boundary.
* BOS appears exactly once: added when the tokenizer normally adds it and the text lacks it,
  removed when a template and the tokenizer would both add it.
* Every completion contains the EOS token (appended to text completions), and the loss mask is
  built from lengths, never from ``ids != pad``, so pad == EOS tokenizers keep their real EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from lit_pref.data.formats import DataFormatError, is_conversation, row_error
from lit_pref.vision.images import load_images
from lit_pref.vision.processing import ImageRowTokenizer, count_image_tokens, image_token_id

TruncationMode = Literal["keep_end", "keep_start", "drop", "error"]


@dataclass(frozen=True)
class TruncationConfig:
    """Length limits and what to do when a row exceeds them.

    Args:
        max_length: limit on prompt + completion tokens (``None``: no limit).
        max_prompt_length: limit on prompt tokens (``None``: no limit).
        max_completion_length: limit on completion tokens (``None``: no limit).
        truncation_mode: ``keep_end`` keeps a long prompt's last tokens (the turn being answered),
            ``keep_start`` its first; completions always keep their start. ``drop`` removes
            rows over a limit, ``error`` raises on the first one.
        min_prompt_length: prompts that truncation leaves shorter than this many tokens (or than
            ``max_prompt_length``, if smaller) are counted and warned about: a prompt cut to a
            token or two no longer says what the completion answers (``None``: no check).
    """

    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: TruncationMode = "keep_end"
    min_prompt_length: int | None = 8

    @property
    def prompt_floor(self) -> int:
        """The length below which a truncated prompt is reported: ``min_prompt_length``, or less when
        ``max_prompt_length`` itself asks for shorter prompts."""
        if self.min_prompt_length is None:
            return 0
        return min(self.min_prompt_length, self.max_prompt_length or self.min_prompt_length)

    def __post_init__(self) -> None:
        if self.truncation_mode not in ("keep_end", "keep_start", "drop", "error"):
            raise ValueError(
                f"truncation_mode must be keep_end, keep_start, drop or error, got {self.truncation_mode!r}"
            )
        for name in ("max_length", "max_prompt_length", "max_completion_length", "min_prompt_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of tokens or null, got {value}")


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding with special tokens puts BOS first (Llama-style tokenizers)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _fix_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    if tokenizer.chat_template is None:
        raise DataFormatError(
            f"the tokenizer {tokenizer.name_or_path!r} has no chat template, which conversational data "
            "needs; use a chat/instruct tokenizer, set tokenizer.chat_template, or pass plain-text rows"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _fix_bos(tokenizer, tokenizer(text, add_special_tokens=False).input_ids)


def _as_messages(value: Any, role: str) -> list[dict]:
    return value if is_conversation(value) else [{"role": role, "content": value}]


def _with_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    """Templated turns: EOS somewhere in them (a template may put a newline after it)."""
    eos = tokenizer.eos_token_id
    return ids if eos is None or eos in ids else [*ids, eos]


def _with_final_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    """Plain text: EOS as the last token (an EOS mentioned mid-text does not end it)."""
    eos = tokenizer.eos_token_id
    return ids if eos is None or (ids and ids[-1] == eos) else [*ids, eos]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> list[int]:
    """Token ids of a prompt, ready for a completion (or generation) to follow."""
    if is_conversation(prompt):
        return _render(tokenizer, prompt, generation_prompt=True)
    return _fix_bos(tokenizer, tokenizer(prompt).input_ids)


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any, prompt_ids: list[int], index: int
) -> list[int]:
    """Token ids of ``completion`` following ``prompt`` (whose ids are ``prompt_ids``), EOS included."""
    if is_conversation(prompt) or is_conversation(completion):
        full = _render(
            tokenizer, _as_messages(prompt, "user") + _as_messages(completion, "assistant"), generation_prompt=False
        )
        if full[: len(prompt_ids)] != prompt_ids:
            raise row_error(
                index,
                "the chat template renders the prompt differently on its own and inside the "
                "conversation, so prompt and completion cannot be split in token space",
            )
        return _with_eos(tokenizer, full[len(prompt_ids) :])
    return _with_final_eos(tokenizer, tokenizer(completion, add_special_tokens=False).input_ids)


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Ids of a whole conversation and a 0/1 mask of the tokens inside assistant turns."""
    ids = _render(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1], generation_prompt=False))
        mask[start:end] = [1] * (end - start)
    return ids, mask


def truncate(
    prompt: list[int], completions: list[list[int]], config: TruncationConfig, *, bos_token_id: int | None = None
) -> tuple[list[int], list[list[int]], dict[str, bool]]:
    """Apply ``config`` to one row; the flags say what was truncated and whether to drop it.

    ``max_length`` is met by shortening the prompt first (per the mode, keeping at least one
    token), then the completions. A completion cut to nothing marks the row for dropping, since a
    row with an empty loss mask would turn a mean into NaN. Under ``keep_end`` a prompt that
    starts with ``bos_token_id`` keeps that BOS in front of its last tokens (limit permitting).
    """
    longest = max(len(c) for c in completions) if completions else 0
    over_prompt = config.max_prompt_length is not None and len(prompt) > config.max_prompt_length
    over_completion = config.max_completion_length is not None and longest > config.max_completion_length
    over_total = config.max_length is not None and len(prompt) + longest > config.max_length
    flags = {"truncated_prompt": False, "truncated_completion": False, "drop": False}
    if not (over_prompt or over_completion or over_total):
        return prompt, completions, flags
    if config.truncation_mode == "error":
        raise DataFormatError(
            f"a row is longer than the limits (prompt {len(prompt)}, completion {longest} tokens; "
            f"max_prompt_length={config.max_prompt_length}, max_completion_length="
            f"{config.max_completion_length}, max_length={config.max_length}); raise the limits or pick "
            "truncation_mode keep_end / keep_start / drop"
        )
    if config.truncation_mode == "drop":
        flags["drop"] = True
        return prompt, completions, flags

    def cut_prompt(limit: int) -> list[int]:
        limit = max(limit, 1)
        if limit >= len(prompt):
            return prompt
        if config.truncation_mode == "keep_start":
            return prompt[:limit]
        if limit > 1 and bos_token_id is not None and prompt[0] == bos_token_id:
            return [prompt[0], *prompt[len(prompt) - limit + 1 :]]
        return prompt[-limit:]

    original_prompt, original_lengths = len(prompt), [len(c) for c in completions]
    if over_prompt and config.max_prompt_length is not None:
        prompt = cut_prompt(config.max_prompt_length)
    if config.max_completion_length is not None:
        completions = [c[: config.max_completion_length] for c in completions]
    if config.max_length is not None:
        longest = max(len(c) for c in completions) if completions else 0
        if len(prompt) + longest > config.max_length:
            prompt = cut_prompt(config.max_length - longest)
        completions = [c[: max(config.max_length - len(prompt), 0)] for c in completions]
    flags["truncated_prompt"] = len(prompt) < original_prompt
    flags["truncated_completion"] = any(len(c) < n for c, n in zip(completions, original_lengths, strict=True))
    flags["drop"] = any(not c for c in completions)
    return prompt, completions, flags


def _sft_ids(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], index: int, completion_only_loss: bool
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion loss mask) for one supervised row."""
    if "messages" in row and row.get("messages") is not None:
        ids, assistant = encode_conversation(tokenizer, row["messages"])
        if not any(assistant):
            raise row_error(index, "the conversation has no assistant turn to train on")
        split = assistant.index(1) if completion_only_loss else 1
        mask = assistant[split:] if completion_only_loss else [1] * (len(ids) - split)
        return ids[:split], ids[split:], mask
    if "text" in row and row.get("text") is not None:
        ids = _with_final_eos(tokenizer, _fix_bos(tokenizer, tokenizer(row["text"]).input_ids))
        if len(ids) < 2:
            raise row_error(index, "column 'text' is too short to train on")
        return ids[:1], ids[1:], [1] * (len(ids) - 1)
    completion_key = "chosen" if "chosen" in row else "completion"
    prompt_ids = encode_prompt(tokenizer, row["prompt"])
    completion_ids = encode_completion(tokenizer, row["prompt"], row[completion_key], prompt_ids, index)
    if completion_only_loss:
        return prompt_ids, completion_ids, [1] * len(completion_ids)
    whole = prompt_ids + completion_ids
    return whole[:1], whole[1:], [1] * (len(whole) - 1)


def tokenize_row(
    row: dict[str, Any],
    index: int,
    *,
    tokenizer: PreTrainedTokenizerBase,
    target: str,
    truncation: TruncationConfig,
    completion_only_loss: bool = True,
    processor: Any = None,
) -> dict[str, Any]:
    """Token columns for one normalised row of the shape ``target`` needs.

    With a ``processor`` (vision-language models) the row's ``images`` are bound to the tokenizer:
    the processor's chat template renders image parts and each image placeholder becomes the
    image's tokens. Truncation that would cut into image tokens drops the row (flag
    ``_cut_image``; ``truncation_mode: error`` raises), since the images would no longer match.

    Returns ``prompt_input_ids`` and, per target, ``chosen_input_ids``/``rejected_input_ids``
    (paired), ``completion_input_ids`` (unpaired), ``completion_input_ids``/``completion_mask``
    (sft), plus the truncation flags ``_truncated_prompt``, ``_truncated_completion``, ``_drop``,
    ``_short_prompt`` (truncation left the prompt under ``min_prompt_length`` tokens) and
    ``_cut_image``.
    """
    mask: list[int] | None = None
    image_token = None
    if processor is not None:
        tokenizer = ImageRowTokenizer(processor, load_images(row.get("images")))  # type: ignore[assignment]
        image_token = image_token_id(processor)
    if target == "sft":
        prompt_ids, completion_ids, mask = _sft_ids(tokenizer, row, index, completion_only_loss)
        completions = [completion_ids]
    else:
        prompt_ids = encode_prompt(tokenizer, row["prompt"])
        keys = {"paired": ("chosen", "rejected"), "unpaired": ("completion",), "prompt_only": ()}[target]
        completions = [encode_completion(tokenizer, row["prompt"], row[k], prompt_ids, index) for k in keys]
    if not prompt_ids:
        raise row_error(index, "the prompt encodes to no tokens")
    image_tokens = 0 if image_token is None else count_image_tokens([prompt_ids, *completions], image_token)
    try:
        prompt_ids, completions, flags = truncate(
            prompt_ids, completions, truncation, bos_token_id=tokenizer.bos_token_id
        )
    except DataFormatError as error:
        # Asked for by truncation_mode=error: never skipped as a bad row.
        raise row_error(index, str(error), skippable=False) from None
    flags["short_prompt"] = flags["truncated_prompt"] and len(prompt_ids) < truncation.prompt_floor
    flags["cut_image"] = (
        image_token is not None and count_image_tokens([prompt_ids, *completions], image_token) < image_tokens
    )
    flags["drop"] = flags["drop"] or flags["cut_image"]
    out: dict[str, Any] = {"prompt_input_ids": prompt_ids}
    if target == "paired":
        out["chosen_input_ids"], out["rejected_input_ids"] = completions
    elif target in ("unpaired", "sft"):
        out["completion_input_ids"] = completions[0]
    if mask is not None:
        out["completion_mask"] = mask[: len(completions[0])]
        flags["drop"] = flags["drop"] or not any(out["completion_mask"])
    out.update({f"_{name}": value for name, value in flags.items()})
    return out
