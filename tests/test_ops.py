"""The shared log-prob path and masked reductions, checked against direct computations."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from lit_pref.models import enable_activation_checkpointing
from lit_pref.ops import (
    completion_logps,
    hidden_logps,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
)
from lit_pref.tiny import build_tiny_causal_lm

# Prompts of 3, 1 and 5 real tokens; two completions per prompt of assorted lengths (one of a
# single token). Token id 2 is the tiny tokenizer's pad id: it appears as a *real* token too, so
# anything that masks by ``ids != pad`` would show up as a mismatch.
PROMPTS = [[0, 40, 41], [0], [0, 50, 51, 2, 52]]
COMPLETIONS = [[60, 61, 1], [62, 1], [2, 70, 71, 72, 1], [73], [80, 81, 82, 83, 84, 85, 1], [86, 87, 1]]
PAD = 2


def make_batch(prompts=PROMPTS, completions=COMPLETIONS, pad=PAD):
    width_p = max(map(len, prompts))
    width_c = max(map(len, completions))
    prompt_ids = torch.full((len(prompts), width_p), pad)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, p in enumerate(prompts):
        prompt_ids[i, width_p - len(p) :] = torch.tensor(p)
        prompt_mask[i, width_p - len(p) :] = 1
    completion_ids = torch.full((len(completions), width_c), pad)
    completion_mask = torch.zeros_like(completion_ids)
    for i, c in enumerate(completions):
        completion_ids[i, : len(c)] = torch.tensor(c)
        completion_mask[i, : len(c)] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def reference_logits(model, prompts=PROMPTS, completions=COMPLETIONS):
    """Per completion row: the full model's fp32 logits predicting each completion token, unpadded."""
    k = len(completions) // len(prompts)
    out = []
    for j, completion in enumerate(completions):
        prompt = prompts[j // k]
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0].float()
        out.append(logits[len(prompt) - 1 : -1])
    return out


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_causal_lm(tokenizer, seed=3).eval()


def test_token_logps_equal_full_model_log_softmax(model):
    batch = make_batch()
    with torch.no_grad():
        out = completion_logps(model, *batch, share_prompt=False)
        ref = reference_logits(model)
    assert out.token_logps.shape == batch[2].shape
    assert torch.equal(out.mask, batch[3].bool())
    for j, (completion, logits) in enumerate(zip(COMPLETIONS, ref, strict=True)):
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        n = len(completion)
        torch.testing.assert_close(out.token_logps[j, :n], expected, rtol=0, atol=1e-5)
        assert torch.all(out.token_logps[j, n:] == 0)
        torch.testing.assert_close(out.mean_logits[j], logits.mean(), rtol=0, atol=1e-5)
    assert out.entropy is None and out.log_sq_norm is None
    torch.testing.assert_close(out.sum, out.token_logps.sum(-1))
    assert out.count.tolist() == [len(c) for c in COMPLETIONS]


def test_share_prompt_equals_concatenated_rows_values_and_gradients(tokenizer):
    batch = make_batch()
    results = []
    for share in (True, False):
        model = build_tiny_causal_lm(tokenizer, seed=4).train()
        out = completion_logps(model, *batch, share_prompt=share)
        (out.token_logps * torch.linspace(0.5, 1.5, out.token_logps.shape[1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.token_logps.detach(), grads))
    (shared, shared_grads), (plain, plain_grads) = results
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)
    assert shared_grads.keys() == plain_grads.keys()
    # Every layer receives gradient, the prompt-only computation included.
    assert len(plain_grads) == len(list(build_tiny_causal_lm(tokenizer).parameters()))
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def layer_masks(model):
    """Collects the ``attention_mask`` each attention layer receives."""
    seen = []
    for layer in model.get_decoder().layers:
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
        )
    return seen


@pytest.mark.parametrize("autocast", [False, True])
def test_shared_prompt_pass_gives_every_layer_one_mask_in_the_attention_dtype(tokenizer, autocast):
    # SDPA converts a boolean mask to a float copy in every layer (each kept for backward): the
    # shared-prompt pass builds the float mask once instead.
    model = build_tiny_causal_lm(tokenizer, seed=4)
    seen = layer_masks(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        completion_logps(model, *make_batch(), share_prompt=True)
    layers = len(model.get_decoder().layers)
    completion_pass = seen[layers:]  # after the prompt pass, one call per layer
    assert len(completion_pass) == layers
    assert all(mask is completion_pass[0] for mask in completion_pass)
    mask = completion_pass[0]
    assert mask.dtype == (torch.bfloat16 if autocast else torch.float32)
    prompt_width, completion_width = make_batch()[0].shape[1], make_batch()[2].shape[1]
    assert mask.shape == (len(COMPLETIONS), 1, completion_width, prompt_width + completion_width)


def test_unpadded_prompts_share_one_mask_row_and_keep_the_log_probs(tokenizer):
    # No prompt padding: one [1, 1, L, P + L] mask broadcast over the rows (completion padding
    # needs none), and still the concatenated rows' log-probs.
    prompts = [[0, 40, 41], [0, 50, 51]]
    batch = make_batch(prompts, COMPLETIONS[:4])
    model = build_tiny_causal_lm(tokenizer, seed=4)
    seen = layer_masks(model)
    with torch.no_grad():
        shared = completion_logps(model, *batch, share_prompt=True).token_logps
    layers = len(model.get_decoder().layers)
    assert seen[layers].shape == (1, 1, batch[2].shape[1], batch[0].shape[1] + batch[2].shape[1])
    with torch.no_grad():
        plain = completion_logps(model, *batch, share_prompt=False).token_logps
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)


def test_sliding_window_models_keep_the_masks_transformers_builds(tokenizer):
    # A window of 2 tokens: a mask of lit_pref's own would reach the sliding layers unchanged and
    # let every completion token see the whole prompt.
    model = build_tiny_causal_lm(tokenizer, seed=5, sliding_window=2)
    assert "sliding_attention" in model.config.layer_types
    seen = layer_masks(model)
    batch = make_batch()
    with torch.no_grad():
        shared = completion_logps(model, *batch, share_prompt=True).token_logps
        plain = completion_logps(model, *batch, share_prompt=False).token_logps
        full = completion_logps(build_tiny_causal_lm(tokenizer, seed=5), *batch, share_prompt=True).token_logps
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)
    assert (shared - full).abs().max() > 1e-3  # the window changes the log-probs
    assert all(mask is None or mask.dtype == torch.bool for mask in seen)


def test_chunk_size_does_not_change_values_or_gradients(tokenizer):
    batch = make_batch()
    results = []
    for chunk_size in (1, 10_000):
        model = build_tiny_causal_lm(tokenizer, seed=5)
        out = completion_logps(model, *batch, chunk_size=chunk_size, with_entropy=True)
        out.token_logps.sum().backward()
        results.append((out, model.lm_head.weight.grad.clone()))
    (a, grad_a), (b, grad_b) = results
    torch.testing.assert_close(a.token_logps, b.token_logps, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [7, 1024])  # 7: several chunks, recomputed in backward
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("with_entropy", "entropy_grad"), [(False, False), (True, False), (True, True)])
def test_head_log_probs_and_gradients_equal_autograd_log_softmax(
    chunk_size, temperature, with_entropy, entropy_grad, monkeypatch
):
    # The head path overwrites its logits with the softmax and that with the gradient; checked
    # against autograd through log_softmax, with an upstream gradient that differs per token.
    monkeypatch.setattr("lit_pref.ops._ENTROPY_BLOCK", 2 * 300 + 1)  # entropy in blocks of 2 rows, and a remainder
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    targets = torch.randint(0, 300, (3, 9))
    mask = torch.rand(3, 9) > 0.3
    upstream = torch.randn(3, 9)

    out = hidden_logps(head, hidden, targets, mask, chunk_size=chunk_size, temperature=temperature,
                       with_entropy=with_entropy, entropy_grad=entropy_grad)  # fmt: skip
    (out.token_logps * upstream).sum().backward()
    got = out.token_logps.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    hidden.grad = head.weight.grad = head.bias.grad = None

    log_softmax = (head(hidden[mask]) / temperature).log_softmax(-1)
    logp = log_softmax.gather(-1, targets[mask][:, None]).squeeze(-1)
    (logp * upstream[mask]).sum().backward()
    expected = torch.zeros(3, 9).masked_scatter(mask, logp.detach()), hidden.grad, head.weight.grad, head.bias.grad
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if with_entropy:
        entropy = -(log_softmax.exp() * log_softmax).sum(-1).detach()
        torch.testing.assert_close(out.entropy, torch.zeros(3, 9).masked_scatter(mask, entropy), rtol=1e-5, atol=1e-6)
        assert out.entropy.requires_grad == entropy_grad


@pytest.mark.parametrize(("tokens", "chunk_size", "recomputed"), [(30, 8, 22), (24, 8, 16), (8, 8, 0), (5, 8, 0)])
def test_only_tokens_past_the_first_chunk_run_the_head_twice(tokens, chunk_size, recomputed):
    # The last chunk (a full one) keeps its logits for backward; the others are recomputed.
    head, hidden = torch.nn.Linear(8, 50), torch.randn(1, tokens, 8, requires_grad=True)
    seen = []
    head.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    out = hidden_logps(head, hidden, torch.randint(0, 50, (1, tokens)), torch.ones(1, tokens, dtype=torch.bool),
                       chunk_size=chunk_size)  # fmt: skip
    assert sum(seen) == tokens
    assert seen[-1] == min(tokens, chunk_size)  # the kept chunk is a full one
    out.token_logps.sum().backward()
    assert sum(seen) - tokens == recomputed


def test_head_log_probs_refuse_a_second_backward_instead_of_a_wrong_one():
    # Backward reuses the saved softmax's storage; a retained graph must fail loudly, not reuse it.
    head, hidden = torch.nn.Linear(8, 50), torch.randn(2, 5, 8, requires_grad=True)
    out = hidden_logps(head, hidden, torch.randint(0, 50, (2, 5)), torch.ones(2, 5, dtype=torch.bool))
    out.token_logps.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.token_logps.sum().backward()


@pytest.mark.parametrize(
    ("config_class", "transform"),
    [
        ("Gemma2Config", {"final_logit_softcapping": 0.5}),  # Gemma 2's cap is 30; 0.5 bites on random logits
        ("CohereConfig", {"logit_scale": 4.0}),
        ("GraniteConfig", {"logits_scaling": 0.25}),
    ],
)
def test_log_probs_apply_the_logit_transform_of_the_models_forward(config_class, transform):
    # lit_pref calls the decoder and the LM head itself; these architectures change the head's
    # output in their forward, and the log-probs must be the forward's.
    import transformers

    config = getattr(transformers, config_class)(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, pad_token_id=0, **transform,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=1.0)  # logits large enough to cap
    prompt, completion = [5, 6, 7], [8, 9, 10, 11]
    with torch.no_grad():
        out = completion_logps(model, torch.tensor([prompt]), torch.ones(1, 3), torch.tensor([completion]), torch.ones(1, 4))
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, 2:-1].float()
        hidden = model.get_decoder()(input_ids=torch.tensor([prompt + completion])).last_hidden_state[0, 2:-1]
        raw = model.get_output_embeddings()(hidden).float()
    targets = torch.tensor(completion)[:, None]
    expected = logits.log_softmax(-1).gather(-1, targets).squeeze(-1)
    torch.testing.assert_close(out.token_logps[0], expected, rtol=0, atol=1e-5)
    # The head's raw output gives other log-probs, so the comparison above can fail.
    assert (raw.log_softmax(-1).gather(-1, targets).squeeze(-1) - expected).abs().max() > 1e-2

    # The transform and a temperature run in place on the logits: gradients equal autograd's on the forward's logits.
    def grads(logps: Callable[[], Tensor]) -> dict[str, Tensor]:
        model.zero_grad(set_to_none=True)
        (logps() * torch.linspace(-1, 1, len(completion))).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ids = torch.tensor([prompt + completion])
    ours = grads(lambda: completion_logps(
        model, ids[:, :3], torch.ones(1, 3), ids[:, 3:], torch.ones(1, 4), temperature=0.7
    ).token_logps[0])  # fmt: skip
    theirs = grads(lambda: (model(input_ids=ids).logits[0, 2:-1].float() / 0.7).log_softmax(-1).gather(-1, targets).squeeze(-1))
    assert ours.keys() == theirs.keys() and max(float(g.abs().max()) for g in theirs.values()) > 1e-3
    for name, grad in theirs.items():  # Granite's multipliers take some gradients to ~10³: 1e-5 of each one's largest
        torch.testing.assert_close(ours[name], grad, rtol=0, atol=1e-5 * max(1.0, float(grad.abs().max())), msg=name)


def test_entropy_sq_norm_and_temperature_against_direct_computation(model):
    batch = make_batch()
    temperature = 0.7
    with torch.no_grad():
        out = completion_logps(model, *batch, temperature=temperature, with_entropy=True, with_sq_norm=True)
        ref = reference_logits(model)
    assert not out.entropy.requires_grad and not out.log_sq_norm.requires_grad
    for j, (completion, logits) in enumerate(zip(COMPLETIONS, ref, strict=True)):
        logp = (logits / temperature).log_softmax(-1)
        n = len(completion)
        expected = logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        torch.testing.assert_close(out.token_logps[j, :n], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.entropy[j, :n], -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-5)
        torch.testing.assert_close(out.log_sq_norm[j, :n], (2 * logp).exp().sum(-1).log(), rtol=0, atol=1e-5)
        assert torch.all(out.entropy[j, n:] == 0) and torch.all(out.log_sq_norm[j, n:] == 0)


def test_completion_mask_selects_the_counted_tokens(model):
    prompt_ids, prompt_mask, completion_ids, attention = make_batch()
    loss_mask = attention.clone()
    loss_mask[:, 0] = 0  # e.g. SFT not training on a first token
    loss_mask[3, 0] = 1  # the single-token row keeps its one token
    with torch.no_grad():
        full = completion_logps(model, prompt_ids, prompt_mask, completion_ids, attention)
        part = completion_logps(model, prompt_ids, prompt_mask, completion_ids, attention, loss_mask)
    assert torch.equal(part.mask, loss_mask.bool())
    torch.testing.assert_close(part.token_logps, torch.where(loss_mask.bool(), full.token_logps, 0.0))
    assert part.count.tolist() == loss_mask.sum(-1).tolist()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_padding_never_produces_nan(tiny_lm_dir, attn_implementation):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, attn_implementation=attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    # Heavy padding on both sides: a one-token prompt next to a long one, one-token completions.
    prompts = [[0], [0, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    completions = [[20], [21, 22, 23, 24, 25, 26, 1], [27, 1], [28]]
    batch = make_batch(prompts, completions)
    for share in (True, False):
        model.zero_grad()
        out = completion_logps(model, *batch, share_prompt=share)
        assert torch.isfinite(out.token_logps).all()
        assert torch.isfinite(out.mean_logits).all()
        out.token_logps.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        ref = reference_logits(model, prompts, completions)
        out = completion_logps(model, *batch)
    for j, (completion, logits) in enumerate(zip(completions, ref, strict=True)):
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        torch.testing.assert_close(out.token_logps[j, : len(completion)], expected, rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_values_and_gradients(tokenizer):
    batch = make_batch()
    results = []
    for checkpointing in (False, True):
        model = build_tiny_causal_lm(tokenizer, seed=6).train()
        if checkpointing:
            enable_activation_checkpointing(model)
            assert model.is_activation_checkpointing
        out = completion_logps(model, *batch, share_prompt=True)
        out.token_logps.sum().backward()
        results.append((out.token_logps.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_layouts_raise(model):
    prompt_ids, prompt_mask, completion_ids, attention = make_batch()
    with pytest.raises(ValueError, match="cannot be split evenly"):
        completion_logps(model, prompt_ids, prompt_mask, completion_ids[:5], attention[:5])
    with pytest.raises(ValueError, match="no completion tokens"):
        completion_logps(model, prompt_ids, prompt_mask, completion_ids, attention, torch.zeros_like(attention))


def test_masked_mean_sum_and_var():
    values = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(values, mask).item() == 13.0
    assert masked_mean(values, mask).item() == 13.0 / 4
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([1.5, 5.0]))
    torch.testing.assert_close(masked_mean(values, mask, dim=0), torch.tensor([2.5, 2.0, 6.0]))
    # An empty row averages to 0, not NaN.
    empty = masked_mean(values, torch.tensor([[0, 0, 0], [1, 0, 1]]), dim=-1)
    torch.testing.assert_close(empty, torch.tensor([0.0, 5.0]))
    real = torch.tensor([1.0, 2.0, 4.0, 6.0])
    torch.testing.assert_close(masked_var(values, mask), real.var(unbiased=True))
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), real.var(unbiased=False))


def test_masked_whiten():
    torch.manual_seed(0)
    values = torch.randn(4, 6) * 3 + 2
    mask = torch.rand(4, 6) > 0.3
    values_with_junk = torch.where(mask, values, torch.full_like(values, 1e6))
    white = masked_whiten(values_with_junk, mask)
    kept = white[mask]
    torch.testing.assert_close(kept.mean(), torch.tensor(0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(kept.var(unbiased=True), torch.tensor(1.0), rtol=0, atol=1e-4)
    assert torch.all(white[~mask] == 0)
    # Without shifting, the original mean is kept and only the scale changes.
    scaled = masked_whiten(values_with_junk, mask, shift_mean=False)[mask]
    torch.testing.assert_close(scaled.mean(), values[mask].mean(), rtol=0, atol=1e-5)
    torch.testing.assert_close(scaled - scaled.mean(), kept, rtol=0, atol=1e-5)


def test_position_ids_and_last_token_index():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    assert position_ids_from_mask(left).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids_from_mask(right)[:, :2].tolist() == [[0, 1], [0, 1]]
    assert last_token_index(left).tolist() == [4, 4]
    assert last_token_index(right).tolist() == [1, 3]
