"""Scoring a VLM on the visual task: preference accuracy and greedy answers on held-out rows."""

from __future__ import annotations

import torch

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.ops import batch_logps
from lit_pref.vision import task


def preference_accuracy(model, data: PreferenceDataModule, split: str = "val") -> float:
    """Fraction of ``split``'s pairs whose chosen answer the model itself finds more likely."""
    wins = total = 0
    with torch.no_grad():
        for batch in data.sequential_dataloader(split):
            chosen, rejected = batch_logps(model.eval(), batch).pairs()
            wins += int((chosen.sum > rejected.sum).sum())
            total += chosen.sum.numel()
    return wins / total


def answer_score(model, processor, rows) -> float:
    """Mean ground-truth score (:func:`lit_pref.vision.task.score`) of the model's greedy answers."""
    scores = []
    with torch.no_grad():
        for row in rows:
            text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            encoded = processor(
                text=[text], images=row["images"], return_tensors="pt", add_special_tokens=False
            )
            out = model.eval().generate(
                **encoded, max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
            )
            answer = processor.tokenizer.decode(
                out[0, encoded.input_ids.shape[1] :], skip_special_tokens=True
            )
            scores.append(task.score(answer, row["colour"]))
    return sum(scores) / len(scores)
