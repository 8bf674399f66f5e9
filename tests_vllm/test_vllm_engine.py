"""The vLLM engine against the built-in one: same greedy tokens, same log-probs, real weight sync."""

from __future__ import annotations

from functools import partial

import torch
from rl_helpers import held_out_prompts, length_reward, make_trainer, prompts_data

from lit_pref.engines import GenerateEngine, GenerationSettings
from lit_pref.engines.vllm import VLLMEngine, policy_weights
from lit_pref.models import apply_lora, load_causal_lm, load_tokenizer
from lit_pref.modules import GRPO
from lit_pref.ops import completion_logps

# top_k = 1 makes sampling greedy in both engines (GenerationSettings samples, temperature > 0).
GREEDY = GenerationSettings(max_new_tokens=12, top_k=1)


def greedy(engine, policy, tokenizer, prompts):
    return engine.sample(policy, prompts["prompt_input_ids"], prompts["prompt_attention_mask"], 1, GREEDY, tokenizer)


def test_greedy_generation_equals_the_built_in_engine(engine, vllm_lm_dir):
    tokenizer = load_tokenizer(str(vllm_lm_dir))
    policy = load_causal_lm(str(vllm_lm_dir)).eval()
    prompts = held_out_prompts(tokenizer)
    ours, theirs = greedy(engine, policy, tokenizer, prompts), greedy(GenerateEngine(), policy, tokenizer, prompts)
    assert torch.equal(ours.completion_attention_mask, theirs.completion_attention_mask)
    assert torch.equal(ours.completion_input_ids, theirs.completion_input_ids)
    assert torch.equal(ours.ended, theirs.ended)
    timings = engine.metrics()
    assert {"startup_s", "sync_s", "generate_s"} <= timings.keys() and all(v > 0 for v in timings.values())


def test_sampled_log_probs_are_the_trainers(engine, vllm_lm_dir):
    """At temperature 0.7 the engine's log-probs of its samples are the trainer's (fp32: ~1e-5 apart)."""
    tokenizer = load_tokenizer(str(vllm_lm_dir))
    policy = load_causal_lm(str(vllm_lm_dir)).eval()
    prompts = held_out_prompts(tokenizer)
    samples = engine.sample(
        policy, prompts["prompt_input_ids"], prompts["prompt_attention_mask"], 2,
        GenerationSettings(max_new_tokens=12, temperature=0.7), tokenizer,
    )  # fmt: skip
    assert samples.token_logps is not None
    trainer = completion_logps(
        policy,
        prompts["prompt_input_ids"].repeat_interleave(2, 0),
        prompts["prompt_attention_mask"].repeat_interleave(2, 0),
        samples.completion_input_ids,
        samples.completion_attention_mask,
        temperature=0.7,
    ).token_logps
    mask = samples.completion_attention_mask.bool()
    diff = (trainer - samples.token_logps)[mask].abs()
    print(f"|log π_trainer − log π_vllm|: mean {diff.mean():.2e}, max {diff.max():.2e} over {mask.sum()} tokens")
    assert diff.max() < 1e-3
    assert (samples.token_logps[mask] < 0).all() and (samples.token_logps[~mask] == 0).all()


def test_training_step_syncs_the_weights(engine, vllm_lm_dir, tmp_path):
    """After optimizer steps the engine samples the trained weights again, token for token; left
    unsynced, the same engine samples something else (so the sync is real)."""
    module = GRPO(
        model_name_or_path=str(vllm_lm_dir), rewards=length_reward, num_generations=4, max_new_tokens=8, beta=0.0,
        rollout_engine=engine, optimizer=partial(torch.optim.AdamW, lr=2e-2),
    )  # fmt: skip
    make_trainer(tmp_path, max_steps=2).fit(module, prompts_data(batch_size=4))
    assert engine.steps_since_sync == 1  # synced before the second rollout, stepped once since
    policy, tokenizer = module.policy.eval(), module.tokenizer
    prompts = held_out_prompts(tokenizer)
    built_in = greedy(GenerateEngine(), policy, tokenizer, prompts)
    engine.sync_every = None  # no sync: the engine still holds the weights of before the last step
    stale = greedy(engine, policy, tokenizer, prompts)
    engine.sync_every = 1
    synced = greedy(engine, policy, tokenizer, prompts)
    assert not torch.equal(stale.completion_input_ids, built_in.completion_input_ids)
    assert torch.equal(synced.completion_input_ids, built_in.completion_input_ids)
    assert torch.equal(synced.completion_attention_mask, built_in.completion_attention_mask)


def test_lora_weights_are_merged_into_the_copy(vllm_lm_dir):
    """policy_weights gives W + ΔW under the plain checkpoint names and leaves the policy untouched."""
    base = load_causal_lm(str(vllm_lm_dir))
    names = {name for name, _ in base.named_parameters()}
    lora = apply_lora(base, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # a nonzero adapter
    before = {name: param.clone() for name, param in lora.named_parameters()}
    weights = dict(policy_weights(lora))
    assert weights.keys() == names
    merged = load_causal_lm(str(vllm_lm_dir))
    merged.load_state_dict(weights)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    assert torch.allclose(merged(ids).logits, lora(ids).logits, atol=1e-5)
    assert not torch.allclose(merged(ids).logits, load_causal_lm(str(vllm_lm_dir))(ids).logits, atol=1e-3)
    assert all(torch.equal(before[name], param) for name, param in lora.named_parameters())


def test_settings_are_validated():
    for bad in ({"gpu_memory_utilization": 0}, {"max_model_len": 0}, {"tensor_parallel_size": 0}, {"sync_every": 0}):
        try:
            VLLMEngine(**bad)
        except ValueError as error:
            assert next(iter(bad)) in str(error)
        else:
            raise AssertionError(f"{bad} was accepted")
