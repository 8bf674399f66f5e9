"""A tiny text-to-image pipeline built entirely locally (the diffusion modules' tests and demo).

The parts are those of Stable Diffusion at toy size: a CLIP tokenizer whose vocabulary is made on
the spot (every byte as a character, no merges), a small CLIP text encoder, a two-block VAE, a
two-block conditional UNet and a DDIM scheduler. Saved, the directory loads as
``StableDiffusionPipeline.from_pretrained`` does, so the modules read it exactly as they read a
real model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Small enough that one DDIM step of a batch of 8 takes a few milliseconds on a CPU core.
TEXT_DIM = 32
LATENT_CHANNELS = 4


def build_tiny_clip_tokenizer(directory: str | Path) -> Any:
    """A CLIP tokenizer over a vocabulary of single byte-characters (every text encodes, one
    token per character), written to and loaded from ``directory``."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    # CLIP marks the end of a word with </w>: each character exists with and without it.
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=32)
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_pipeline(directory: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Build and save a tiny Stable-Diffusion-shaped pipeline to ``directory``.

    Args:
        directory: where to write (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
            ``scheduler/`` and ``model_index.json``).
        seed: weight initialisation seed.
        sample_size: image side in pixels (latents are half of it: the VAE downsamples once).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    tokenizer = build_tiny_clip_tokenizer(directory / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pipeline: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_pref.diffusion.tiny DIR``: write the tiny pipeline the diffusion configs train."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", help="output directory (diffusers format)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-size", type=int, default=32, help="image side in pixels")
    args = parser.parse_args(argv)
    print(build_tiny_pipeline(args.directory, seed=args.seed, sample_size=args.sample_size))


if __name__ == "__main__":
    main()
