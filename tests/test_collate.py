"""Collation: left-padded prompts, right-padded interleaved completions, tensors vs lists."""

from __future__ import annotations

import torch

from lit_pref.data.collate import Collator, pad

PAD = 9


def test_pad_left_right_and_multiple_of():
    seqs = [[1, 2, 3], [4], []]
    assert pad(seqs, PAD).tolist() == [[1, 2, 3], [4, PAD, PAD], [PAD, PAD, PAD]]
    assert pad(seqs, PAD, left=True).tolist() == [[1, 2, 3], [PAD, PAD, 4], [PAD, PAD, PAD]]
    assert pad(seqs, 0, multiple_of=4).tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]]
    assert pad([[1] * 8], 0, multiple_of=4).shape == (1, 8)
    assert pad(seqs, PAD).dtype == torch.long


def paired_rows():
    return [
        {"prompt_input_ids": [0, 5, 6], "chosen_input_ids": [7, 1], "rejected_input_ids": [8, 8, 8, 1],
         "margin": 1.5, "index": 0, "source": "a", "tags": ["x"]},
        {"prompt_input_ids": [0], "chosen_input_ids": [1], "rejected_input_ids": [3, 1],
         "margin": 0, "index": 1, "source": "b", "tags": []},
    ]


def test_paired_batch_layout():
    batch = Collator(PAD)(paired_rows())
    assert batch["prompt_input_ids"].tolist() == [[0, 5, 6], [PAD, PAD, 0]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    # chosen, rejected, chosen, rejected; padded to the longest completion of the batch.
    assert batch["completion_input_ids"].tolist() == [
        [7, 1, PAD, PAD],
        [8, 8, 8, 1],
        [1, PAD, PAD, PAD],
        [3, 1, PAD, PAD],
    ]
    expected_mask = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert batch["completion_attention_mask"].tolist() == expected_mask
    assert batch["completion_mask"].tolist() == expected_mask
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [1.5, 0.0]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1]
    assert batch["source"] == ["a", "b"] and batch["tags"] == [["x"], []]
    assert "chosen_input_ids" not in batch and "rejected_input_ids" not in batch
    for key in ("prompt_input_ids", "prompt_attention_mask", "completion_input_ids", "completion_attention_mask"):
        assert batch[key].dtype == torch.long


def test_pad_to_multiple_of_applies_to_every_token_tensor():
    batch = Collator(PAD, pad_to_multiple_of=8)(paired_rows())
    for key in ("prompt_input_ids", "prompt_attention_mask", "completion_input_ids", "completion_attention_mask",
                "completion_mask"):
        assert batch[key].shape[1] == 8, key
    assert batch["prompt_input_ids"][1].tolist() == [PAD] * 7 + [0]
    assert batch["completion_mask"].sum().item() == 2 + 4 + 1 + 2


def test_unpaired_batch_with_labels_and_loss_mask():
    rows = [
        {"prompt_input_ids": [0, 5], "completion_input_ids": [7, 7, 1], "completion_mask": [0, 1, 1], "label": True},
        {"prompt_input_ids": [0], "completion_input_ids": [6, 1], "label": False},
    ]
    batch = Collator(PAD)(rows)
    assert batch["completion_input_ids"].tolist() == [[7, 7, 1], [6, 1, PAD]]
    assert batch["completion_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # The row's own loss mask is used; without one every real token counts.
    assert batch["completion_mask"].tolist() == [[0, 1, 1], [1, 1, 0]]
    assert batch["label"].dtype == torch.bool and batch["label"].tolist() == [True, False]


def test_prompt_only_batch_keeps_text_and_extras_as_lists():
    rows = [
        {"prompt_input_ids": [0, 5, 6], "prompt": "Write a sad line:", "mood": "sad", "index": 3},
        {"prompt_input_ids": [0, 5], "prompt": "Write:", "mood": "happy", "index": 4},
    ]
    batch = Collator(PAD)(rows)
    assert set(batch) == {"prompt_input_ids", "prompt_attention_mask", "prompt", "mood", "index"}
    assert batch["prompt_input_ids"].tolist() == [[0, 5, 6], [PAD, 0, 5]]
    assert batch["prompt"] == ["Write a sad line:", "Write:"] and batch["mood"] == ["sad", "happy"]
    assert batch["index"].tolist() == [3, 4]
