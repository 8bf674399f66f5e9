"""Tokenisation: chat templates split in token space, one BOS, kept EOS, explicit truncation."""

from __future__ import annotations

import copy
import itertools

import pytest
from tokenizers import processors

from lit_pref import tasks
from lit_pref.data.collate import Collator
from lit_pref.data.formats import DataFormatError
from lit_pref.data.tokenize import (
    TruncationConfig,
    adds_bos,
    encode_completion,
    encode_conversation,
    encode_prompt,
    tokenize_row,
    truncate,
)
from lit_pref.tiny import CHATML_TEMPLATE, build_tiny_tokenizer

USER = [{"role": "user", "content": "Write a happy line about rain:"}]
ANSWER = [{"role": "assistant", "content": "good warm day"}]
NO_LIMITS = TruncationConfig(None, None, None)


def render(tokenizer, messages, generation_prompt=False):
    """What the template renders, tokenised without adding anything."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids


def row_ids(tokenizer, row, target="paired", truncation=NO_LIMITS, **kwargs):
    return tokenize_row(row, 0, tokenizer=tokenizer, target=target, truncation=truncation, **kwargs)


@pytest.fixture(scope="module")
def no_bos_tokenizer():
    """A Qwen-style tokenizer: no BOS added when encoding, none in the template."""
    tok = build_tiny_tokenizer(tasks.corpus())
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tok.chat_template = CHATML_TEMPLATE.replace("{{ bos_token }}", "")
    return tok


def test_fixture_tokenizer_is_the_double_bos_trap(tokenizer):
    # The template emits BOS and the tokenizer adds it too: naive encoding gives two.
    text = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    naive = tokenizer(text).input_ids
    assert naive[:2] == [tokenizer.bos_token_id] * 2
    assert adds_bos(tokenizer)


def test_text_prompt_has_exactly_one_bos_and_completion_ends_with_eos(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = row_ids(tokenizer, {"prompt": "Write a sad line:", "chosen": " dark cold", "rejected": " good"})
    assert out["prompt_input_ids"] == tokenizer("Write a sad line:").input_ids
    assert out["prompt_input_ids"].count(bos) == 1 and out["prompt_input_ids"][0] == bos
    for key in ("chosen_input_ids", "rejected_input_ids"):
        assert out[key][-1] == eos and out[key].count(eos) == 1 and bos not in out[key]
    assert out["chosen_input_ids"][:-1] == tokenizer(" dark cold", add_special_tokens=False).input_ids
    # A prompt that already carries the BOS text does not get a second one.
    assert encode_prompt(tokenizer, "<|bos|>Write a sad line:").count(bos) == 1
    # A completion that already ends with EOS keeps one; one that merely mentions EOS still gets one.
    assert encode_completion(tokenizer, "p", " done<|im_end|>", [bos], 0).count(eos) == 1
    mentioned = encode_completion(tokenizer, "p", " say <|im_end|> then stop", [bos], 0)
    assert mentioned[-1] == eos and mentioned.count(eos) == 2


def test_conversation_is_rendered_whole_and_split_in_token_space(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    row = {"prompt": USER, "chosen": ANSWER, "rejected": [{"role": "assistant", "content": "bad"}]}
    out = row_ids(tokenizer, row)
    prompt = out["prompt_input_ids"]
    assert prompt == render(tokenizer, USER, generation_prompt=True)
    assert prompt[0] == bos and prompt.count(bos) == 1
    assert prompt + out["chosen_input_ids"] == render(tokenizer, USER + ANSWER)
    for key in ("chosen_input_ids", "rejected_input_ids"):
        assert eos in out[key] and bos not in out[key]
    assert tokenizer.decode(out["chosen_input_ids"]) == "good warm day<|im_end|>\n"


def test_implicit_conversational_prompt_tokenises_like_the_explicit_one(tokenizer):
    from lit_pref.data.formats import normalise_row

    implicit = {"chosen": USER + ANSWER, "rejected": [*USER, {"role": "assistant", "content": "bad"}]}
    explicit = {"prompt": USER, "chosen": ANSWER, "rejected": [{"role": "assistant", "content": "bad"}]}
    assert row_ids(tokenizer, normalise_row(implicit, 0, "paired")) == row_ids(tokenizer, explicit)


@pytest.mark.parametrize("template_has_bos", [True, False])
def test_one_bos_whatever_adds_it(no_bos_tokenizer, tokenizer, template_has_bos):
    # Tokenizer adds BOS, template does not: BOS is added once.
    tok = copy.deepcopy(tokenizer)
    if not template_has_bos:
        tok.chat_template = CHATML_TEMPLATE.replace("{{ bos_token }}", "")
    prompt = encode_prompt(tok, USER)
    assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 1
    # Neither adds BOS (Qwen-style): none is invented.
    assert not adds_bos(no_bos_tokenizer)
    out = row_ids(no_bos_tokenizer, {"prompt": USER, "chosen": ANSWER, "rejected": ANSWER})
    assert no_bos_tokenizer.bos_token_id not in out["prompt_input_ids"]
    assert out["prompt_input_ids"] + out["chosen_input_ids"] == render(no_bos_tokenizer, USER + ANSWER)


def test_conversational_data_without_chat_template_is_a_clear_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(DataFormatError, match="has no chat template"):
        row_ids(tok, {"prompt": USER, "chosen": ANSWER, "rejected": ANSWER})
    # Plain text still works with it.
    assert row_ids(tok, {"prompt": "hi", "chosen": " a", "rejected": " b"})["prompt_input_ids"]


def test_template_that_renders_the_prompt_differently_cannot_be_split(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    with pytest.raises(DataFormatError, match="row 3: the chat template renders the prompt differently"):
        tokenize_row(
            {"prompt": USER, "chosen": ANSWER, "rejected": ANSWER},
            3,
            tokenizer=tok,
            target="paired",
            truncation=NO_LIMITS,
        )


def test_pad_equals_eos_keeps_the_real_eos_in_the_completion_mask():
    tok = build_tiny_tokenizer(tasks.corpus(), pad_equals_eos=True)
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    rows = [
        row_ids(tok, {"prompt": "Write a sad line:", "chosen": " dark", "rejected": " good warm day"}),
        row_ids(tok, {"prompt": USER, "chosen": ANSWER, "rejected": [{"role": "assistant", "content": "a"}]}),
    ]
    assert rows[0]["chosen_input_ids"][-1] == eos
    batch = Collator(tok.pad_token_id)(rows)
    ids, mask = batch["completion_input_ids"], batch["completion_mask"]
    completions = [c for r in rows for c in (r["chosen_input_ids"], r["rejected_input_ids"])]
    for r, completion in enumerate(completions):
        # Every real token counts, its EOS included, though padding uses the same id.
        assert mask[r].tolist() == [1] * len(completion) + [0] * (ids.shape[1] - len(completion))
        assert ids[r, : len(completion)].tolist() == completion and eos in completion
    assert (ids == eos).sum() > sum(c.count(eos) for c in completions)  # padding is EOS too


def test_sft_conversation_masks_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "warm day"},
    ]
    ids, assistant = encode_conversation(tokenizer, messages)
    assert ids == render(tokenizer, messages)
    trained = tokenizer.decode([t for t, m in zip(ids, assistant, strict=True) if m])
    assert trained == "hello<|im_end|>\nwarm day<|im_end|>\n"

    out = row_ids(tokenizer, {"messages": messages}, target="sft")
    assert out["prompt_input_ids"] == render(tokenizer, messages[:2], generation_prompt=True)
    assert out["prompt_input_ids"] + out["completion_input_ids"] == ids
    assert out["completion_mask"] == assistant[len(out["prompt_input_ids"]) :]
    full = row_ids(tokenizer, {"messages": messages}, target="sft", completion_only_loss=False)
    assert full["prompt_input_ids"] == [tokenizer.bos_token_id]
    assert full["completion_mask"] == [1] * (len(ids) - 1)

    with pytest.raises(DataFormatError, match="no assistant turn"):
        row_ids(tokenizer, {"messages": messages[:2]}, target="sft")


def test_sft_text_and_prompt_completion(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text = row_ids(tokenizer, {"text": "The quick brown fox"}, target="sft")
    assert text["prompt_input_ids"] == [bos]
    assert text["completion_input_ids"][-1] == eos and bos not in text["completion_input_ids"]
    assert len(text["completion_mask"]) == len(text["completion_input_ids"]) and all(text["completion_mask"])

    pc = row_ids(tokenizer, {"prompt": "Write:", "completion": " good"}, target="sft")
    assert pc["prompt_input_ids"] == tokenizer("Write:").input_ids
    assert pc["completion_mask"] == [1] * len(pc["completion_input_ids"])
    whole = row_ids(tokenizer, {"prompt": "Write:", "completion": " good"}, target="sft", completion_only_loss=False)
    assert whole["prompt_input_ids"] + whole["completion_input_ids"] == pc["prompt_input_ids"] + pc["completion_input_ids"]
    assert whole["prompt_input_ids"] == [bos]


# ---------------------------------------------------------------- truncation
PROMPT = [0, 11, 12, 13, 14, 15]  # starts with BOS (id 0)
CHOSEN, REJECTED = [21, 22, 23, 1], [31, 1]


def test_truncation_config_validates():
    with pytest.raises(ValueError, match="truncation_mode must be"):
        TruncationConfig(truncation_mode="middle")
    with pytest.raises(ValueError, match="max_prompt_length must be a positive"):
        TruncationConfig(max_prompt_length=0)


def test_no_limits_hit_changes_nothing():
    prompt, completions, flags = truncate(PROMPT, [CHOSEN, REJECTED], TruncationConfig(10, 6, 4, "error"))
    assert (prompt, completions) == (PROMPT, [CHOSEN, REJECTED])
    assert flags == {"truncated_prompt": False, "truncated_completion": False, "drop": False}


def test_keep_end_and_keep_start_on_the_prompt():
    config = TruncationConfig(None, 3, None, "keep_end")
    assert truncate(PROMPT, [CHOSEN], config)[0] == [13, 14, 15]
    assert truncate(PROMPT, [CHOSEN], config, bos_token_id=0)[0] == [0, 14, 15]
    start = truncate(PROMPT, [CHOSEN], TruncationConfig(None, 3, None, "keep_start"), bos_token_id=0)
    assert start[0] == [0, 11, 12]
    assert start[1] == [CHOSEN]
    assert start[2] == {"truncated_prompt": True, "truncated_completion": False, "drop": False}


def test_max_completion_length_keeps_the_start_of_each_completion():
    prompt, completions, flags = truncate(PROMPT, [CHOSEN, REJECTED], TruncationConfig(None, None, 2, "keep_end"))
    assert prompt == PROMPT and completions == [[21, 22], [31, 1]]
    assert flags == {"truncated_prompt": False, "truncated_completion": True, "drop": False}


def test_max_length_shortens_the_prompt_first_then_completions():
    # 6 + 4 > 8: the prompt gives up two tokens, the completions are untouched.
    prompt, completions, flags = truncate(PROMPT, [CHOSEN, REJECTED], TruncationConfig(8, None, None), bos_token_id=0)
    assert prompt == [0, 13, 14, 15] and completions == [CHOSEN, REJECTED]
    assert flags["truncated_prompt"] and not flags["truncated_completion"]
    # 3 tokens in all: the prompt keeps one token, the completions two.
    prompt, completions, flags = truncate(PROMPT, [CHOSEN, REJECTED], TruncationConfig(3, None, None))
    assert prompt == [15] and completions == [[21, 22], [31, 1]]
    assert flags == {"truncated_prompt": True, "truncated_completion": True, "drop": False}


def test_a_completion_cut_to_nothing_drops_the_row():
    _, completions, flags = truncate(PROMPT, [CHOSEN, REJECTED], TruncationConfig(1, None, None))
    assert completions == [[], []] and flags["drop"]


def test_drop_and_error_modes():
    config = TruncationConfig(None, 4, None, "drop")
    prompt, completions, flags = truncate(PROMPT, [CHOSEN], config)
    assert flags["drop"] and prompt == PROMPT and completions == [CHOSEN]
    with pytest.raises(DataFormatError, match=r"prompt 6, completion 4 tokens; max_prompt_length=4"):
        truncate(PROMPT, [CHOSEN], TruncationConfig(None, 4, None, "error"))


def test_error_mode_names_the_row(tokenizer):
    with pytest.raises(DataFormatError, match=r"^row 9: a row is longer than the limits"):
        tokenize_row(
            {"prompt": "Write a happy line about rain:", "chosen": " a", "rejected": " b"},
            9,
            tokenizer=tokenizer,
            target="paired",
            truncation=TruncationConfig(None, 2, None, "error"),
        )


def test_no_row_ever_keeps_an_empty_completion(tokenizer):
    rows = [
        ({"prompt": "Write a happy line about rain:", "chosen": " good warm day", "rejected": " bad"}, "paired"),
        ({"prompt": USER, "chosen": ANSWER, "rejected": [{"role": "assistant", "content": "no"}]}, "paired"),
        ({"prompt": "Write:", "completion": " good", "label": True}, "unpaired"),
        ({"messages": USER + ANSWER}, "sft"),
        ({"text": "the cat sat"}, "sft"),
    ]
    limits = [None, 1, 2, 4, 8, 16]
    seen_drop = seen_kept_truncated = False
    for (row, target), max_length, max_prompt, max_completion, mode in itertools.product(
        rows, limits, limits, limits[:4], ("keep_end", "keep_start")
    ):
        out = row_ids(tokenizer, row, target, TruncationConfig(max_length, max_prompt, max_completion, mode))
        completions = [out[k] for k in ("chosen_input_ids", "rejected_input_ids", "completion_input_ids") if k in out]
        if out["_drop"]:
            seen_drop = True
            continue
        assert out["prompt_input_ids"], (row, max_length, max_prompt, max_completion, mode)
        assert all(completions), (row, max_length, max_prompt, max_completion, mode)
        assert any(out.get("completion_mask", [1])), (row, max_length, max_prompt, max_completion, mode)
        if max_length is not None:
            assert len(out["prompt_input_ids"]) + max(map(len, completions)) <= max_length
        seen_kept_truncated |= out["_truncated_prompt"] or out["_truncated_completion"]
    assert seen_drop and seen_kept_truncated
