"""DDPO and Diffusion-DPO on the tiny local pipeline: learning, references, grids, resume, CLI."""

from __future__ import annotations

import csv
import math
import shutil
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.diffusion.rewards import jpeg_compressibility, score_images
from lit_pref.diffusion.tasks import HELD_OUT
from lit_pref.modules.ddpo import DDPO
from lit_pref.modules.diffusion_dpo import DiffusionDPO

PROMPTS = "lit_pref.diffusion.tasks:animal_prompts"
PAIRS = "lit_pref.diffusion.tasks:smooth_vs_noisy_pairs"


def ddpo(model_dir, **kwargs):
    settings = dict(
        resolution=32, num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=2, sample_batch_size=24,
        train_batch_size=8, clip_range=1e-2, stat_min_count=4, grid_size=4, optimizer=partial(torch.optim.AdamW, lr=3e-3),
    )
    return DDPO(model_name_or_path=str(model_dir), **(settings | kwargs))


def dpo(model_dir, **kwargs):
    return DiffusionDPO(model_name_or_path=str(model_dir), resolution=32, optimizer=partial(torch.optim.AdamW, lr=1e-4), **kwargs)


def fit(module, dataset, root: Path, max_steps: int, batch_size: int, ckpt_path=None, val=False):
    L.seed_everything(0)
    data = PreferenceDataModule(dataset, batch_size=batch_size, val_split="test" if val else None)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(root, name="log"), log_every_n_steps=1,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1.0 if val else 0,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    with (Path(trainer.logger.log_dir) / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f)]
    return trainer, {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}, rows


def held_out_compressibility(module) -> float:
    """Mean JPEG compressibility of 16 images for prompts never trained on, from fixed noise."""
    prompts = [f"a photo of a {name}" for name in HELD_OUT] * 4
    rollout = module.sample(prompts, [{} for _ in prompts], generator=torch.Generator().manual_seed(123))
    return score_images(jpeg_compressibility, rollout.images, prompts, [{} for _ in prompts], "jpeg").mean().item()


def test_ddpo_raises_jpeg_compressibility_on_held_out_prompts(tiny_sd_dir, tmp_path):
    module = ddpo(tiny_sd_dir)
    module.configure_model()
    before = held_out_compressibility(module)
    vae_before = {k: v.clone() for k, v in module.vae.state_dict().items()}
    trainer, _, rows = fit(module, PROMPTS, tmp_path, max_steps=30, batch_size=12)
    after = held_out_compressibility(module)
    # Measured: −1.5928 → −1.5788 kB (30 steps); sampling noise is fixed, so only the weights differ.
    assert after > before + 0.005, (before, after)
    for name, tensor in module.vae.state_dict().items():
        assert torch.equal(tensor, vae_before[name]), name  # the VAE is frozen
    log_dir = Path(trainer.log_dir)
    assert (log_dir / "samples_before.png").is_file() and (log_dir / "samples_after.png").is_file()
    assert {"train/reward", "train/approx_kl", "train/clip_frac"} <= set(rows[0])


def test_ddpo_takes_one_optimizer_step_per_mini_batch_and_inner_epoch(tiny_sd_dir, tmp_path):
    # 6 prompts × 2 images = 12 samples, mini-batches of 4 × 1 → 3 steps per pass, 2 passes.
    module = ddpo(tiny_sd_dir, train_batch_size=4, num_inner_epochs=2, timestep_fraction=0.5)
    trainer, _, _ = fit(module, PROMPTS, tmp_path, max_steps=6, batch_size=6)
    assert trainer.global_step == 6 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 1


def test_ddpo_with_lora_and_a_prompt_function_trains_the_adapter_only(tiny_sd_dir, tmp_path):
    module = ddpo(tiny_sd_dir, peft={"r": 4, "lora_alpha": 4}, prompt_fn="lit_pref.diffusion.tasks:random_animal_prompt")
    module.configure_model()
    start = {n: p.clone() for n, p in module.policy.named_parameters()}
    fit(module, PROMPTS, tmp_path, max_steps=1, batch_size=4)
    moved = {n for n, p in module.policy.named_parameters() if not torch.equal(p, start[n])}
    assert moved and all("lora_" in n for n in moved)
    assert all(prompt.startswith("a photo of a ") for prompt in module.grid_prompts)


def test_ddpo_validates_its_arguments(tiny_sd_dir):
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddpo(tiny_sd_dir, eta=0.0)
    with pytest.raises(ValueError, match="timestep_fraction"):
        ddpo(tiny_sd_dir, timestep_fraction=0.0)


def test_diffusion_dpo_starts_at_ln2_and_moves_the_policy_not_the_reference(tiny_sd_dir, tmp_path):
    module = dpo(tiny_sd_dir)
    module.configure_model()
    start = {k: v.clone() for k, v in module.policy.state_dict().items()}
    _, losses, rows = fit(module, PAIRS, tmp_path, max_steps=4, batch_size=4)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert any(not torch.equal(v, start[k]) for k, v in module.policy.state_dict().items())
    assert module.ref_unet is not None
    for name, tensor in module.ref_unet.state_dict().items():
        assert torch.equal(tensor, start[name]), name
    assert "train/rewards/accuracies" in rows[0]


def test_diffusion_dpo_with_lora_uses_the_adapter_disabled_unet_and_exports_a_pipeline(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    module = dpo(tiny_sd_dir, peft={"r": 4, "lora_alpha": 4}, output_dir=str(tmp_path / "export"))
    _, losses, _ = fit(module, PAIRS, tmp_path, max_steps=2, batch_size=4)
    assert module.ref_unet is None and losses[0] == pytest.approx(math.log(2), abs=1e-3)
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "export")
    assert not any("lora" in k for k in pipeline.unet.state_dict())  # merged


MODULES = {
    "ddpo": (lambda d: ddpo(d, train_batch_size=4), PROMPTS, 4),
    "diffusion_dpo": (dpo, PAIRS, 4),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_resume_repeats_the_straight_run(name, tiny_sd_dir, tmp_path):
    make, dataset, batch = MODULES[name]
    steps = 4 if name == "diffusion_dpo" else 8  # DDPO: 2 optimizer steps per batch of prompts
    stop = steps // 2
    straight = make(tiny_sd_dir)
    _, straight_losses, _ = fit(straight, dataset, tmp_path / "straight", steps, batch)
    fit(make(tiny_sd_dir), dataset, tmp_path / "first", stop, batch)
    resumed = make(tiny_sd_dir)
    ckpt = next((tmp_path / "first" / "ckpt").glob(f"*step={stop}.ckpt"))
    _, resumed_losses, _ = fit(resumed, dataset, tmp_path / "second", steps, batch, ckpt_path=ckpt)
    # Logged per batch of prompts (the trainer's logging step), the resumed run continues at the half.
    later = sorted(straight_losses)[len(straight_losses) // 2 :]
    assert later and sorted(resumed_losses) == later
    for step in later:
        assert resumed_losses[step] == pytest.approx(straight_losses[step], abs=1e-6), step
    resumed_params = dict(resumed.policy.named_parameters())
    for param_name, param in straight.policy.named_parameters():
        torch.testing.assert_close(resumed_params[param_name], param, atol=1e-6, rtol=0)
    assert len(set(straight_losses.values())) == len(straight_losses)  # the steps did change things


@pytest.mark.parametrize(("config", "metric"), [("ddpo.yaml", "train/reward"), ("diffusion_dpo.yaml", "train/loss")])
def test_shipped_configs_run_through_the_cli(config, metric, tiny_sd_dir, tmp_path, monkeypatch):
    from cli_helpers import run_config

    shutil.copytree(tiny_sd_dir, tmp_path / "outputs" / "tiny-sd")
    monkeypatch.chdir(tmp_path)
    cli, rows = run_config("fit", config, "--trainer.max_steps=2", "--trainer.val_check_interval=1")
    assert cli.trainer.global_step >= 2  # DDPO stops after the batch of prompts that reached it
    assert any(metric in row for row in rows) and any(k.startswith("val/") for row in rows for k in row)
    assert (tmp_path / "outputs" / Path(config).stem / "pipeline" / "model_index.json").is_file()
