"""What both diffusion modules hold: a text-to-image pipeline split into its parts.

The UNet is the trainable policy (all weights, or a LoRA adapter on its attention projections);
the VAE and the text encoder are frozen; the scheduler is DDIM (converted from whatever the
pipeline ships, as DDPO samples with DDIM). Optimizers, metrics, the random state a resume
restores and the export come from :class:`~lit_pref.modules.base.AlignmentModule`, which the
``lit-pref`` CLI takes; its language-model loading is replaced by the pipeline's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_pref.diffusion.data import ImageRows, ImageTarget
from lit_pref.models import DTYPES, apply_lora
from lit_pref.modules.base import AlignmentModule

# LoRA on the UNet's attention projections unless ``peft`` names other modules (DDPO's and
# diffusers' training scripts' choice).
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def component_path(source: str, component: str) -> str:
    """The local directory of a pipeline's ``component`` (``tokenizer``…), fetched from the Hub
    (only that folder) when ``source`` is a hub id."""
    local = Path(source).expanduser()
    if local.is_dir():
        return str(local / component)
    from huggingface_hub import snapshot_download

    return str(Path(snapshot_download(source, allow_patterns=[f"{component}/*"])) / component)


def torch_dtype(name: str) -> torch.dtype | None:
    """``auto`` → ``None`` (as saved), else the named dtype."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    return dtype if isinstance(dtype, torch.dtype) else None


class DiffusionModule(AlignmentModule):
    """Base of :class:`~lit_pref.modules.DDPO` and :class:`~lit_pref.modules.DiffusionDPO`.

    Args:
        model_name_or_path: a diffusers text-to-image pipeline (hub id or directory with
            ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).
        resolution: image side in pixels (latents are ``resolution`` / the VAE's scale factor).
        dtype: weight dtype of every part (``auto``: as saved).
        peft: LoRA settings for the UNet (``peft.LoraConfig`` fields, default target modules
            the attention projections); ``None`` trains every UNet weight.
        gradient_checkpointing: recompute UNet activations in backward.
        optimizer: optimizer factory (default AdamW at the module's ``default_lr``; 8-bit Adam:
            ``bitsandbytes.optim.AdamW8bit``).
        lr_scheduler: learning-rate scheduler factory.
        output_dir: where the trained pipeline is saved at the end of fit (the LoRA adapter
            alone when ``merge_lora`` is off).
        merge_lora: merge a LoRA adapter into the UNet when saving.
    """

    exported_name = "pipeline"

    def __init__(
        self,
        model_name_or_path: str,
        resolution: int = 512,
        dtype: str = "auto",
        peft: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        output_dir: str | None = None,
        merge_lora: bool = True,
    ) -> None:
        if resolution < 8 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        torch_dtype(dtype)
        super().__init__(
            model_name_or_path=model_name_or_path,
            tokenizer_name_or_path=component_path(model_name_or_path, "tokenizer"),
            dtype=dtype,
            peft=None if peft is None else {"target_modules": UNET_LORA_TARGETS, **peft, "task_type": None},
            gradient_checkpointing=gradient_checkpointing,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            output_dir=output_dir,
            merge_lora=merge_lora,
        )
        self.pipeline_source = model_name_or_path
        self.resolution = resolution
        self.image_rows = ImageRows(self.image_target, resolution)
        self.vae: Any = None
        self.text_encoder: Any = None
        self.scheduler: Any = None

    @property
    def image_target(self) -> ImageTarget:
        return "image_pairs" if self.data_target == "image_pairs" else "prompt_only"

    # ----------------------------------------------------------------- networks
    def load_policy(self) -> Any:
        """The UNet, trainable (LoRA-wrapped when ``peft`` is set)."""
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(
            self.pipeline_source, subfolder="unet", torch_dtype=torch_dtype(self.dtype_name)
        )
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if self.peft_config is not None:
            unet.requires_grad_(False)
            unet = apply_lora(unet, self.peft_config)
        return unet.train()

    def build_networks(self) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler
        from transformers import CLIPTextModel

        super().build_networks()
        dtype = torch_dtype(self.dtype_name)
        self.vae = AutoencoderKL.from_pretrained(self.pipeline_source, subfolder="vae", torch_dtype=dtype)
        self.text_encoder = CLIPTextModel.from_pretrained(self.pipeline_source, subfolder="text_encoder", dtype=dtype)
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False).eval()
        self.scheduler = DDIMScheduler.from_pretrained(self.pipeline_source, subfolder="scheduler")

    def frozen_copy(self) -> torch.nn.Module:
        """A frozen copy of the UNet as it is now (the reference of a full fine-tune)."""
        return copy.deepcopy(self.policy).requires_grad_(False).eval()

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_config(self) -> Any:
        return self.policy.config

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """``[N, L, D]`` text-encoder states, prompts padded to the tokenizer's full length (as
        Stable Diffusion was trained)."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Latents of ``[N, 3, H, W]`` images in [−1, 1] (a draw from the VAE posterior, scaled)."""
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    # -------------------------------------------------------------------- export
    def write_export(self, model: Any, directory: Path) -> None:
        """A whole pipeline directory with the trained UNet (or, unmerged LoRA, its adapter)."""
        from diffusers import StableDiffusionPipeline

        from lit_pref.models import is_peft_model

        if is_peft_model(model):
            model.save_pretrained(directory / "unet_lora")
            return
        pipeline: Any = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=model,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(directory)
