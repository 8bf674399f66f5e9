"""The built-in engine's decode loop against ``transformers``' ``generate``: the same tokens (greedy,
and sampled with the same seed), left padding, several EOS ids, chunks; and the sampled
distribution against the softmax it should draw from."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from lit_pref.engines import GenerateEngine, GenerationSettings
from lit_pref.engines.base import cut_after_eos, eos_token_ids
from lit_pref.engines.generate import decode, logits_warpers

PROMPTS = ["Write a happy line about rain:", "Write a sad line about the sea, please:", "Rain:"]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def lm(tiny_lm_dir, request):
    # Both take the decode loop's own 4-D step mask (eager adds it to its scores, SDPA passes it on).
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, attn_implementation=request.param).eval()


def left_padded(tokenizer, prompts=PROMPTS):
    encoded = [tokenizer(p).input_ids for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return ids, mask


def hf_generate(lm, ids, mask, settings, eos_ids, pad_id, k, greedy=False):
    """``generate``'s completions for the same prompts, cut after EOS like the engine's."""
    if greedy:  # generate returns one greedy sequence per input row
        ids, mask, k = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), 1
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=None if greedy else settings.top_k or 0,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        num_return_sequences=k,
    )
    out = lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return cut_after_eos(out[:, ids.shape[1] :], eos_ids, pad_id)


def frequent_tokens(lm, tokenizer, ids, mask, settings, n=1):
    """The ``n`` tokens the model picks most often after these prompts: made extra EOS ids, they
    end completions at varied lengths (the tiny random model rarely picks its real EOS)."""
    torch.manual_seed(0)
    tokens = decode(lm, ids, mask, settings, [tokenizer.eos_token_id], tokenizer.pad_token_id, 4)
    return torch.bincount(tokens[:, 1:].flatten()).topk(n).indices.tolist()


@pytest.mark.parametrize("share_prompt", [True, False])
def test_greedy_equals_generate_greedy(lm, tokenizer, share_prompt):
    ids, mask = left_padded(tokenizer)
    settings = GenerationSettings(max_new_tokens=12, top_k=1)
    eos = [tokenizer.eos_token_id, *frequent_tokens(lm, tokenizer, ids, mask, settings)]
    lm.generation_config.eos_token_id = eos
    try:
        assert eos_token_ids(lm, tokenizer) == eos
        # Two completions per prompt, one prompt per chunk: chunks of a left-padded batch too.
        samples = GenerateEngine(completions_per_call=2, share_prompt=share_prompt).sample(
            lm, ids, mask, 2, settings, tokenizer
        )
    finally:
        lm.generation_config.eos_token_id = tokenizer.eos_token_id
    expected = hf_generate(lm, ids, mask, settings, eos, tokenizer.pad_token_id, 2, greedy=True)
    assert torch.equal(samples.completion_input_ids, expected[0])
    assert torch.equal(samples.completion_attention_mask, expected[1])
    assert torch.equal(samples.ended, expected[2])
    lengths = samples.completion_attention_mask.sum(-1)
    assert samples.ended.any() and (lengths < 12).any() and (lengths > 1).any()  # EOS cut at varied lengths


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "share_prompt", "extra_eos"),
    [(1.0, None, 1.0, True, 24), (0.7, None, 0.9, True, 6), (1.3, 20, 1.0, False, 6), (0.8, 8, 0.8, True, 2)],
)
def test_sampling_equals_generate_with_the_same_seed(
    lm, tokenizer, temperature, top_k, top_p, share_prompt, extra_eos
):
    """The same warpers and the same draw on the global generator: ``generate``'s tokens exactly."""
    ids, mask = left_padded(tokenizer)
    settings = GenerationSettings(max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k)
    eos = [tokenizer.eos_token_id, *frequent_tokens(lm, tokenizer, ids, mask, settings, extra_eos)]
    torch.manual_seed(1)
    tokens = decode(lm, ids, mask, settings, eos, tokenizer.pad_token_id, 3, share_prompt)
    after_engine = torch.random.get_rng_state()
    ours = cut_after_eos(tokens, eos, tokenizer.pad_token_id)
    torch.manual_seed(1)
    expected = hf_generate(lm, ids, mask, settings, eos, tokenizer.pad_token_id, 3)
    for a, b in zip(ours, expected, strict=True):
        assert torch.equal(a, b)
    # The same number of draws too: sampling continues identically afterwards (resume contract).
    assert torch.equal(after_engine, torch.random.get_rng_state())
    assert ours[2].any() and not ours[2].all()


def test_first_token_frequencies_follow_the_warped_softmax(lm, tokenizer):
    """4,000 one-token completions of one prompt (a low temperature: the tiny random model's top
    logits lie within 0.1 of each other): each token's frequency is within 4.5 standard
    errors of its probability under softmax(logits / T) restricted to the top k, and nothing
    outside the top k is drawn. The same counts are far from the untempered softmax, so the bound
    can fail."""
    ids, mask = left_padded(tokenizer, PROMPTS[:1])
    n, temperature, top_k = 4000, 0.05, 6
    settings = GenerationSettings(max_new_tokens=1, temperature=temperature, top_k=top_k)
    torch.manual_seed(0)
    first = decode(lm, ids, mask, settings, [tokenizer.eos_token_id], tokenizer.pad_token_id, n)[:, 0]
    counts = torch.bincount(first, minlength=lm.config.vocab_size).double()
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits[0, -1].double()

    def within_bound(probs):
        tolerance = 4.5 * (probs * (1 - probs) / n).sqrt() + 1 / n
        return bool(((counts / n - probs).abs() <= tolerance).all())

    top = logits.topk(top_k).indices
    warped = torch.full_like(logits, -math.inf)
    warped[top] = logits[top] / temperature
    expected = warped.softmax(-1)
    assert counts[expected == 0].sum() == 0
    assert within_bound(expected)
    assert not within_bound((logits / temperature).softmax(-1))  # top-k ignored
    untempered = torch.full_like(logits, -math.inf)
    untempered[top] = logits[top]
    assert not within_bound(untempered.softmax(-1))  # temperature ignored


def test_warpers_follow_generate_order():
    warpers = logits_warpers(GenerationSettings(temperature=0.5, top_k=3, top_p=0.9))
    assert [type(w).__name__ for w in warpers] == [
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]
    assert len(logits_warpers(GenerationSettings())) == 0


def test_rows_after_eos_are_padding_and_decoding_stops(lm, tokenizer):
    """Once every row has ended, no more steps are decoded."""
    ids, mask = left_padded(tokenizer)
    every_token = list(range(lm.config.vocab_size))
    tokens = decode(lm, ids, mask, GenerationSettings(8), every_token, tokenizer.pad_token_id, 2)
    assert tokens.shape == (6, 1)
