"""Tiny offline models and tokenizer: small, saveable, loadable with the Auto classes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lit_pref import tasks
from lit_pref.tiny import (
    BOS,
    EOS,
    build_tiny_causal_lm,
    build_tiny_sequence_classifier,
    build_tiny_tokenizer,
    save_tiny_model,
)
from lit_pref.tiny import main as tiny_main


def test_tokenizer_special_tokens_and_chat_template(tokenizer):
    assert tokenizer.bos_token == BOS and tokenizer.eos_token == EOS
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    ids = tokenizer("Write a happy line about rain:").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Write a happy line about rain:"
    # Task words are single tokens (the corpus taught the merges), so sequences stay short.
    assert len(tokenizer(" happy", add_special_tokens=False).input_ids) == 1
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == f"{BOS}<|im_start|>user\nhi{EOS}\n<|im_start|>assistant\n"


def test_pad_equals_eos_tokenizer():
    tok = build_tiny_tokenizer(pad_equals_eos=True)
    assert tok.pad_token_id == tok.eos_token_id


def test_causal_lm_is_tiny_and_round_trips(tokenizer, tmp_path):
    model = build_tiny_causal_lm(tokenizer, seed=1).eval()
    config = model.config
    assert config.hidden_size <= 64 and 1 <= config.num_hidden_layers <= 4
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert sum(p.numel() for p in model.parameters()) < 500_000
    # The same seed gives the same weights; another seed does not.
    assert torch.equal(model.lm_head.weight, build_tiny_causal_lm(tokenizer, seed=1).lm_head.weight)
    assert not torch.equal(model.lm_head.weight, build_tiny_causal_lm(tokenizer, seed=2).lm_head.weight)

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tokenizer("Write a sad line about sea: dark").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded("hello world").input_ids == tokenizer("hello world").input_ids
    assert reloaded.pad_token_id == tokenizer.pad_token_id


def test_sequence_classifier_scores_each_row_once(tokenizer):
    model = build_tiny_sequence_classifier(tokenizer).eval()
    assert model.config.num_labels == 1 and model.config.hidden_size <= 64
    ids = torch.tensor([[0, 40, 41, 42], [2, 2, 0, 40]])
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=(ids != 2).long()).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def test_save_tiny_model_kinds(tmp_path):
    path = save_tiny_model(tmp_path / "rm", tasks.corpus(), kind="sequence_classifier", num_layers=1)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.num_hidden_layers == 1
    assert AutoTokenizer.from_pretrained(path).chat_template
    with pytest.raises(ValueError, match="kind must be one of"):
        save_tiny_model(tmp_path / "bad", kind="vision")


def test_tiny_module_entry_point_writes_a_loadable_model(tmp_path, capsys):
    tiny_main([str(tmp_path / "lm"), "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert model.config.hidden_size <= 64
