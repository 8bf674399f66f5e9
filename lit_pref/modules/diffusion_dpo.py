"""Diffusion-DPO (Wallace et al. 2023): offline preference optimisation of a text-to-image
diffusion model on (prompt, chosen image, rejected image) pairs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_pref.diffusion.module import DiffusionModule
from lit_pref.losses.diffusion import DIFFUSION_DPO_UNTRAINED_LOSS, diffusion_dpo_loss, noise_mse
from lit_pref.models import is_peft_model


class DiffusionDPO(DiffusionModule):
    """Diffusion-DPO: the policy UNet learns to denoise chosen images better, and rejected ones
    worse, than a frozen reference UNet does (Wallace et al. 2023, eq. 14).

    Each step encodes both images of every pair with the frozen VAE, noises them with one noise
    draw and one timestep per pair (uniform over the scheduler's training timesteps), and
    compares the policy's and the reference's noise-prediction errors
    (:func:`~lit_pref.losses.diffusion.diffusion_dpo_loss`). The reference is a frozen copy of
    the starting UNet, or — with ``peft`` — the same UNet with its adapter disabled (no second
    copy in memory); which one is logged at start-up.

    Data: ``PreferenceDataModule`` rows with ``prompt``, ``chosen`` and ``rejected`` image
    columns (see :mod:`lit_pref.diffusion.data`).

    Logged: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins`` (implicit rewards), ``mse/chosen``, ``mse/rejected`` (the policy's).

    Args:
        beta: β of the loss (the paper's β·T; 5000 for SD 1.5, 2500 for SDXL).
        **kwargs: :class:`~lit_pref.diffusion.module.DiffusionModule` arguments.
    """

    data_target = "image_pairs"
    default_lr = 1e-8 * 2048  # the paper's 1e-8 per image at its batch of 2048 pairs, linearly scaled
    stuck_loss = DIFFUSION_DPO_UNTRAINED_LOSS

    def __init__(self, beta: float = 5000.0, **kwargs: Any) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        super().__init__(**kwargs)
        self.beta = beta
        self.ref_unet: torch.nn.Module | None = None

    def build_networks(self) -> None:
        super().build_networks()
        if is_peft_model(self.policy):
            rank_zero_info("Diffusion-DPO reference: the UNet with its LoRA adapter disabled")
        else:
            self.ref_unet = self.frozen_copy()
            rank_zero_info("Diffusion-DPO reference: a frozen copy of the starting UNet")

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The reference UNet, for the duration of the block."""
        if self.ref_unet is not None:
            yield self.ref_unet
        else:
            with self.policy.disable_adapter():
                yield self.policy

    def shared_step(self, batch: dict[str, Any], split: str) -> tuple[Tensor, dict[str, Tensor]]:
        pairs = len(batch["prompt"])
        latents = self.encode_images(torch.cat([batch["chosen_pixels"], batch["rejected_pixels"]]))
        # One noise draw and timestep per pair, shared by its two images (the loss compares them).
        noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (pairs,), device=self.device).repeat(2)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.scheduler.config.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        embeds = self.encode_prompts(batch["prompt"]).repeat(2, 1, 1)
        policy_mse = noise_mse(self.policy(noisy, timesteps, encoder_hidden_states=embeds).sample, target)
        with torch.no_grad(), self.reference() as ref:
            ref_mse = noise_mse(ref(noisy, timesteps, encoder_hidden_states=embeds).sample, target)
        out = diffusion_dpo_loss(policy_mse[:pairs], policy_mse[pairs:], ref_mse[:pairs], ref_mse[pairs:], self.beta)
        metrics = {
            "loss": out.loss.detach(),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "mse/chosen": policy_mse[:pairs].detach(),
            "mse/rejected": policy_mse[pairs:].detach(),
        }
        return out.loss.mean(), metrics
