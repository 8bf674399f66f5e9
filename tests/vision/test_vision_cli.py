"""Item 4: the vision configs run through the real CLI on the tiny VLM (a few steps each)."""

from __future__ import annotations

import shutil

import pytest
from cli_helpers import run_config


@pytest.fixture
def in_vlm_project(tmp_path, tiny_vlm_dir, monkeypatch):
    """A working directory with ``outputs/tiny-vlm`` as ``python -m lit_pref.vision.tiny`` leaves it."""
    shutil.copytree(tiny_vlm_dir, tmp_path / "outputs" / "tiny-vlm")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("config", ["dpo_vlm.yaml", "sft_vlm.yaml", "kto_vlm.yaml", "orpo_vlm.yaml"])
def test_vision_config_trains_through_the_cli(in_vlm_project, config):
    cli, rows = run_config("fit", config, "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                           "--data.max_train_samples=24")  # fmt: skip
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert cli.datamodule.processor is not None
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["vision_inputs"]["pixel_values"].shape[0] == batch["image_counts"].sum() > 0
    start = cli.model.reference.network if getattr(cli.model, "reference", None) is not None else None
    moved = [
        n
        for n, p in cli.model.policy.named_parameters()
        if start is not None and not p.equal(dict(start.named_parameters())[n])
    ]
    assert start is None or moved  # trained weights moved away from the frozen reference
    assert (in_vlm_project / "outputs" / config.removesuffix(".yaml") / "model" / "config.json").is_file()


def test_grpo_on_image_prompts_trains_through_the_cli(in_vlm_project):
    cli, rows = run_config("fit", "grpo_vlm.yaml", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                           "--data.max_train_samples=8", "--model.num_generations=2", "--model.max_new_tokens=4")  # fmt: skip
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert any("train/score" in r for r in rows)  # the colour reward of the sampled answers
    assert cli.datamodule.processor is not None
    assert (in_vlm_project / "outputs" / "grpo_vlm" / "model" / "config.json").is_file()
