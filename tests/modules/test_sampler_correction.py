"""The online modules against an engine whose log-probs differ from the trainer's by a known
offset (a stand-in for vLLM, so this runs without it): the mismatch is logged, and the truncated
importance weights scale each token's policy-loss gradient."""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import pytest
import torch
from rl_helpers import held_out_prompts, length_reward, make_trainer, prompts_data

from lit_pref.engines import GenerateEngine, RolloutEngine, Samples
from lit_pref.modules import GRPO, PPO
from lit_pref.ops import completion_logps

# The engine's log-prob of each sampled token is the trainer's + 0.5 at even positions, − 1.0 at
# odd ones, so π_old / π_engine is exp(−0.5) and exp(1.0): with the cap 2, 0.607 and 2.
EVEN, ODD, CAP = 0.5, -1.0, 2.0


class PerturbedEngine(RolloutEngine):
    """The built-in engine's samples, with the trainer's own log-probs of them plus EVEN / ODD."""

    def __init__(self) -> None:
        self.inner = GenerateEngine()

    def sample(self, policy, prompt_input_ids, prompt_attention_mask, num_generations, settings, tokenizer):
        samples = self.inner.sample(
            policy, prompt_input_ids, prompt_attention_mask, num_generations, settings, tokenizer
        )
        ids, mask = samples.completion_input_ids, samples.completion_attention_mask
        with torch.no_grad():
            true = completion_logps(
                policy, prompt_input_ids.repeat_interleave(num_generations, 0),
                prompt_attention_mask.repeat_interleave(num_generations, 0), ids, mask,
                temperature=settings.temperature,
            ).token_logps  # fmt: skip
        offset = torch.where(torch.arange(ids.shape[1]) % 2 == 0, EVEN, ODD)
        return Samples(ids, mask, samples.ended, torch.where(mask.bool(), true + offset, 0.0))


def module(algorithm: str, tiny_lm_dir, cap: float | None):
    common = dict(
        model_name_or_path=str(tiny_lm_dir), rewards=length_reward, max_new_tokens=6, rollout_engine=PerturbedEngine(),
        rollout_is_cap=cap, optimizer=partial(torch.optim.SGD, lr=1e-2),
    )  # fmt: skip
    if algorithm == "grpo":
        return GRPO(num_generations=4, beta=0.0, **common)
    return PPO(num_ppo_epochs=1, vf_coef=0.0, **common)


def expected_weights(mask: torch.Tensor) -> torch.Tensor:
    even = torch.arange(mask.shape[1]) % 2 == 0
    weights = torch.where(even, math.exp(-EVEN), min(math.exp(-ODD), CAP))
    return torch.where(mask, weights, 1.0)


def token_logp_grads(module, rollout, tensors) -> torch.Tensor:
    """d loss / d log π(o_t) of one micro-batch: the gradient reaching each token's log-prob."""
    seen = []
    original = module.logps

    def recording(model, batch, **kwargs):
        out = original(model, batch, **kwargs)
        out.token_logps.retain_grad()
        seen.append(out.token_logps)
        return out

    module.logps = recording
    try:
        loss, _ = module.rollout_loss(rollout, tensors, None)
        loss.backward()
    finally:
        module.logps = original
    module.policy.zero_grad(set_to_none=True)
    return seen[-1].grad


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_mismatch_is_logged_every_step(algorithm, tiny_lm_dir, tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module(algorithm, tiny_lm_dir, cap=None), prompts_data(batch_size=4))
    metrics = trainer.callback_metrics
    # Mean |offset| lies between the two offsets (their share depends on the lengths); max is the larger.
    assert abs(EVEN) < float(metrics["train/rollout/logp_diff_mean"]) < abs(ODD)
    assert float(metrics["train/rollout/logp_diff_max"]) == pytest.approx(abs(ODD), abs=1e-4)
    assert "train/rollout/is_weight_mean" not in metrics  # no correction asked for


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_truncated_weights_scale_each_tokens_policy_gradient(algorithm, tiny_lm_dir):
    """One micro-batch's loss with the correction is Σ w_t ℓ_t: its gradient with respect to each
    token's log-prob is the uncorrected one times w_t, with w_t = min(π_old / π_engine, cap)."""
    torch.manual_seed(0)
    corrected = module(algorithm, tiny_lm_dir, cap=CAP)
    corrected.configure_model()
    batch = {key: value[:4] for key, value in held_out_prompts(corrected.tokenizer).items()}
    rollout = corrected.sample(batch)
    tensors = corrected.prepare(rollout)
    assert tensors.sampler_weights is not None
    assert torch.allclose(tensors.sampler_weights, expected_weights(rollout.mask), atol=1e-4)

    grads = {
        name: token_logp_grads(corrected, rollout, dataclasses.replace(tensors, sampler_weights=weights))
        for name, weights in (("corrected", tensors.sampler_weights), ("plain", None))
    }
    mask = rollout.mask
    assert grads["plain"][mask].abs().sum() > 0
    assert torch.allclose(grads["corrected"][mask], (grads["plain"] * tensors.sampler_weights)[mask], atol=1e-6)
    assert not torch.allclose(grads["corrected"][mask], grads["plain"][mask], atol=1e-4)


def test_a_cap_without_engine_log_probs_is_an_error(tiny_lm_dir, tmp_path):
    grpo = GRPO(model_name_or_path=str(tiny_lm_dir), rewards=length_reward, num_generations=2, max_new_tokens=4,
                beta=0.0, rollout_is_cap=CAP)  # fmt: skip
    with pytest.raises(ValueError, match="returns none"):
        make_trainer(tmp_path, max_steps=1).fit(grpo, prompts_data(batch_size=2))


def test_the_vllm_engine_is_named_in_the_main_venv_and_needs_vllm_only_to_sample(tiny_lm_dir, tmp_path):
    """lit_pref imports and configures the vLLM engine without vLLM; the first rollout says what to install."""
    import importlib.util

    from lit_pref.engines import VLLMEngine

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests_vllm/ covers the engine")
    grpo = GRPO(model_name_or_path=str(tiny_lm_dir), rewards=length_reward, num_generations=2, max_new_tokens=4,
                rollout_engine="vllm")  # fmt: skip
    assert isinstance(grpo.rollout_engine, VLLMEngine)
    with pytest.raises(ImportError, match="pip install vllm"):
        make_trainer(tmp_path, max_steps=1).fit(grpo, prompts_data(batch_size=2))


def test_modules_without_the_correction_refuse_a_cap(tiny_lm_dir):
    from lit_pref.modules import OnlineDPO

    with pytest.raises(ValueError, match="drop rollout_is_cap"):
        OnlineDPO(model_name_or_path=str(tiny_lm_dir), rewards=length_reward, rollout_is_cap=CAP)
