"""Held-out checks of a policy on the shipped task: preference accuracy and ground-truth score."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from lit_pref.data.collate import pad
from lit_pref.data.tokenize import encode_completion, encode_prompt
from lit_pref.ops import completion_logps
from lit_pref.types import CausalLM


@torch.no_grad()
def preference_accuracy(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], batch_size: int = 32
) -> float:
    """Fraction of (prompt, chosen, rejected) rows where the model gives chosen the higher log-likelihood."""
    model.eval()
    wins = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [encode_prompt(tokenizer, r["prompt"]) for r in chunk]
        completions = [
            encode_completion(tokenizer, r["prompt"], r[side], p, i)
            for i, (r, p) in enumerate(zip(chunk, prompts, strict=True))
            for side in ("chosen", "rejected")
        ]
        logps = completion_logps(
            model,
            pad(prompts, tokenizer.pad_token_id, left=True),
            pad([[1] * len(p) for p in prompts], 0, left=True),
            pad(completions, tokenizer.pad_token_id),
            pad([[1] * len(c) for c in completions], 0),
        )
        chosen, rejected = logps.pairs()
        wins += int((chosen.sum > rejected.sum).sum())
    return wins / len(rows)


@torch.no_grad()
def generate(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 12,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """Sampled completions (text, special tokens removed) for ``prompts``."""
    model.eval()
    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        input_ids = pad(ids, tokenizer.pad_token_id, left=True)
        attention_mask = pad([[1] * len(i) for i in ids], 0, left=True)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
    return out


def mean_score(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    score: Callable[[str, str], float],
    samples_per_prompt: int = 2,
) -> float:
    """Mean ground-truth score of sampled completions over ``prompts``."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    completions = generate(model, tokenizer, repeated)
    return sum(score(p, c) for p, c in zip(repeated, completions, strict=True)) / len(repeated)
