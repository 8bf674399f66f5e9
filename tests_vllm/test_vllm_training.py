"""Online RL with the vLLM engine: GRPO learns the mood task as with the built-in engine, PPO runs,
the mismatch is logged and corrected, and YAML chooses the engine by name or as an object."""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from rl_helpers import length_reward, make_trainer, mean_reward, prompts_data

from lit_pref.cli import LitPrefCLI
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.engines import GenerateEngine
from lit_pref.engines.vllm import VLLMEngine
from lit_pref.modules import GRPO, PPO
from lit_pref.modules.base import AlignmentModule

MOOD = "lit_pref.tasks:mood_reward"
ROOT = Path(__file__).resolve().parents[1]


def grpo_run(model_dir: Path, engine, tmp_path: Path, **kwargs) -> tuple[float, float, L.Trainer]:
    """(held-out reward before, after, trainer) of the main suite's GRPO learning run with ``engine``."""
    L.seed_everything(0)
    module = GRPO(
        model_name_or_path=str(model_dir), rewards=MOOD, num_generations=8, max_new_tokens=10, beta=0.04,
        rollout_engine=engine, optimizer=partial(torch.optim.AdamW, lr=2e-3), **kwargs,
    )  # fmt: skip
    module.configure_model()
    before = mean_reward(module.policy, module.tokenizer)
    trainer = make_trainer(tmp_path, max_steps=12)
    trainer.fit(module, prompts_data(batch_size=8))
    return before, mean_reward(module.policy, module.tokenizer), trainer


def test_grpo_with_vllm_raises_the_reward_as_the_built_in_engine_does(engine, vllm_sft_dir, tmp_path):
    """Same task, start, seed and steps as the main suite's GRPO learning test, once per engine (the
    reward is measured the same way for both). A run that does not learn stays at its start (±0.03)."""
    start = time.perf_counter()
    before, built_in, _ = grpo_run(vllm_sft_dir, GenerateEngine(), tmp_path / "generate")
    middle = time.perf_counter()
    same, with_vllm, trainer = grpo_run(vllm_sft_dir, engine, tmp_path / "vllm", rollout_is_cap=3.0)
    end = time.perf_counter()
    print(
        f"GRPO mean reward {before:.3f} -> {built_in:.3f} (built-in, {middle - start:.0f}s) / "
        f"{with_vllm:.3f} (vLLM, {end - middle:.0f}s)"
    )
    assert same == before
    assert built_in > before + 0.2, (before, built_in)
    assert with_vllm > before + 0.2 and with_vllm - before > 0.75 * (built_in - before), (before, built_in, with_vllm)
    metrics = trainer.callback_metrics
    assert float(metrics["train/rollout/logp_diff_max"]) < 1e-3  # fp32 on both sides: the same numbers
    assert abs(float(metrics["train/rollout/is_weight_mean"]) - 1) < 1e-3


def test_ppo_runs_with_vllm(engine, vllm_lm_dir, tmp_path):
    L.seed_everything(0)
    module = PPO(
        model_name_or_path=str(vllm_lm_dir), rewards=length_reward, max_new_tokens=6, num_ppo_epochs=2,
        rollout_engine=engine, rollout_is_cap=2.0, optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )  # fmt: skip
    module.configure_model()
    start = {name: p.detach().clone() for name, p in module.policy.named_parameters()}
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(module, prompts_data(batch_size=4))
    assert trainer.global_step == 4
    assert any(not torch.equal(start[name], p) for name, p in module.policy.named_parameters())
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    assert 0 <= float(metrics["train/rollout/logp_diff_mean"]) <= float(metrics["train/rollout/logp_diff_max"]) < 1e-3


def cli_model(tmp_path: Path, monkeypatch, model_dir: Path, *args: str) -> AlignmentModule:
    """The module configs/grpo.yaml builds with ``args`` added (parsed and instantiated, not fitted)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir(exist_ok=True)
    if not (tmp_path / "outputs" / "tiny-lm").exists():
        (tmp_path / "outputs" / "tiny-lm").symlink_to(model_dir)
    cli = LitPrefCLI(
        AlignmentModule, PreferenceDataModule, subclass_mode_model=True, run=False,
        args=["--config", str(ROOT / "configs" / "grpo.yaml"), *args],
    )  # fmt: skip
    return cli.model


def test_yaml_names_the_engine_or_configures_it(vllm_lm_dir, tmp_path, monkeypatch):
    by_name = cli_model(tmp_path, monkeypatch, vllm_lm_dir, "--model.rollout_engine", "vllm")
    assert isinstance(by_name.rollout_engine, VLLMEngine) and by_name.rollout_engine.sync_every == 1
    default = cli_model(tmp_path, monkeypatch, vllm_lm_dir, "--model.rollout_engine", "generate")
    assert isinstance(default.rollout_engine, GenerateEngine)
    configured = cli_model(
        tmp_path, monkeypatch, vllm_lm_dir, "--model.rollout_engine",
        '{"class_path": "lit_pref.engines.VLLMEngine", "init_args": {"gpu_memory_utilization": 0.4, '
        '"max_model_len": 256, "tensor_parallel_size": 1, "enforce_eager": true, "sync_every": 2}}',
        "--model.rollout_is_cap", "3.0",
    )  # fmt: skip
    engine = configured.rollout_engine
    assert isinstance(engine, VLLMEngine)
    assert (engine.gpu_memory_utilization, engine.max_model_len, engine.enforce_eager, engine.sync_every) == (
        0.4, 256, True, 2,
    )  # fmt: skip
    assert configured.rollout_is_cap == 3.0


def test_yaml_engine_trains_through_the_cli(engine, vllm_lm_dir, tmp_path, monkeypatch):
    """``rollout_engine: vllm`` end to end through ``lit-pref fit`` for two optimizer steps (the
    session's engine stands in for the one the CLI builds: one vLLM engine per process)."""
    monkeypatch.setattr("lit_pref.engines.vllm.VLLMEngine", lambda *a, **k: engine)
    from lit_pref.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lit-pref"])
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "tiny-lm").symlink_to(vllm_lm_dir)
    main(["fit", "--config", str(ROOT / "configs" / "grpo.yaml"), "--model.rollout_engine", "vllm",
          "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--model.max_new_tokens", "6"])  # fmt: skip
    metrics = (tmp_path / "outputs" / "grpo" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0].split(",")
    assert {"train/rollout/logp_diff_mean", "train/rollout/logp_diff_max", "train/rollout/generate_s"} <= set(header)


@pytest.mark.parametrize("cap", [0.0, -1.0])
def test_rollout_is_cap_is_validated(cap, vllm_lm_dir):
    with pytest.raises(ValueError, match="rollout_is_cap"):
        GRPO(model_name_or_path=str(vllm_lm_dir), rewards=MOOD, rollout_is_cap=cap)
