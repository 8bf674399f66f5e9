"""Shape detection, row validation, implicit prompts and the paired → unpaired conversion."""

from __future__ import annotations

import pytest

from lit_pref.data.formats import (
    DataFormatError,
    check_convertible,
    detect_shape,
    is_conversation,
    normalise_row,
    paired_to_unpaired,
    split_implicit_prompt,
)


@pytest.mark.parametrize(
    ("columns", "shape"),
    [
        (["prompt", "chosen", "rejected", "margin"], "paired"),
        (["chosen", "rejected"], "paired"),
        (["prompt", "completion", "label"], "unpaired"),
        (["prompt", "completion"], "prompt_completion"),
        (["messages"], "language_modeling"),
        (["text", "source"], "language_modeling"),
        (["prompt", "mood"], "prompt_only"),
    ],
)
def test_detect_shape(columns, shape):
    assert detect_shape(columns) == shape


def test_missing_columns_name_what_was_found_and_what_is_accepted():
    with pytest.raises(DataFormatError) as info:
        detect_shape(["question", "answer_a"])
    message = str(info.value)
    assert "['answer_a', 'question']" in message
    for expected in ("paired: (prompt, chosen, rejected) or (chosen, rejected)", "unpaired: (prompt, completion, label)",
                     "language_modeling: (messages) or (text)", "prompt_only: (prompt)"):
        assert expected in message


def test_check_convertible():
    check_convertible("paired", "unpaired")
    check_convertible("paired", "sft")
    check_convertible("unpaired", "prompt_only")
    with pytest.raises(DataFormatError, match="'unpaired' dataset cannot be used where 'paired'"):
        check_convertible("unpaired", "paired")
    with pytest.raises(DataFormatError, match="unknown data target 'rl'"):
        check_convertible("paired", "rl")


HH_PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant:"


def test_implicit_prompt_hh_single_turn_splits_after_assistant_not_mid_word():
    # The answers share "The capital" and even "The capi": the split is still after the marker.
    chosen = HH_PROMPT + " The capital is Paris."
    rejected = HH_PROMPT + " The capybara knows."
    assert split_implicit_prompt(chosen, rejected, 0) == (HH_PROMPT, " The capital is Paris.", " The capybara knows.")


def test_implicit_prompt_hh_multi_turn_uses_the_last_shared_assistant_marker():
    history = HH_PROMPT + " Paris.\n\nHuman: And of Italy?\n\nAssistant:"
    prompt, chosen, rejected = split_implicit_prompt(history + " Rome.", history + " Milan, I think.", 3)
    assert (prompt, chosen, rejected) == (history, " Rome.", " Milan, I think.")


def test_implicit_prompt_without_markers_splits_at_a_word_boundary():
    prompt, chosen, rejected = split_implicit_prompt("Answer briefly: yes indeed", "Answer briefly: yesterday", 0)
    assert (prompt, chosen, rejected) == ("Answer briefly:", " yes indeed", " yesterday")
    with pytest.raises(DataFormatError, match="row 7: chosen and rejected share no prompt prefix"):
        split_implicit_prompt("alpha", "alps", 7)


def test_implicit_prompt_of_conversations_splits_after_the_shared_messages():
    user = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    chosen = [*user, {"role": "assistant", "content": "hello"}]
    rejected = [*user, {"role": "assistant", "content": "go away"}]
    assert split_implicit_prompt(chosen, rejected, 0) == (user, chosen[2:], rejected[2:])
    # Identical conversations still leave one message for each completion.
    prompt, c, r = split_implicit_prompt(chosen, chosen, 0)
    assert prompt == user and c == r == chosen[2:]
    with pytest.raises(DataFormatError, match="row 2: chosen and rejected share no leading messages"):
        split_implicit_prompt(chosen[1:], rejected[:1] + rejected[2:], 2)
    with pytest.raises(DataFormatError, match=r"row 4: .*both be text or both conversations"):
        split_implicit_prompt(chosen, "hello", 4)


def test_normalise_row_implicit_prompt_and_extras():
    row = {"prompt": None, "chosen": HH_PROMPT + " Paris.", "rejected": HH_PROMPT + " Lyon.", "margin": 2, "id": "a"}
    out = normalise_row(row, 0, "paired")
    assert out == {"prompt": HH_PROMPT, "chosen": " Paris.", "rejected": " Lyon.", "margin": 2, "id": "a"}
    assert row["prompt"] is None  # the input row is not modified


@pytest.mark.parametrize(
    ("row", "shape", "message"),
    [
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "paired", "row 5: column 'chosen' is NoneType, expected str"),
        ({"prompt": "p", "chosen": "c", "rejected": "  "}, "paired", "row 5: column 'rejected' is empty"),
        ({"prompt": 3, "chosen": "c", "rejected": "r"}, "paired", "row 5: column 'prompt' is int"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "paired", "row 5: column 'margin' must be a number"),
        ({"prompt": "p", "completion": "c", "label": 1}, "unpaired", "row 5: column 'label' must be a bool"),
        ({"prompt": "p", "completion": ""}, "prompt_completion", "row 5: column 'completion' is empty"),
        ({"messages": []}, "language_modeling", "row 5: column 'messages' is an empty conversation"),
        ({"messages": [{"role": "user", "content": None}]}, "language_modeling", "row 5: column 'messages' has a message whose content is NoneType"),
        ({"text": ""}, "language_modeling", "row 5: column 'text' is empty"),
        ({"prompt": ["not", "messages"]}, "prompt_only", "row 5: column 'prompt' is list"),
    ],
)
def test_bad_rows_name_the_row_and_column(row, shape, message):
    with pytest.raises(DataFormatError) as info:
        normalise_row(row, 5, shape)
    assert str(info.value).startswith(message)


def test_good_rows_of_every_shape_pass_unchanged():
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [
        ({"prompt": "p", "completion": "c", "label": False, "extra": 1}, "unpaired"),
        ({"prompt": conversation[:1], "completion": conversation[1:]}, "prompt_completion"),
        ({"messages": conversation}, "language_modeling"),
        ({"text": "hello"}, "language_modeling"),
        ({"prompt": "p", "mood": "sad"}, "prompt_only"),
    ]
    for row, shape in rows:
        assert normalise_row(row, 0, shape) == row
    assert is_conversation(conversation) and not is_conversation("hi") and not is_conversation(["hi"])


def test_paired_to_unpaired_keeps_extras_on_both_rows():
    batch = {
        "prompt": ["p1", "p2"],
        "chosen": ["c1", "c2"],
        "rejected": ["r1", "r2"],
        "source": ["a", "b"],
        "index": [0, 1],
    }
    assert paired_to_unpaired(batch) == {
        "prompt": ["p1", "p1", "p2", "p2"],
        "completion": ["c1", "r1", "c2", "r2"],
        "label": [True, False, True, False],
        "source": ["a", "a", "b", "b"],
    }
