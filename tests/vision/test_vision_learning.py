"""Item 4's claim: on the shipped visual task, DPO raises held-out preference accuracy and the
score of generated answers of a tiny VLM that starts knowing only the answer format."""

from __future__ import annotations

import random
from functools import partial

import lightning as L
import torch
from datasets import Dataset
from rl_helpers import make_trainer
from vision.vision_helpers import answer_score, preference_accuracy

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.models import load_causal_lm
from lit_pref.modules import DPO, SFT
from lit_pref.vision import task


def format_sft_rows(n: int, seed: int) -> Dataset:
    """SFT rows whose answer names a random colour: the model learns to answer ``It is <colour>.``
    but not which colour, so its answers score at chance (1/4) before DPO."""
    rng = random.Random(seed)
    rows = task.colour_sft(train=n, test=1, seed=seed)["train"]
    return rows.map(lambda row: {"completion": [{"role": "assistant", "content": [
        {"type": "text", "text": task.answer(rng.choice(tuple(task.COLOURS)))}]}]})  # fmt: skip


def test_dpo_raises_held_out_accuracy_and_answer_score(tiny_vlm_dir, processor, tmp_path):
    L.seed_everything(0)
    sft_dir = tmp_path / "sft"
    sft = SFT(
        model_name_or_path=str(tiny_vlm_dir),
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
        output_dir=str(sft_dir),
    )
    sft_data = PreferenceDataModule(
        format_sft_rows(256, seed=5), tokenizer_name_or_path=str(tiny_vlm_dir), batch_size=16, val_split=None
    )
    make_trainer(tmp_path, max_steps=40).fit(sft, sft_data)

    held_out = task.colour_preferences(train=8, test=48, seed=11)["test"]
    data = PreferenceDataModule(
        task.colour_preferences(train=256, test=48, seed=11),
        tokenizer_name_or_path=str(tiny_vlm_dir),
        target="paired",
        batch_size=16,
    )
    data.setup()
    start = load_causal_lm(str(sft_dir), "float32")
    before = preference_accuracy(start, data), answer_score(start, processor, held_out)

    L.seed_everything(0)
    # RPO's NLL on the chosen answer (rpo_alpha) keeps the answers' format while DPO's margin
    # teaches which colour: plain DPO's likelihood displacement garbles many greedy answers.
    dpo = DPO(model_name_or_path=str(sft_dir), tokenizer_name_or_path=str(tiny_vlm_dir), beta=0.1, rpo_alpha=1.0,
              optimizer=partial(torch.optim.AdamW, lr=2e-3))  # fmt: skip
    make_trainer(tmp_path, max_steps=80).fit(dpo, data)
    after = preference_accuracy(dpo.policy, data), answer_score(dpo.policy, processor, held_out)
    # Before: chance on both (the SFT answers name colours at random). After: the image decides.
    assert before[0] < 0.7 and before[1] < 0.5
    # Measured: accuracy 0.50 → 0.73, answer score 0.21 → 0.63.
    assert after[0] - before[0] >= 0.15
    assert after[1] - before[1] >= 0.25
