"""lit_pref's reward-model and GRPO losses and group advantages against TRL 1.16's trainers.

* Bradley–Terry loss with margin and centring: ``RewardTrainer.compute_loss`` (trainer built with
  ``object.__new__``) on a stand-in model that returns given float64 rewards.
* GRPO's clipped objective and its aggregations: ``GRPOTrainer._compute_loss`` (``object.__new__``)
  with its per-token log-prob helper replaced by given float64 values, against
  :func:`lit_pref.losses.grpo.grpo_policy_loss`.
* Advantages: real ``GRPOTrainer`` / ``RLOOTrainer`` objects on the tiny model generate and score a
  batch through ``_generate_and_score_completions`` with a reward function returning fixed values;
  TRL holds rewards in float32, so lit_pref's advantages are computed on the same float32 rewards.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from datasets import Dataset
from parity.trl_fakes import ATOL, DTYPE, accelerator, metrics_store
from trl import GRPOConfig, GRPOTrainer, RewardTrainer, RLOOConfig, RLOOTrainer

from lit_pref.losses.grpo import group_advantages, grpo_policy_loss, rloo_advantages
from lit_pref.losses.reward import reward_loss

# ----------------------------------------------------------------------------- reward model


class RewardHead(torch.nn.Module):
    """A one-output sequence classifier whose outputs for its one batch are given."""

    def __init__(self, rewards: torch.Tensor) -> None:
        super().__init__()
        self.rewards = rewards

    def forward(self, input_ids: torch.Tensor, **_: Any) -> types.SimpleNamespace:
        assert input_ids.shape[0] == self.rewards.shape[0]
        return types.SimpleNamespace(logits=self.rewards.unsqueeze(-1))


@pytest.mark.parametrize("with_margin", [False, True], ids=["no-margin", "margin"])
@pytest.mark.parametrize("coefficient", [None, 0.01, 0.5])
def test_reward_loss_equals_trl(with_margin, coefficient):
    """Ouyang et al. 2022 eq. 1, Touvron et al. 2023 eq. 2 (margin), Eisenstein et al. 2023 (centring)."""
    g = torch.Generator().manual_seed(0)
    b = 6
    rewards = (2.0 * torch.randn(2 * b, generator=g, dtype=DTYPE)).requires_grad_()
    margin = torch.rand(b, generator=g, dtype=DTYPE) if with_margin else None
    inputs: dict[str, Any] = {
        "input_ids": torch.ones(2 * b, 3, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, 3, dtype=torch.long),
    }
    if margin is not None:
        inputs["margin"] = margin
    trainer = object.__new__(RewardTrainer)
    model = RewardHead(rewards)
    trainer.__dict__.update(
        model=model, accelerator=accelerator(), args=types.SimpleNamespace(center_rewards_coefficient=coefficient),
        _metrics=metrics_store(), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trl_loss = trainer.compute_loss(model, inputs)
    out = reward_loss(rewards[:b], rewards[b:], margin, coefficient)
    lit_loss = out.losses.mean()
    torch.testing.assert_close(lit_loss, trl_loss, atol=ATOL, rtol=0)
    (lit_grad,) = torch.autograd.grad(lit_loss, rewards)
    (trl_grad,) = torch.autograd.grad(trl_loss, rewards)
    torch.testing.assert_close(lit_grad, trl_grad, atol=ATOL, rtol=0)
    logged = trainer._metrics["train"]
    torch.testing.assert_close(float(out.accuracies.mean()), logged["accuracy"][-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(float(out.margins.mean()), logged["margin"][-1], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------ GRPO loss

COMPLETION_LENGTHS = (5, 2, 7, 3, 6, 1, 4, 7)
WIDTH = 7


def grpo_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(COMPLETION_LENGTHS)
    mask = torch.tensor([[1] * n + [0] * (WIDTH - n) for n in COMPLETION_LENGTHS])
    logps = (-3.0 * torch.rand(b, WIDTH, generator=g, dtype=DTYPE)).requires_grad_()
    # π_old and π_ref tenths of a nat away, so ratios leave [1 − ε, 1 + ε] in both directions.
    old = logps.detach() + 0.5 * torch.randn(b, WIDTH, generator=g, dtype=DTYPE)
    ref = logps.detach() + 0.3 * torch.randn(b, WIDTH, generator=g, dtype=DTYPE)
    return {
        "logps": logps,
        "old": old,
        "ref": ref,
        "advantages": torch.randn(b, generator=g, dtype=DTYPE),
        "mask": mask,
    }


def trl_grpo_loss(data: dict[str, torch.Tensor], *, with_old: bool, **config: Any):
    b = data["mask"].shape[0]
    inputs: dict[str, Any] = {
        "prompt_ids": torch.ones(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.ones(b, WIDTH, dtype=torch.long),
        "completion_mask": data["mask"],
        "advantages": data["advantages"],
        "ref_per_token_logps": data["ref"],
        "num_items_in_batch": torch.tensor(float(config.get("num_items_in_batch", data["mask"].sum()))),
    }
    if with_old:
        inputs["old_per_token_logps"] = data["old"]
    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (data["logps"], torch.zeros_like(data["logps"]), None),
        model=torch.nn.Module(), accelerator=accelerator(), _metrics=metrics_store(),
        args=types.SimpleNamespace(
            use_bias_correction_kl=config.get("use_bias_correction_kl", False), delta=None, steps_per_generation=1
        ),
        loss_type=config["loss_type"], beta=config["beta"], epsilon_low=config["epsilon_low"],
        epsilon_high=config["epsilon_high"], max_completion_length=WIDTH, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
    )  # fmt: skip
    loss = trainer._compute_loss(trainer.model, inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def lit_grpo_loss(data: dict[str, torch.Tensor], *, with_old: bool, **config: Any):
    return grpo_policy_loss(
        data["logps"], data["old"] if with_old else None, data["ref"] if config["beta"] else None,
        data["advantages"], data["mask"], loss_type=config["loss_type"], epsilon_low=config["epsilon_low"],
        epsilon_high=config["epsilon_high"], beta=config["beta"], max_completion_length=WIDTH,
        num_items_in_batch=config.get("num_items_in_batch"),
    )  # fmt: skip


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [False, True], ids=["on-policy", "old-logps"])
@pytest.mark.parametrize(
    ("epsilon_low", "epsilon_high"), [(0.2, 0.2), (0.2, 0.28)], ids=["eps", "clip-higher"]
)
def test_grpo_loss_equals_trl(loss_type, beta, with_old, epsilon_low, epsilon_high):
    """Shao et al. 2024 eq. 3 with k3 (eq. 4), DAPO's clip-higher and token-level sum, Dr. GRPO's
    constant normaliser. TRL corrects the KL by the importance ratio by default
    (``use_bias_correction_kl``); lit_pref does not, so the match is with that option off (below: on)."""
    data = grpo_inputs()
    config = {"loss_type": loss_type, "beta": beta, "epsilon_low": epsilon_low, "epsilon_high": epsilon_high}
    if loss_type == "dapo":  # the token count of a global batch twice this micro-batch
        config["num_items_in_batch"] = 2 * int(data["mask"].sum())
    out = lit_grpo_loss(data, with_old=with_old, **config)
    trl_loss, trl_metrics = trl_grpo_loss(data, with_old=with_old, **config)
    torch.testing.assert_close(out.loss, trl_loss, atol=ATOL, rtol=0)
    (lit_grad,) = torch.autograd.grad(out.loss, data["logps"])
    (trl_grad,) = torch.autograd.grad(trl_loss, data["logps"])
    torch.testing.assert_close(lit_grad, trl_grad, atol=ATOL, rtol=0)
    for ours, theirs in [
        ("clip_frac_low", "low_mean"),
        ("clip_frac_high", "high_mean"),
        ("clip_frac_region", "region_mean"),
    ]:
        torch.testing.assert_close(
            float(getattr(out, ours)), trl_metrics[f"clip_ratio/{theirs}"], atol=ATOL, rtol=0
        )
    if beta:
        torch.testing.assert_close(float(out.kl_mean), trl_metrics["kl"], atol=ATOL, rtol=0)
    if with_old:
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0


def test_trl_kl_bias_correction_differs_only_off_policy():
    """TRL's default use_bias_correction_kl multiplies the k3 estimate by π/π_old: the same as
    lit_pref's on-policy (ratio 1), different once π_old ≠ π."""
    data = grpo_inputs()
    config = {"loss_type": "grpo", "beta": 0.04, "epsilon_low": 0.2, "epsilon_high": 0.2}
    on_policy = lit_grpo_loss(data, with_old=False, **config).loss
    trl_on, _ = trl_grpo_loss(data, with_old=False, use_bias_correction_kl=True, **config)
    torch.testing.assert_close(on_policy, trl_on, atol=ATOL, rtol=0)
    off_policy = lit_grpo_loss(data, with_old=True, **config).loss
    trl_off, _ = trl_grpo_loss(data, with_old=True, use_bias_correction_kl=True, **config)
    assert abs(float(off_policy.detach() - trl_off.detach())) > 1e-4


# ------------------------------------------------------------------------------ advantages

# Three prompts × four generations; the second group has zero spread (advantages exactly 0).
REWARDS = (0.3, -1.2, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0, -0.7, 0.1, 0.9, 4.0)
GENERATIONS = 4


def reward_fn(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    assert len(completions) == len(REWARDS)
    return list(REWARDS)


def generated_advantages(
    trainer_cls: type, config_cls: type, tiny_lm_dir, tmp_path, **config: Any
) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = config_cls(
        output_dir=str(tmp_path), per_device_train_batch_size=len(REWARDS), num_generations=GENERATIONS,
        max_completion_length=3, report_to=[], use_cpu=True, save_strategy="no", bf16=False, **config,
    )  # fmt: skip
    prompts = ["a b", "c d", "e f"]
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(tiny_lm_dir), reward_funcs=reward_fn, args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
    )  # fmt: skip
    inputs = [{"prompt": p} for p in prompts for _ in range(GENERATIONS)]
    return trainer._generate_and_score_completions(inputs)["advantages"]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_equal_trl(scale_rewards, tiny_lm_dir, tmp_path):
    """Shao et al. 2024 §4.1.2 (group), batch-std scaling, and Dr. GRPO's unscaled advantages."""
    trl = generated_advantages(
        GRPOTrainer, GRPOConfig, tiny_lm_dir, tmp_path, scale_rewards=scale_rewards, beta=0.0
    )
    ours = group_advantages(torch.tensor(REWARDS, dtype=trl.dtype), GENERATIONS, scale_rewards)
    torch.testing.assert_close(ours.advantages, trl, atol=ATOL, rtol=0)
    assert ours.zero_std_groups == 1 and torch.equal(ours.advantages[4:8], torch.zeros(4, dtype=trl.dtype))


def test_rloo_advantages_equal_trl(tiny_lm_dir, tmp_path):
    """Ahmadian et al. 2024: r_i minus the mean of the other G − 1 rewards (RLOOTrainer with β = 0, so
    no KL enters the reward, and normalize_advantages off, its default)."""
    trl = generated_advantages(RLOOTrainer, RLOOConfig, tiny_lm_dir, tmp_path, beta=0.0)
    ours = rloo_advantages(torch.tensor(REWARDS, dtype=trl.dtype), GENERATIONS)
    torch.testing.assert_close(ours, trl, atol=ATOL, rtol=0)
