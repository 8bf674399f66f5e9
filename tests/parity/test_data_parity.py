"""lit_pref's prompt / completion split against TRL 1.16's for implicit-prompt and conversational rows.

Two levels, each with TRL's own code:

* text: :func:`lit_pref.data.formats.split_implicit_prompt` against ``trl.extract_prompt``;
* tokens: lit_pref's ``normalise_row`` + ``tokenize_row`` against ``DPOTrainer._prepare_dataset``
  (the trainer built with ``object.__new__``; the method reads only ``_tokenizer``), both with the
  tiny ChatML tokenizer (BOS from the template, ``<|im_end|>`` as EOS).

Where they agree (Anthropic HH rows whose answers differ from their first word, conversations) the
splits and the token ids are identical. Where they deliberately differ, the documented relation is
asserted: TRL cuts at the first differing character (one space back), which can split a word or
move the answers' shared first words into the prompt; lit_pref cuts after the last ``Assistant:``
marker of the common prefix, or else at its last whitespace, so the prompt never ends inside a
word. Both keep every character: ``prompt + chosen`` is the original row for both.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
from datasets import Dataset
from trl import extract_prompt
from trl.trainer.dpo_trainer import DPOTrainer

from lit_pref.data.formats import DataFormatError, normalise_row, split_implicit_prompt
from lit_pref.data.tokenize import TruncationConfig, tokenize_row

HH = "\n\nHuman: Say something happy.\n\nAssistant:"
HH_MULTI = "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Say something happy.\n\nAssistant:"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say something happy."},
]
MULTI_TURN = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "Say something happy."},
]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# Rows on which both libraries split identically.
EQUAL = [
    pytest.param({"chosen": HH + " Sunshine and joy.", "rejected": HH + " Rain again."}, id="hh"),
    pytest.param(
        {"chosen": HH_MULTI + " What a lovely day!", "rejected": HH_MULTI + " No."}, id="hh-multi-turn"
    ),
    pytest.param(
        {"chosen": "Tell me a mood word: happy", "rejected": "Tell me a mood word: sad"}, id="text-at-space"
    ),
    pytest.param(
        {"chosen": CONVERSATION + assistant("Joy!"), "rejected": CONVERSATION + assistant("Gloom.")},
        id="conversation",
    ),
    pytest.param(
        {"chosen": MULTI_TURN + assistant("Sunshine!"), "rejected": MULTI_TURN + assistant("Rain.")},
        id="conversation-multi-turn",
    ),
]


@pytest.mark.parametrize("row", EQUAL)
def test_split_equals_trl(row):
    prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"], 0)
    assert {"prompt": prompt, "chosen": chosen, "rejected": rejected} == extract_prompt(row)


def trl_tokenized(row: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
    trainer = object.__new__(DPOTrainer)
    trainer._tokenizer = tokenizer
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    return trainer._prepare_dataset(Dataset.from_list([row]), tokenizer, args, "train")[0]


def lit_tokenized(row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    normalised = normalise_row(dict(row), 0, "paired")
    return tokenize_row(normalised, 0, tokenizer=tokenizer, target="paired", truncation=TruncationConfig())


@pytest.mark.parametrize("row", EQUAL)
def test_token_ids_equal_trl(row, tokenizer):
    """Same prompt ids (BOS once), same completion ids (EOS kept) as TRL's tokenisation."""
    trl = trl_tokenized(row, tokenizer)
    lit = lit_tokenized(row, tokenizer)
    assert lit["prompt_input_ids"] == trl["prompt_ids"]
    assert lit["chosen_input_ids"] == trl["chosen_ids"]
    assert lit["rejected_input_ids"] == trl["rejected_ids"]
    assert lit["prompt_input_ids"].count(tokenizer.bos_token_id) == 1
    assert (
        tokenizer.eos_token_id in lit["chosen_input_ids"]
        and tokenizer.eos_token_id in lit["rejected_input_ids"]
    )


# Rows on which lit_pref's split deliberately differs: (row, lit_pref's prompt, TRL's prompt).
DIFFERENT = [
    pytest.param(
        {"chosen": HH + " The cat sat.", "rejected": HH + " The car sat."},
        HH,
        HH + " The ca",
        id="hh-mid-word",
    ),
    pytest.param(
        {"chosen": HH + " I think yes.", "rejected": HH + " I think no."},
        HH,
        HH + " I think",
        id="hh-shared-words",
    ),
    pytest.param(
        {"chosen": "Hello there friend", "rejected": "Hello there fiend"},
        "Hello there",
        "Hello there f",
        id="text-mid-word",
    ),
]


@pytest.mark.parametrize(("row", "lit_prompt", "trl_prompt"), DIFFERENT)
def test_split_word_boundary_difference(row, lit_prompt, trl_prompt):
    """The documented relation: TRL's prompt is lit_pref's plus the answers' common start, which lit_pref
    leaves in both completions; lit_pref's prompt ends at a marker or before whitespace, TRL's inside
    a word or a shared answer."""
    prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"], 0)
    trl = extract_prompt(row)
    assert prompt == lit_prompt and trl["prompt"] == trl_prompt
    moved = trl["prompt"][len(prompt) :]
    assert trl["prompt"].startswith(prompt) and moved
    assert chosen == moved + trl["chosen"] and rejected == moved + trl["rejected"]
    assert prompt + chosen == row["chosen"] == trl["prompt"] + trl["chosen"]
    assert prompt + rejected == row["rejected"] == trl["prompt"] + trl["rejected"]
    assert prompt.endswith("Assistant:") or chosen[0].isspace()


@pytest.mark.parametrize(("row", "lit_prompt", "trl_prompt"), DIFFERENT)
def test_token_split_word_boundary_difference(row, lit_prompt, trl_prompt, tokenizer):
    """In token space: lit_pref's prompt ids decode to its text prompt. TRL's are the common prefix of
    the tokenised text prompt and the tokenised prompt + answer, so where its text cut falls inside a
    word, BPE merges across the cut and the prompt ids stop earlier (between lit_pref's prompt and
    TRL's text prompt). Prompt + completion decodes to the whole row for both."""
    trl = trl_tokenized(row, tokenizer)
    lit = lit_tokenized(row, tokenizer)

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    assert text(lit["prompt_input_ids"]) == lit_prompt
    trl_prompt_text = text(trl["prompt_ids"])
    assert trl_prompt_text.startswith(lit_prompt) and trl_prompt.startswith(trl_prompt_text)
    for side in ("chosen", "rejected"):
        assert text(lit["prompt_input_ids"] + lit[f"{side}_input_ids"]) == row[side]
        assert text(trl["prompt_ids"] + trl[f"{side}_ids"]) == row[side]


def test_conversations_without_a_shared_first_message():
    """TRL returns an empty prompt; lit_pref refuses the row (a preference without a prompt)."""
    row = {
        "chosen": [{"role": "user", "content": "Hi"}, *assistant("Joy")],
        "rejected": [{"role": "user", "content": "Hey"}, *assistant("Gloom")],
    }
    assert extract_prompt(row)["prompt"] == []
    with pytest.raises(DataFormatError, match="no leading messages"):
        split_implicit_prompt(row["chosen"], row["rejected"], 0)
