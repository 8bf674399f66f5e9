"""``lit_pref.scoring.RewardScorer``: load a reward model of either head type and score pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lit_pref import tasks
from lit_pref.scoring import VALUE_HEAD_FILE, RewardScorer, load_value_head, new_value_head, save_value_head

ROWS = tasks.preference_rows(5, seed=3)
PROMPTS = [r["prompt"] for r in ROWS]
COMPLETIONS = [r["chosen"] for r in ROWS]


@pytest.fixture(scope="module")
def value_head_dir(tiny_lm_dir, tmp_path_factory) -> Path:
    """A causal LM with a random value head saved next to it."""
    directory = tmp_path_factory.mktemp("value_head_rm")
    AutoModelForCausalLM.from_pretrained(tiny_lm_dir).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(directory)
    torch.manual_seed(0)
    save_value_head(new_value_head(64), directory)
    return directory


@pytest.fixture(scope="module")
def adapter_rm_dir(tiny_rm_dir, tmp_path_factory) -> Path:
    """A SEQ_CLS LoRA adapter (random, non-zero) over the tiny classifier."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    directory = tmp_path_factory.mktemp("adapter_rm")
    get_peft_model(base, config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_rm_dir).save_pretrained(directory)
    return directory


def manual_rewards(model, head, ids: list[list[int]]) -> list[float]:
    """Rewards computed one unpadded row at a time, straight from the hidden states."""
    out = []
    with torch.no_grad():
        for row in ids:
            hidden = model(torch.tensor([row]), output_hidden_states=True).hidden_states[-1]
            out.append(float(head(hidden[0, -1])))
    return out


@pytest.mark.parametrize("kind", ["classifier", "value_head", "adapter"])
def test_score_matches_one_row_at_a_time_reference(kind, tiny_rm_dir, value_head_dir, adapter_rm_dir):
    directory = {"classifier": tiny_rm_dir, "value_head": value_head_dir, "adapter": adapter_rm_dir}[kind]
    scorer = RewardScorer.from_pretrained(directory, batch_size=2)
    ids = [scorer.encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert all(row[-1] == scorer.tokenizer.eos_token_id for row in ids)  # scored through the EOS
    if kind == "value_head":
        reference = manual_rewards(
            AutoModelForCausalLM.from_pretrained(directory), load_value_head(directory), ids
        )
    elif kind == "classifier":
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        reference = manual_rewards(model, model.score, ids)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir), directory
        )
        reference = manual_rewards(model, model.score, ids)
        plain = RewardScorer.from_pretrained(tiny_rm_dir).score(PROMPTS, COMPLETIONS)
        assert max(abs(a - b) for a, b in zip(plain, reference, strict=True)) > 1e-4  # the adapter matters
    scores = scorer.score(PROMPTS, COMPLETIONS)
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    assert scores == pytest.approx(reference, abs=1e-5)


def test_score_ids_any_padding_and_no_grad(tiny_rm_dir):
    scorer = RewardScorer.from_pretrained(tiny_rm_dir)
    ids = [scorer.encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    width = max(map(len, ids)) + 2
    pad = scorer.tokenizer.pad_token_id

    def padded(left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[pad] * (width - len(r)) + r if left else r + [pad] * (width - len(r)) for r in ids]
        masks = [
            [0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r))
            for r in ids
        ]
        return torch.tensor(rows), torch.tensor(masks)

    right, left = scorer.score_ids(*padded(left=False)), scorer.score_ids(*padded(left=True))
    assert right.shape == (len(ids),) and right.dtype == torch.float32 and not right.requires_grad
    torch.testing.assert_close(right, left, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, torch.tensor(scorer.score(PROMPTS, COMPLETIONS)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="real token"):
        scorer.score_ids(torch.tensor([[pad]]), torch.tensor([[0]]))


def test_conversational_pairs_use_the_chat_template(tiny_rm_dir):
    scorer = RewardScorer.from_pretrained(tiny_rm_dir)
    rows = tasks.preference_rows(3, seed=3, conversational=True)
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    scores = scorer.score(prompts, completions)
    ids = scorer.encode(prompts[0], completions[0])
    text = scorer.tokenizer.decode(ids)
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text and text.count("<|bos|>") == 1
    rendered = [
        scorer.tokenizer.apply_chat_template(p + c, tokenize=False)
        for p, c in zip(prompts, completions, strict=True)
    ]
    assert scores == pytest.approx(scorer.score_ids(*_right_padded(scorer, rendered)).tolist(), abs=1e-5)


def _right_padded(scorer: RewardScorer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = scorer.tokenizer(
        texts, add_special_tokens=False, padding=True, return_tensors="pt", padding_side="right"
    )
    return batch["input_ids"], batch["attention_mask"]


def test_max_length_keeps_the_end_of_the_prompt(tiny_rm_dir):
    scorer = RewardScorer.from_pretrained(tiny_rm_dir, max_length=8)
    ids = scorer.encode(PROMPTS[0], COMPLETIONS[0])
    full = RewardScorer.from_pretrained(tiny_rm_dir).encode(PROMPTS[0], COMPLETIONS[0])
    assert len(ids) == 8 and ids[-1] == scorer.tokenizer.eos_token_id and ids == full[-8:]


def test_a_plain_causal_lm_is_not_a_reward_model(tiny_lm_dir):
    with pytest.raises(ValueError, match="neither a sequence classifier"):
        RewardScorer.from_pretrained(tiny_lm_dir)


def test_prompts_and_completions_must_pair_up(tiny_rm_dir):
    with pytest.raises(ValueError, match="prompts but"):
        RewardScorer.from_pretrained(tiny_rm_dir).score(["a", "b"], ["c"])


def test_value_head_file_round_trip(tmp_path):
    head = new_value_head(16)
    save_value_head(head, tmp_path)
    assert (tmp_path / VALUE_HEAD_FILE).is_file()
    loaded = load_value_head(tmp_path)
    torch.testing.assert_close(loaded.weight, head.weight.detach())
    torch.testing.assert_close(loaded.bias, head.bias.detach())


def test_scorer_is_a_frozen_module_that_moves(tiny_rm_dir):
    scorer = RewardScorer.from_pretrained(tiny_rm_dir, device="cpu")
    assert isinstance(scorer, torch.nn.Module) and not scorer.training
    assert not any(p.requires_grad for p in scorer.parameters())
    assert scorer.device == torch.device("cpu")
    parent = torch.nn.Sequential(scorer).train()  # e.g. inside a PPO module switched to training
    assert parent.training and not scorer.training and not scorer.model.training
