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

import math
import types
from typing import Any

import pytest
import torch
from datasets import Dataset
from parity.trl_fakes import ATOL, DTYPE, accelerator, metrics_store
from trl import GRPOConfig, GRPOTrainer, RewardTrainer, RLOOConfig, RLOOTrainer

from lit_pref.losses.grpo import (
    batch_normalize,
    decoupled_advantages,
    group_advantages,
    grpo_policy_loss,
    rloo_advantages,
    top_entropy_mask,
)
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
    entropies = data.get("entropy", torch.zeros_like(data["logps"]))
    one_process = accelerator()
    one_process.pad_across_processes = lambda x, dim=0, pad_index=0: x  # read by get_high_entropy_mask
    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (data["logps"], entropies, None),
        model=torch.nn.Module(), accelerator=one_process, _metrics=metrics_store(),
        args=types.SimpleNamespace(
            use_bias_correction_kl=config.get("use_bias_correction_kl", False), delta=config.get("delta"),
            steps_per_generation=1, sapo_temperature_pos=config.get("sapo_temperature_pos", 1.0),
            sapo_temperature_neg=config.get("sapo_temperature_neg", 1.05),
        ),
        loss_type=config["loss_type"], beta=config["beta"], epsilon_low=config["epsilon_low"],
        epsilon_high=config["epsilon_high"], max_completion_length=WIDTH,
        top_entropy_quantile=config.get("top_entropy_quantile", 1.0), off_policy_mask_threshold=None,
        importance_sampling_level=config.get("importance_sampling_level", "token"), use_vllm=False,
        current_gradient_accumulation_steps=1, aux_loss_enabled=False,
        _entropy_bonus_enabled=config.get("entropy_coef", 0.0) != 0.0, entropy_coef=config.get("entropy_coef", 0.0),
        use_adaptive_entropy=False,
    )  # fmt: skip
    loss = trainer._compute_loss(trainer.model, inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


FAMILY_OPTIONS = (
    "importance_sampling_level", "delta", "sapo_temperature_pos", "sapo_temperature_neg", "entropy_coef",
)  # fmt: skip


def lit_grpo_loss(data: dict[str, torch.Tensor], *, with_old: bool, **config: Any):
    quantile = config.get("top_entropy_quantile", 1.0)
    entropy = data.get("entropy")
    mask = None if quantile == 1.0 or entropy is None else top_entropy_mask(entropy, data["mask"], quantile)
    return grpo_policy_loss(
        data["logps"], data["old"] if with_old else None, data["ref"] if config["beta"] else None,
        data["advantages"], data["mask"], loss_type=config["loss_type"], epsilon_low=config["epsilon_low"],
        epsilon_high=config["epsilon_high"], beta=config["beta"], max_completion_length=WIDTH,
        num_items_in_batch=config.get("num_items_in_batch"), entropy=entropy, entropy_mask=mask,
        **{key: config[key] for key in FAMILY_OPTIONS if key in config},
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


FAMILY_CASES = [
    pytest.param({"loss_type": "grpo", "importance_sampling_level": "sequence"}, id="gspo"),
    pytest.param({"loss_type": "bnpo", "importance_sampling_level": "sequence"}, id="gspo-bnpo"),
    pytest.param({"loss_type": "dapo", "importance_sampling_level": "sequence", "global": True}, id="gspo-dapo"),
    pytest.param({"loss_type": "grpo", "delta": 1.5}, id="two-sided"),
    pytest.param({"loss_type": "dapo", "delta": 1.5, "global": True}, id="two-sided-dapo"),
    pytest.param({"loss_type": "cispo", "epsilon_high": 1.3, "global": True}, id="cispo"),
    pytest.param({"loss_type": "cispo", "epsilon_high": 1.1, "importance_sampling_level": "sequence"}, id="cispo-seq"),
    pytest.param({"loss_type": "sapo"}, id="sapo"),
    pytest.param(
        {"loss_type": "sapo", "importance_sampling_level": "sequence", "sapo_temperature_pos": 0.8,
         "sapo_temperature_neg": 1.2}, id="sapo-seq-temps",
    ),
    pytest.param({"loss_type": "grpo", "top_entropy_quantile": 0.2}, id="top-entropy"),
    # TRL takes the quantile in float32; with these 35 float64 entropies a quantile that falls exactly
    # on one of them (34·(1 − ρ) an integer, e.g. ρ = 0.5) would round it and flip that tie.
    pytest.param({"loss_type": "dapo", "top_entropy_quantile": 0.4, "global": True}, id="top-entropy-dapo"),
    pytest.param({"loss_type": "grpo", "entropy_coef": 0.01}, id="entropy-bonus"),
    pytest.param({"loss_type": "dr_grpo", "entropy_coef": 0.1}, id="entropy-bonus-dr_grpo"),
    pytest.param({"loss_type": "dapo", "entropy_coef": 0.05}, id="entropy-bonus-dapo"),
    pytest.param({"loss_type": "sapo", "entropy_coef": 0.02, "top_entropy_quantile": 0.3}, id="entropy-bonus-top-sapo"),
]  # fmt: skip


@pytest.mark.parametrize("case", FAMILY_CASES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [False, True], ids=["on-policy", "old-logps"])
def test_grpo_family_equals_trl(case, beta, with_old):
    """GSPO's sequence ratio (Zheng et al. 2025), two-sided clipping δ (INTELLECT-2), CISPO
    (MiniMax 2025), SAPO (Gao et al. 2025), top-entropy masking (Wang et al. 2025) and the entropy
    bonus against TRL's ``_compute_loss`` with the same options: loss, gradients (with respect to
    the log-probs and, for the bonus, the entropies), clip fractions and KL."""
    data = grpo_inputs(seed=1)
    g = torch.Generator().manual_seed(2)
    data["entropy"] = (3.0 * torch.rand(data["mask"].shape, generator=g, dtype=DTYPE)).requires_grad_()
    config = {"beta": beta, "epsilon_low": 0.2, "epsilon_high": 0.2, **case}
    if config.pop("global", False):  # the token count of a global batch twice this micro-batch
        config["num_items_in_batch"] = 2 * int(data["mask"].sum())
    out = lit_grpo_loss(data, with_old=with_old, **config)
    trl_loss, trl_metrics = trl_grpo_loss(data, with_old=with_old, **config)
    torch.testing.assert_close(out.loss, trl_loss, atol=ATOL, rtol=0)
    leaves = [data["logps"], data["entropy"]] if config.get("entropy_coef") else [data["logps"]]
    lit_grads = torch.autograd.grad(out.loss, leaves)
    trl_grads = torch.autograd.grad(trl_loss, leaves)
    for ours, theirs in zip(lit_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    if config["loss_type"] == "cispo":
        torch.testing.assert_close(
            float(out.clip_frac_high), trl_metrics["cispo_clip_ratio"], atol=ATOL, rtol=0
        )
    elif config["loss_type"] != "sapo":
        for ours, theirs in [("clip_frac_low", "low_mean"), ("clip_frac_high", "high_mean"),
                             ("clip_frac_region", "region_mean")]:  # fmt: skip
            torch.testing.assert_close(
                float(getattr(out, ours)), trl_metrics[f"clip_ratio/{theirs}"], atol=ATOL, rtol=0
            )
    if beta:
        torch.testing.assert_close(float(out.kl_mean), trl_metrics["kl"], atol=ATOL, rtol=0)
    if config.get("entropy_coef"):
        torch.testing.assert_close(float(out.policy_loss), trl_metrics["policy_loss"], atol=ATOL, rtol=0)


def test_grpo_family_cases_are_not_vacuous():
    """Each option changes the loss on these inputs, so the matches above test it: δ caps some
    ratios, the CISPO caps bind, the top-entropy masks keep a strict subset, the bonus is non-zero."""
    data = grpo_inputs(seed=1)
    g = torch.Generator().manual_seed(2)
    data["entropy"] = 3.0 * torch.rand(data["mask"].shape, generator=g, dtype=DTYPE)
    base = {"beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2}

    def loss(**config: Any) -> float:
        return float(lit_grpo_loss(data, with_old=True, **{**base, **config}).loss)

    assert abs(loss(loss_type="grpo", delta=1.5) - loss(loss_type="grpo")) > 1e-3
    assert abs(loss(loss_type="grpo", importance_sampling_level="sequence") - loss(loss_type="grpo")) > 1e-3
    assert abs(loss(loss_type="sapo", sapo_temperature_neg=1.2) - loss(loss_type="sapo")) > 1e-3
    for cap in (1.3, 1.1):
        assert (
            float(
                lit_grpo_loss(
                    data, with_old=True, **{**base, "loss_type": "cispo", "epsilon_high": cap}
                ).clip_frac_high
            )
            > 0
        )
    for quantile in (0.2, 0.3, 0.4):
        kept = int(top_entropy_mask(data["entropy"], data["mask"], quantile).sum())
        assert 0 < kept < int(data["mask"].sum())
    assert abs(loss(loss_type="grpo", entropy_coef=0.01) - loss(loss_type="grpo")) > 1e-3


# ------------------------------------------------------------------------------ advantages

# Three prompts × four generations; the second group has zero spread (advantages exactly 0).
REWARDS = (0.3, -1.2, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0, -0.7, 0.1, 0.9, 4.0)
GENERATIONS = 4


def reward_fn(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    assert len(completions) == len(REWARDS)
    return list(REWARDS)


def generated(
    trainer_cls: type,
    config_cls: type,
    tiny_lm_dir,
    tmp_path,
    reward_funcs: Any = reward_fn,
    patch=None,
    **config: Any,
) -> dict[str, Any]:
    """TRL's ``_generate_and_score_completions`` output for the three prompts × GENERATIONS; ``patch``
    may change the built trainer first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = config_cls(
        output_dir=str(tmp_path), per_device_train_batch_size=len(REWARDS), num_generations=GENERATIONS,
        max_completion_length=3, report_to=[], use_cpu=True, save_strategy="no", bf16=False, **config,
    )  # fmt: skip
    prompts = ["a b", "c d", "e f"]
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(tiny_lm_dir), reward_funcs=reward_funcs, args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
    )  # fmt: skip
    if patch is not None:
        patch(trainer)
    inputs = [{"prompt": p} for p in prompts for _ in range(GENERATIONS)]
    return trainer._generate_and_score_completions(inputs)


def generated_advantages(
    trainer_cls: type, config_cls: type, tiny_lm_dir, tmp_path, **config: Any
) -> torch.Tensor:
    return generated(trainer_cls, config_cls, tiny_lm_dir, tmp_path, **config)["advantages"]


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


def test_rloo_normalize_advantages_equals_trl(tiny_lm_dir, tmp_path):
    """RLOOConfig.normalize_advantages: the leave-one-out advantages normalised over the batch."""
    trl = generated_advantages(
        RLOOTrainer, RLOOConfig, tiny_lm_dir, tmp_path, beta=0.0, normalize_advantages=True
    )
    ours = batch_normalize(rloo_advantages(torch.tensor(REWARDS, dtype=trl.dtype), GENERATIONS))
    torch.testing.assert_close(ours, trl, atol=ATOL, rtol=0)
    assert abs(float(ours.std()) - 1.0) < 1e-3


# A second reward on another scale, with None for completions it does not apply to.
SECOND = (10.0, None, 30.0, 20.0, 5.0, 5.0, None, 5.0, 1.0, 4.0, 2.0, 2.0)
WEIGHTS = (1.0, 0.3)


def second_reward_fn(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
    return list(SECOND)


def test_normalize_then_sum_equals_trl(tiny_lm_dir, tmp_path):
    """GDPO-style multi_objective_aggregation="normalize_then_sum": each reward normalised per group
    (None left out), weighted, summed, normalised over the batch — TRL's GRPOTrainer with two reward
    functions and reward_weights."""
    trl = generated_advantages(
        GRPOTrainer, GRPOConfig, tiny_lm_dir, tmp_path, reward_funcs=[reward_fn, second_reward_fn], beta=0.0,
        multi_objective_aggregation="normalize_then_sum", reward_weights=list(WEIGHTS),
    )  # fmt: skip
    columns = torch.tensor(
        [[r, math.nan if s is None else s] for r, s in zip(REWARDS, SECOND, strict=True)], dtype=trl.dtype
    )
    ours = decoupled_advantages(columns, torch.tensor(WEIGHTS, dtype=trl.dtype), GENERATIONS)
    torch.testing.assert_close(ours.advantages, trl, atol=ATOL, rtol=0)
    summed = group_advantages(columns.nan_to_num() @ torch.tensor(WEIGHTS, dtype=trl.dtype), GENERATIONS)
    assert (summed.advantages - trl).abs().max() > 0.1  # a different aggregation than sum-then-normalise


def test_rloo_kl_in_the_reward_equals_trl(tiny_lm_dir, tmp_path):
    """RLOO with β > 0 puts β Σ_t (log π_old − log π_ref) into each reward (Ahmadian et al. 2024).
    TRL's per-token log-prob helper is replaced by seeded values (one table for the policy, one
    for the reference); lit_pref's GRPO module gets the same tensors through ``advantages``."""
    from lit_pref.modules import GRPO

    beta = 0.1
    tables: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(3)

    def patch(trainer: Any) -> None:
        def logps(
            model: Any, input_ids: torch.Tensor, attention_mask: Any, logits_to_keep: int, *a: Any, **k: Any
        ):
            name = "ref" if model is trainer.ref_model else "old"
            tables[name] = -2.0 * torch.rand(input_ids.shape[0], logits_to_keep, generator=g)
            return tables[name], None, None

        trainer._get_per_token_logps_and_entropies = logps

    out = generated(RLOOTrainer, RLOOConfig, tiny_lm_dir, tmp_path, patch=patch, beta=beta)
    mask = out["completion_mask"].bool()
    token_kl = torch.where(mask, tables["old"] - tables["ref"], 0.0)
    module = GRPO(
        model_name_or_path=str(tiny_lm_dir), rewards=reward_fn, num_generations=GENERATIONS,
        advantage_estimator="rloo", beta=beta, kl_in_reward=True,
    )  # fmt: skip
    ours, _ = module.advantages(torch.tensor(REWARDS), mask, token_kl)
    torch.testing.assert_close(ours, out["advantages"], atol=ATOL, rtol=0)
    plain = rloo_advantages(torch.tensor(REWARDS), GENERATIONS)
    assert (plain - out["advantages"]).abs().max() > 1e-2  # the KL moved the advantages
