"""GRPO-family module: configuration, rollout bookkeeping (RLOO, REINFORCE++, GDPO, KL in the
reward), the differentiable entropy of the log-prob path, optimizer steps, learning, resume."""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from rl_helpers import StepsPerBatch, length_reward, make_trainer, mean_reward, prompts_data

from lit_pref.callbacks import SampleTable
from lit_pref.cli import main
from lit_pref.losses.grpo import (
    batch_normalize,
    decoupled_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)
from lit_pref.modules import GRPO
from lit_pref.ops import masked_mean

MOOD = "lit_pref.tasks:mood_reward"
ROOT = Path(__file__).resolve().parents[2]


def constant_reward(prompts, completions, **_):
    return [1.0] * len(completions)


class TableLogger(Logger):
    """A logger that takes tables (like W&B's), recording what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, list[str], list[list], int]] = []

    name, version = "tables", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_table(self, key, columns, data, step):
        self.tables.append((key, columns, data, step))


# ------------------------------------------------------------------- config
def test_configuration_is_validated(tiny_lm_dir):
    model = str(tiny_lm_dir)
    with pytest.raises(ValueError, match="needs rewards"):
        GRPO(model_name_or_path=model)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        GRPO(model_name_or_path=model, rewards=MOOD, num_generations=1)
    with pytest.raises(ValueError, match="RLOO advantages are not scaled"):
        GRPO(model_name_or_path=model, rewards=MOOD, advantage_estimator="rloo", scale_rewards="group")
    with pytest.raises(ValueError, match="beta=0 uses no reference"):
        GRPO(model_name_or_path=model, rewards=MOOD, beta=0.0, reference="copy")
    with pytest.raises(ValueError, match="unknown loss_type"):
        GRPO(model_name_or_path=model, rewards=MOOD, loss_type="nope")
    # Online modules have no precompute_ref_logps argument (completions are sampled online).
    with pytest.raises(TypeError, match="precompute_ref_logps"):
        GRPO(model_name_or_path=model, rewards=MOOD, precompute_ref_logps=True)
    with pytest.raises(ValueError, match="cannot import"):
        GRPO(model_name_or_path=model, rewards="no_such_module_xyz:reward")
    with pytest.raises(ValueError, match="num_iterations"):
        GRPO(model_name_or_path=model, rewards=MOOD, num_iterations=0)
    module = GRPO(
        model_name_or_path=model, rewards=MOOD, loss_type="dapo", epsilon_high=0.28, max_new_tokens=16
    )
    assert module.loss_config.epsilon_high == 0.28 and module.loss_config.max_completion_length == 16
    assert (
        GRPO(model_name_or_path=model, rewards=MOOD, advantage_estimator="rloo").loss_config.scale_rewards
        == "none"
    )


def test_beta_zero_loads_no_reference(tiny_lm_dir):
    module = GRPO(model_name_or_path=str(tiny_lm_dir), rewards=MOOD, beta=0.0)
    module.configure_model()
    assert module.reference.kind == "none" and module.reference.network is None
    with_kl = GRPO(model_name_or_path=str(tiny_lm_dir), rewards=MOOD, beta=0.04)
    with_kl.configure_model()
    assert with_kl.reference.kind == "copy" and with_kl.reference.network is not None


# ------------------------------------------------------------------ rollout
def test_rollout_advantages_masks_and_warning(tiny_lm_dir):
    module = GRPO(
        model_name_or_path=str(tiny_lm_dir),
        rewards=constant_reward,
        num_generations=3,
        max_new_tokens=2,
        mask_truncated_completions=True,
        beta=0.0,
    )
    module.configure_model()
    data = prompts_data(batch_size=4)
    data._tokenizer = module.tokenizer
    data.target = "prompt_only"
    data.setup()
    batch = next(iter(data.train_dataloader()))
    with pytest.warns(
        UserWarning, match=r"4 of 4 prompt groups have zero reward variance \(all 3 completions"
    ):
        rollout = module.sample(batch)
        tensors = module.prepare(rollout)
    assert rollout.num_completions == 12 and rollout.columns["mood"] == batch["mood"]
    assert torch.equal(tensors.advantages, torch.zeros(12))
    # Truncated completions (no EOS within 2 tokens) are out of the loss, ended ones are in.
    loss_mask = tensors.loss_mask
    assert torch.equal(loss_mask.any(-1), rollout.ended)
    assert torch.equal(loss_mask[rollout.ended], rollout.mask[rollout.ended])
    assert tensors.old_logps is None and tensors.ref_logps is None  # single update, β = 0
    assert len(module.latest_samples) == 12 and module.latest_samples[0]["score"] == 1.0

    rloo = GRPO(
        model_name_or_path=str(tiny_lm_dir), rewards=MOOD, num_generations=4, advantage_estimator="rloo"
    )
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    advantages, zero = rloo.advantages(scores)
    torch.testing.assert_close(advantages, rloo_advantages(scores, 4))
    assert zero == 1


# --------------------------------------------------------------- optimizer
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_optimizer_steps_per_rollout(loss_type, tiny_lm_dir, tmp_path):
    """num_iterations × num_mini_batches optimizer steps per rollout, each over accumulated micro-batches."""
    module = GRPO(
        model_name_or_path=str(tiny_lm_dir),
        rewards=MOOD,
        num_generations=2,
        max_new_tokens=4,
        num_iterations=2,
        num_mini_batches=2,
        gradient_accumulation_steps=2,
        loss_type=loss_type,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        lr_scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: 1 / (1 + step)),
    )
    backward_calls = []
    original = module.manual_backward
    module.manual_backward = lambda loss, *a, **k: (backward_calls.append(1), original(loss, *a, **k))
    counter = StepsPerBatch()
    logger = CSVLogger(tmp_path, name="run")
    table = SampleTable(every_n_steps=4, num_samples=3)
    trainer = make_trainer(
        tmp_path, limit_train_batches=2, max_epochs=1, callbacks=[counter, table], logger=logger
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in module.reference.network.named_parameters()}
    trainer.fit(module, prompts_data(batch_size=4))
    assert counter.steps == [4, 4] and trainer.global_step == 8
    assert len(backward_calls) == 16  # 2 rollouts × 2 iterations × 2 mini-batches × 2 micro-batches
    # Under manual optimisation the module steps the scheduler itself, once per optimizer step.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 / 9)
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters())
    assert all(torch.equal(p, ref_before[n]) for n, p in module.reference.network.named_parameters())
    metrics = trainer.callback_metrics
    for name in ("score", "kl", "entropy", "loss", "reward_std", "frac_reward_zero_std", "policy/approx_kl",
                 "policy/clip_frac_low", "policy/clip_frac_high", "policy/clip_frac", "completions/mean_length",
                 "completions/min_length", "completions/max_length", "completions/eos_fraction"):  # fmt: skip
        assert f"train/{name}" in metrics, name
        assert math.isfinite(float(metrics[f"train/{name}"])), name
    # A table after the first rollout (the global step is then 4) and one when step 8 was reached.
    rows = list(csv.DictReader(table.csv_path.open()))
    assert table.csv_path.parent == Path(logger.log_dir)
    assert [r["step"] for r in rows] == ["4"] * 3 + ["8"] * 3
    assert set(rows[0]) == {"step", "prompt", "completion", "score"} and rows[0]["prompt"].startswith(
        "Write a"
    )


# ----------------------------------------------------------------- learning
def test_grpo_raises_the_task_reward(sft_dir, tmp_path):
    """GRPO on the shipped task (mood_prompts + mood_reward) from a briefly SFT-trained tiny model.

    A run that does not learn stays at the starting reward (± sampling noise of ~0.03 over 128
    completions); the margin asked for is several times that.
    """
    L.seed_everything(0)
    module = GRPO(
        model_name_or_path=str(sft_dir),
        rewards=MOOD,
        num_generations=8,
        max_new_tokens=10,
        beta=0.04,
        optimizer=partial(torch.optim.AdamW, lr=2e-3),
    )
    module.configure_model()
    before = mean_reward(module.policy, module.tokenizer)
    start = time.perf_counter()
    trainer = make_trainer(tmp_path, max_steps=12)
    trainer.fit(module, prompts_data(batch_size=8))
    seconds = time.perf_counter() - start
    after = mean_reward(module.policy, module.tokenizer)
    kl = float(trainer.callback_metrics["train/kl"])
    print(
        f"GRPO mean reward {before:.3f} -> {after:.3f} in {trainer.global_step} steps, {seconds:.1f}s; kl {kl:.3f}"
    )
    assert after > before + 0.2, (before, after)
    assert math.isfinite(kl) and kl >= 0


# ------------------------------------------------------------------- resume
def test_resume_restores_optimizer_and_continues(tiny_lm_dir, tmp_path):
    def module():
        return GRPO(
            model_name_or_path=str(tiny_lm_dir),
            rewards=length_reward,
            num_generations=2,
            max_new_tokens=4,
            num_mini_batches=2,
            optimizer=partial(torch.optim.AdamW, lr=1e-3),
        )

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    first = make_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoints])
    first.fit(module(), prompts_data())
    path = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 2

    class CheckRestored(L.Callback):
        def on_train_start(self, trainer, pl_module):
            state = trainer.optimizers[0].state_dict()
            saved_state = saved["optimizer_states"][0]
            assert state["state"].keys() == saved_state["state"].keys() and state["state"]
            for key, values in saved_state["state"].items():
                for name, value in values.items():
                    assert torch.equal(state["state"][key][name].cpu(), value), (key, name)
            weights = pl_module.state_dict()
            assert all(torch.equal(weights[k].cpu(), v) for k, v in saved["state_dict"].items())
            self.checked = True

    check = CheckRestored()
    second = make_trainer(tmp_path, max_steps=4, callbacks=[check])
    second.fit(module(), prompts_data(), ckpt_path=path)
    assert check.checked and second.global_step == 4


# ------------------------------------------------------------------- config
@pytest.mark.parametrize("name", ["grpo", "rloo", "gspo", "cispo", "reinforce_pp"])
def test_shipped_config_runs_offline(name, tiny_lm_dir, tmp_path, monkeypatch):
    """configs/<name>.yaml as shipped (outputs/tiny-lm is the tiny model), for one batch of prompts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lit-pref"])
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "tiny-lm").symlink_to(tiny_lm_dir)
    args = ["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--trainer.max_steps", "1"]
    main(
        [
            *args,
            "--trainer.val_check_interval",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--data.max_val_samples",
            "4",
        ]
    )
    run = tmp_path / "outputs" / name
    assert (run / "model" / "config.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    samples = run / "lightning_logs" / "version_0" / "samples.csv"
    assert len(list(csv.DictReader(samples.open(encoding="utf-8")))) == 8
    metrics = (run / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/score" in metrics and "val/score" in metrics


# ------------------------------------------------------------- GRPO family
def test_family_configuration_is_validated(tiny_lm_dir):
    model = str(tiny_lm_dir)
    bad = [
        ({"advantage_estimator": "ppo"}, "advantage_estimator must be one of"),
        (
            {"advantage_estimator": "reinforce_plus_plus", "scale_rewards": "group"},
            "normalises its advantages",
        ),
        ({"multi_objective_aggregation": "mean"}, "unknown multi_objective_aggregation"),
        (
            {"multi_objective_aggregation": "normalize_then_sum", "advantage_estimator": "rloo"},
            "grpo-estimator",
        ),
        (
            {"multi_objective_aggregation": "normalize_then_sum", "scale_rewards": "batch"},
            "drop scale_rewards",
        ),
        ({"normalize_advantages": True, "advantage_estimator": "reinforce_plus_plus"}, "already normalised"),
        ({"loss_type": "cispo"}, "set epsilon_high"),
        ({"delta": 1.1}, "delta must be >"),
        ({"importance_sampling_level": "prompt"}, "importance_sampling_level"),
        ({"top_entropy_quantile": -0.1}, "top_entropy_quantile"),
        ({"entropy_coef": -1.0}, "entropy_coef"),
        ({"kl_in_reward": True, "beta": 0.0}, "kl_in_reward"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            GRPO(model_name_or_path=model, rewards=MOOD, **kwargs)
    module = GRPO(
        model_name_or_path=model, rewards=MOOD, loss_type="cispo", epsilon_high=5.0,
        importance_sampling_level="sequence", advantage_estimator="reinforce_plus_plus_baseline",
    )  # fmt: skip
    config = module.loss_config
    assert (config.epsilon_high, config.importance_sampling_level, config.scale_rewards) == (
        5.0,
        "sequence",
        "none",
    )
    with pytest.warns(UserWarning, match="GSPO's objective is loss_type grpo"):
        GRPO(model_name_or_path=model, rewards=MOOD, loss_type="dapo", importance_sampling_level="sequence")


def rollout_for(module: GRPO, batch_size: int = 2):
    module.configure_model()
    data = prompts_data(batch_size=batch_size)
    data._tokenizer = module.tokenizer
    data.target = "prompt_only"
    data.setup()
    return module.sample(next(iter(data.train_dataloader())))


def test_reinforce_plus_plus_rollout_puts_the_kl_in_the_reward(tiny_lm_dir):
    """REINFORCE++ with kl_in_reward: per-token advantages from the score and β·k1(π_old ‖ π_ref)
    (both scored in prepare), the loss gets no KL (no reference log-probs kept, none in the loss)."""
    torch.manual_seed(0)
    module = GRPO(
        model_name_or_path=str(tiny_lm_dir), rewards=length_reward, num_generations=2, max_new_tokens=4,
        advantage_estimator="reinforce_plus_plus", beta=0.5, kl_in_reward=True,
    )  # fmt: skip
    rollout = rollout_for(module)
    # Make the reference differ from the policy, so that the KL is not 0.
    with torch.no_grad():
        for p in module.reference.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tensors = module.prepare(rollout)
    assert tensors.advantages.shape == rollout.mask.shape
    assert tensors.ref_logps is None and tensors.old_logps is None
    logps = module._score_chunk(rollout)
    assert logps.old_logps is not None and logps.ref_logps is not None
    token_kl = torch.where(rollout.mask, logps.old_logps - logps.ref_logps, 0.0)
    assert token_kl.abs().max() > 1e-3
    scores = torch.tensor(length_reward(None, rollout.completions))
    expected = reinforce_plus_plus_advantages(scores, rollout.mask, token_kl=token_kl, kl_coef=0.5)
    torch.testing.assert_close(tensors.advantages, expected, atol=1e-5, rtol=1e-5)
    assert module.loss_config.loss_kwargs()["beta"] == 0.0


def test_normalize_then_sum_rollout_uses_each_reward_and_the_penalty(tiny_lm_dir):
    """GDPO: the advantages are decoupled_advantages of the sources' raw columns plus the
    missing-EOS penalty as one more column (weight 1)."""

    def short(prompts, completions, **_):
        return [-float(len(c)) for c in completions]

    module = GRPO(
        model_name_or_path=str(tiny_lm_dir), rewards=[length_reward, short], reward_weights=[1.0, 0.5],
        missing_eos_penalty=1.0, num_generations=3, max_new_tokens=3, beta=0.0,
        multi_objective_aggregation="normalize_then_sum",
    )  # fmt: skip
    rollout = rollout_for(module)
    _, per_source = module.score(rollout)
    columns, weights = module.reward_columns(rollout, per_source)
    assert columns.shape == (6, 3) and weights.tolist() == [1.0, 0.5, 1.0]
    torch.testing.assert_close(columns[:, 2], -(~rollout.ended).float())
    tensors = module.prepare(rollout)
    torch.testing.assert_close(tensors.advantages, decoupled_advantages(columns, weights, 3).advantages)


def test_normalize_advantages_whitens_rloo(tiny_lm_dir):
    module = GRPO(model_name_or_path=str(tiny_lm_dir), rewards=MOOD, num_generations=2,
                  advantage_estimator="rloo", normalize_advantages=True)  # fmt: skip
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0])
    advantages, _ = module.advantages(scores)
    torch.testing.assert_close(advantages, batch_normalize(rloo_advantages(scores, 2)))


def test_differentiable_entropy_from_the_chunked_head(tiny_lm_dir):
    """ops.completion_logps(entropy_grad=True): the entropy computed in the LM-head chunks equals
    the entropy of the full softmax, and so does its gradient; by default it is detached."""
    from transformers import AutoModelForCausalLM

    from lit_pref.ops import completion_logps

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    prompt = torch.tensor([[5, 6, 7], [0, 8, 9]])
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    completion = torch.tensor([[10, 11, 12, 0], [13, 14, 15, 16], [17, 18, 0, 0], [19, 20, 21, 22]])
    completion_mask = (completion != 0).long()
    args = (model, prompt, prompt_mask, completion, completion_mask)
    out = completion_logps(*args, chunk_size=3, with_entropy=True, entropy_grad=True)
    assert out.entropy is not None and out.entropy.requires_grad
    detached = completion_logps(*args, chunk_size=3, with_entropy=True)
    assert detached.entropy is not None and not detached.entropy.requires_grad
    torch.testing.assert_close(out.entropy.detach(), detached.entropy)
    (grad,) = torch.autograd.grad(masked_mean(out.entropy, out.mask), model.lm_head.weight)

    ids = torch.cat([prompt.repeat_interleave(2, 0), completion], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(2, 0), completion_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 2:-1].float()
    reference = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(
        out.entropy.detach()[out.mask], reference.detach()[out.mask], atol=1e-5, rtol=1e-5
    )
    (expected,) = torch.autograd.grad(masked_mean(reference, out.mask), model.lm_head.weight)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_entropy_bonus_reaches_the_weights(tiny_lm_dir):
    """With entropy_coef the module asks the log-prob path for the entropy's gradient. With all
    advantages 0 (and β = 0) the policy term has zero gradient, so the loss's gradient with respect
    to the LM head is the bonus −c·H̄'s alone: non-zero only if the entropy carries its gradient."""
    torch.manual_seed(0)
    module = GRPO(model_name_or_path=str(tiny_lm_dir), rewards=length_reward, num_generations=2,
                  max_new_tokens=4, beta=0.0, entropy_coef=1.0)  # fmt: skip
    rollout = rollout_for(module)
    tensors = dataclasses.replace(module.prepare(rollout), advantages=torch.zeros(rollout.num_completions))
    loss, metrics = module.rollout_loss(rollout, tensors, None)
    assert float(metrics["policy_loss"]) == 0.0
    entropy = module.logps(module.policy, rollout.batch(), with_entropy=True).entropy
    torch.testing.assert_close(loss.detach(), -masked_mean(entropy, rollout.mask), atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, module.policy.get_output_embeddings().weight)
    assert grad.abs().max() > 1e-6


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"importance_sampling_level": "sequence", "beta": 0.0}, id="gspo"),
        pytest.param({"loss_type": "cispo", "epsilon_high": 5.0, "beta": 0.0}, id="cispo"),
        pytest.param(
            {"loss_type": "sapo", "delta": None, "top_entropy_quantile": 0.5}, id="sapo-top-entropy"
        ),
        pytest.param({"delta": 1.5, "entropy_coef": 0.01}, id="two-sided-entropy-bonus"),
        pytest.param(
            {"advantage_estimator": "reinforce_plus_plus_baseline", "loss_type": "dapo"},
            id="reinforce_pp_baseline",
        ),
        pytest.param(
            {"advantage_estimator": "rloo", "kl_in_reward": True, "normalize_advantages": True}, id="rloo-kl"
        ),
    ],
)
def test_family_trains(options, tiny_lm_dir, tmp_path):
    """One rollout reused over 2 iterations × 2 mini-batches (so π_old ≠ π) through the real
    training loop: the policy moves, the metrics are finite, the family's own metrics are logged."""
    module = GRPO(
        model_name_or_path=str(tiny_lm_dir), rewards=length_reward, num_generations=2, max_new_tokens=4,
        num_iterations=2, num_mini_batches=2, optimizer=partial(torch.optim.AdamW, lr=1e-3), **options,
    )  # fmt: skip
    trainer = make_trainer(tmp_path, limit_train_batches=1, max_epochs=1)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer.fit(module, prompts_data(batch_size=4))
    assert trainer.global_step == 4
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters())
    metrics = trainer.callback_metrics
    names = ["loss", "entropy", "policy/clip_frac", "policy/approx_kl", "score"]
    names += ["policy_loss"] if options.get("entropy_coef") else []
    names += ["policy/top_entropy_frac"] if "top_entropy_quantile" in options else []
    names += ["kl"] if options.get("kl_in_reward") or options.get("beta", 0.04) else []
    for name in names:
        assert math.isfinite(float(metrics[f"train/{name}"])), name
    if "top_entropy_quantile" in options:
        assert 0 < float(metrics["train/policy/top_entropy_frac"]) < 1
