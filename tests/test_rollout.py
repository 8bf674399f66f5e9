"""Rollouts: sampling layout, EOS cutting, scoring consistency with generate, chunking."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_pref.engines import GenerateEngine, GenerationSettings
from lit_pref.engines.base import cut_after_eos, eos_token_ids, pad_right
from lit_pref.modules.online import completion_stats, minibatch_indices
from lit_pref.ops import completion_logps
from lit_pref.rollout import CompletionTensors, Rollout, generate_rollout, score_in_chunks

PROMPTS = [
    "Write a happy line about rain:",
    "Write a sad line about the sea, please:",
    "Write a sad line about home:",
]


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir)


def prompt_batch(tokenizer, prompts=PROMPTS, **columns):
    """A prompt-only batch as the data module collates it (left-padded)."""
    encoded = [tokenizer(p).input_ids for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return {"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt": list(prompts), **columns}


def test_cut_after_eos_keeps_first_eos_and_pads():
    eos, pad = 1, 9
    tokens = torch.tensor([[5, 1, 6, 1], [5, 6, 7, 8], [1, 4, 4, 4]])
    ids, mask, ended = cut_after_eos(tokens, [eos], pad)
    assert ids.tolist() == [[5, 1, 9, 9], [5, 6, 7, 8], [1, 9, 9, 9]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]
    # Trailing columns that are padding everywhere are dropped.
    ids, mask, _ = cut_after_eos(torch.tensor([[5, 1, 6], [1, 2, 3]]), [eos], pad)
    assert ids.tolist() == [[5, 1], [1, 9]] and mask.tolist() == [[1, 1], [1, 0]]
    # Several EOS ids (e.g. Llama 3's end-of-turn and end-of-text).
    _, mask, ended = cut_after_eos(torch.tensor([[5, 7, 6], [5, 6, 1]]), [1, 7], pad)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]] and ended.tolist() == [True, True]


def test_pad_right():
    out = pad_right([torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5]])], value=0)
    assert out.tolist() == [[1, 2, 0], [3, 4, 5]]


def test_generation_settings_validated():
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    config = GenerationSettings(8, temperature=0.7, top_p=0.9).generation_config([1], 2, 3)
    assert config.do_sample and config.top_k == 0 and config.repetition_penalty == 1.0
    assert config.num_return_sequences == 3 and config.max_new_tokens == 8


def test_rollout_layout_and_logps_match_generate(lm, tokenizer):
    """Completions of a prompt are adjacent, cut after EOS, right-padded; the shared log-prob path
    scores them exactly as the sampler's (temperature-scaled) distribution did."""
    batch = prompt_batch(tokenizer, mood=["happy", "sad", "sad"])
    settings = GenerationSettings(max_new_tokens=6, temperature=0.7)
    torch.manual_seed(0)
    rollout = generate_rollout(GenerateEngine(2), lm, batch, settings, tokenizer, num_generations=2)
    assert rollout.num_prompts == 3 and rollout.num_completions == 6
    assert rollout.completion_input_ids.shape == rollout.completion_attention_mask.shape
    assert rollout.completion_input_ids.shape[1] <= 6
    assert rollout.columns == {"mood": ["happy", "sad", "sad"]}
    assert rollout.completion_prompts() == [p for p in PROMPTS for _ in range(2)]
    assert rollout.completion_columns()["mood"] == ["happy", "happy", "sad", "sad", "sad", "sad"]
    mask = rollout.completion_attention_mask
    # Right padding: the mask is a prefix of ones on every row, and ended rows end with EOS.
    assert torch.equal(mask, mask.cummin(-1).values)
    eos = tokenizer.eos_token_id
    for row, n, ended in zip(rollout.completion_input_ids, mask.sum(-1), rollout.ended, strict=True):
        assert (row[: n - 1] != eos).all()
        assert bool(row[n - 1] == eos) == bool(ended)
        assert (row[n:] == tokenizer.pad_token_id).all()
    assert len(rollout.completions) == 6 and all(isinstance(c, str) for c in rollout.completions)

    # The same draws through generate(output_scores) give the same tokens and log-probs.
    torch.manual_seed(0)
    config = settings.generation_config(eos_token_ids(lm, tokenizer), tokenizer.pad_token_id, 2)
    config.output_scores, config.return_dict_in_generate = True, True
    logps_ref, tokens_ref = [], []
    for start in range(0, 3, 1):  # rollout_batch_size=2 → one prompt per generate call
        ids = batch["prompt_input_ids"][start : start + 1]
        am = batch["prompt_attention_mask"][start : start + 1]
        first = int(am[0].argmax())
        out = lm.generate(input_ids=ids[:, first:], attention_mask=am[:, first:], generation_config=config)
        generated = out.sequences[:, ids.shape[1] - first :]
        scores = torch.stack([s.log_softmax(-1) for s in out.scores], 1)
        logps_ref.append(pad_right([scores.gather(-1, generated[..., None]).squeeze(-1)], 0))
        tokens_ref.append(generated)
    ours = completion_logps(
        lm,
        rollout.prompt_input_ids,
        rollout.prompt_attention_mask,
        rollout.completion_input_ids,
        rollout.completion_attention_mask,
        temperature=0.7,
    )
    row = 0
    for tokens, logps in zip(tokens_ref, logps_ref, strict=True):
        for t, lp in zip(tokens, logps, strict=True):
            n = int(mask[row].sum())
            assert torch.equal(t[:n], rollout.completion_input_ids[row, :n])
            torch.testing.assert_close(ours.token_logps[row, :n], lp[:n], atol=1e-4, rtol=0)
            row += 1


def test_generation_restores_training_mode(lm, tokenizer):
    lm.train()
    generate_rollout(GenerateEngine(), lm, prompt_batch(tokenizer), GenerationSettings(3), tokenizer)
    assert lm.training
    lm.eval()


def _toy_rollout(k=2):
    ids = torch.arange(12).view(6, 2)
    return Rollout(
        prompt_input_ids=torch.arange(3)[:, None].repeat(1, 2),
        prompt_attention_mask=torch.ones(3, 2, dtype=torch.long),
        completion_input_ids=ids,
        completion_attention_mask=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 0], [1, 0]]),
        ended=torch.tensor([True, False, True, True, False, True]),
        num_generations=k,
        prompts=["a", "b", "c"],
        completions=["a0", "a1", "b0", "b1", "c0", "c1"],
        columns={"x": [10, 11, 12]},
    )


@dataclass
class ToyTensors(CompletionTensors):
    v: torch.Tensor
    absent: torch.Tensor | None = None


def test_select_keeps_groups_together():
    rollout = _toy_rollout()
    rows = torch.tensor([2, 0])
    sub = rollout.select(rows)
    assert sub.prompts == ["c", "a"] and sub.completions == ["c0", "c1", "a0", "a1"]
    assert sub.columns == {"x": [12, 10]}
    tensors = ToyTensors(torch.arange(6.0)).select(rollout.completion_rows(rows))
    assert tensors.v.tolist() == [4.0, 5.0, 0.0, 1.0] and tensors.absent is None
    assert sub.completion_input_ids[:, 0].tolist() == [8, 10, 0, 2]
    assert sub.ended.tolist() == [False, True, True, False]


def test_chunks_and_score_in_chunks():
    rollout = _toy_rollout()
    assert [c.num_completions for c in rollout.chunks(4)] == [4, 2]
    assert [c.num_completions for c in rollout.chunks(1)] == [2, 2, 2]  # at least one whole group
    sizes = []

    def twice(chunk):
        sizes.append(chunk.num_completions)
        return ToyTensors(chunk.completion_input_ids[:, 0].float() * 2)

    out = score_in_chunks(rollout, 3, twice)
    assert sizes == [2, 2, 2]  # 3 rows hold one whole group of 2
    assert out.v.tolist() == [0.0, 4.0, 8.0, 12.0, 16.0, 20.0] and out.absent is None


def test_sequences_put_real_tokens_first():
    rollout = Rollout(
        prompt_input_ids=torch.tensor([[0, 5, 6], [7, 8, 9]]),
        prompt_attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        completion_input_ids=torch.tensor([[1, 0], [2, 3]]),
        completion_attention_mask=torch.tensor([[1, 0], [1, 1]]),
        ended=torch.tensor([True, True]),
        num_generations=1,
        prompts=["p", "q"],
        completions=["x", "y"],
    )
    ids, mask = rollout.sequences(pad_token_id=0)
    assert ids.tolist() == [[5, 6, 1, 0, 0], [7, 8, 9, 2, 3]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_completion_stats():
    stats = completion_stats(_toy_rollout())
    assert stats["completions/mean_length"].mean().item() == pytest.approx(9 / 6)
    assert stats["completions/min_length"].item() == 1 and stats["completions/max_length"].item() == 2
    assert stats["completions/eos_fraction"].mean().item() == pytest.approx(4 / 6)


def test_minibatch_indices_cover_every_prompt_once():
    plan = minibatch_indices(
        10, num_mini_batches=3, accumulation_steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert len(plan) == 3 and all(1 <= len(micros) <= 2 for micros in plan)
    rows = torch.cat([m for micros in plan for m in micros])
    assert sorted(rows.tolist()) == list(range(10))
    # More splits than prompts: empty micro-batches are dropped, never yielded.
    plan = minibatch_indices(2, num_mini_batches=4, accumulation_steps=1)
    assert len(plan) == 2 and all(m.numel() for micros in plan for m in micros)
