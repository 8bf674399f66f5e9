"""Does DDPO learn on a CPU? JPEG compressibility of held-out prompts before → after, with grids.

The tiny local pipeline (``lit_pref.diffusion.tiny``: 32 px, random weights) is trained with the
shipped ``configs/ddpo.yaml`` settings (4 DDIM steps, 12 prompts × 2 images per step, per-prompt
advantages, clip range 1e-2, AdamW 3e-3). Before and after, 16 images for the 4 held-out
animals (never trained on) are sampled from the same fixed noise and scored; the reward is the
negative JPEG size in kB (quality 95), so higher is more compressible. Grids of the training
prompts' samples before and after land in the run's log directory (printed). Also with
``--reward lit_pref.diffusion.rewards:jpeg_incompressibility`` (the opposite task). Run by hand::

    python benchmarks/ddpo_compressibility.py [--steps 100] [--out outputs/bench_ddpo]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.diffusion.rewards import load_reward, score_images
from lit_pref.diffusion.tasks import HELD_OUT
from lit_pref.modules.ddpo import DDPO
from lit_pref.tiny import save_tiny_diffusion_pipeline


def held_out_reward(module: DDPO, reward: str, seed: int = 123) -> float:
    prompts = [f"a photo of a {name}" for name in HELD_OUT] * 4
    metadata = [{"animal": p.rsplit(" ", 1)[-1]} for p in prompts]
    rollout = module.sample(prompts, metadata, generator=torch.Generator(module.device).manual_seed(seed))
    return score_images(load_reward(reward), rollout.images, prompts, metadata, reward).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (3 per batch of prompts)")
    parser.add_argument("--reward", default="lit_pref.diffusion.rewards:jpeg_compressibility")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=None, help="log directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.out or tempfile.mkdtemp(prefix="ddpo_bench_"))
    pipeline = save_tiny_diffusion_pipeline(root / "tiny-sd")
    L.seed_everything(0)
    module = DDPO(
        model_name_or_path=str(pipeline), reward=args.reward, resolution=32, num_inference_steps=4,
        guidance_scale=1.0, num_images_per_prompt=2, sample_batch_size=24, train_batch_size=8, clip_range=1e-2,
        stat_min_count=4, grid_size=4, optimizer=partial(torch.optim.AdamW, lr=args.lr, weight_decay=1e-4),
    )  # fmt: skip
    module.configure_model()
    before = held_out_reward(module, args.reward)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=args.steps, logger=CSVLogger(root, name="log"), log_every_n_steps=1,
        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, PreferenceDataModule("lit_pref.diffusion.tasks:animal_prompts", batch_size=12, val_split=None))
    seconds = time.perf_counter() - start
    after = held_out_reward(module, args.reward)
    print(f"{args.reward}, {trainer.global_step} optimizer steps in {seconds:.0f} s on {torch.get_num_threads()} thread(s)")
    print(f"held-out reward (16 images, fixed noise): {before:.4f} → {after:.4f} ({after - before:+.4f})")
    print(f"grids: {Path(trainer.log_dir or root) / 'samples_before.png'}, samples_after.png")


if __name__ == "__main__":
    main()
