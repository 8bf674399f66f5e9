"""DDIM sampling that records what DDPO trains on: every step's latents and its log-probability.

Black et al. 2023 ("Training Diffusion Models with Reinforcement Learning", §4.2) treat each
denoising step as an action of a Markov decision process: with η > 0 the DDIM update
(Song et al. 2021, eq. 12) is a Gaussian ``x_{t−1} ~ N(μ_θ(x_t, t), σ_t² I)``, so the
log-likelihood of the step actually taken is exact and cheap, and a policy-gradient ratio
``p_θ(x_{t−1} | x_t) / p_θold(x_{t−1} | x_t)`` can be formed per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def ddim_step(
    scheduler: Any,
    noise_pred: Tensor,
    timesteps: Tensor,
    latents: Tensor,
    eta: float,
    prev_latents: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step ``x_t → x_{t−1}`` per sample and its log-probability.

    With ``ᾱ`` the scheduler's cumulative alphas, ``Δ = num_train_timesteps // num_steps`` and
    ε̂ the predicted noise (Song et al. 2021, eq. 12 and 16):

    ``x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t``,
    ``σ_t = η √((1 − ᾱ_{t−Δ}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t−Δ})``,
    ``μ = √ᾱ_{t−Δ} x̂_0 + √(1 − ᾱ_{t−Δ} − σ_t²) ε̂``,  ``x_{t−1} = μ + σ_t z``,

    ``log p(x_{t−1} | x_t) = −‖x_{t−1} − μ‖² / (2σ_t²) − log σ_t − ½ log 2π``, averaged (not
    summed) over the latent's elements as in the DDPO reference code, which keeps the ratio's
    scale independent of the image size (the clip range 1e-4 is tuned for it).

    Args:
        scheduler: a diffusers ``DDIMScheduler`` whose ``set_timesteps`` has been called.
        noise_pred: ``[B, C, h, w]`` ε̂ (after classifier-free guidance).
        timesteps: ``[B]`` (or a scalar) the current t of each sample.
        latents: ``[B, C, h, w]`` x_t.
        eta: η > 0 (η = 0 is deterministic DDIM, which has no likelihood).
        prev_latents: the x_{t−1} to score (training); ``None`` samples one (rollout).
        generator: the noise source when sampling (default: the global stream).

    Returns:
        ``(x_{t−1}, log p [B])``.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a step to have a log-probability, got {eta}")
    config = scheduler.config
    t = torch.as_tensor(timesteps, device=latents.device).long().expand(latents.shape[0])
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=latents.device)
    shape = (-1,) + (1,) * (latents.ndim - 1)
    alpha_t = alphas[t].view(shape)
    alpha_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final).view(shape)
    x_t, eps = latents.float(), noise_pred.float()
    x0 = (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_latents is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        prev_latents = (mean + std * noise).to(latents.dtype)
    log_prob = -((prev_latents.float().detach() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return prev_latents, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def guided_noise(
    unet: torch.nn.Module, latents: Tensor, timestep: Tensor | int, embeds: Tensor, negative: Tensor, guidance_scale: float
) -> Tensor:
    """ε̂ with classifier-free guidance (Ho & Salimans 2022): ``ε_∅ + w (ε_c − ε_∅)``; one
    conditional pass when ``w = 1``."""
    if guidance_scale == 1.0:
        return unet(latents, timestep, encoder_hidden_states=embeds).sample
    both = unet(torch.cat([latents, latents]), timestep, encoder_hidden_states=torch.cat([negative, embeds])).sample
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@dataclass
class DiffusionRollout:
    """Sampled images and the trajectories that produced them.

    Attributes:
        prompts: ``N`` prompt texts.
        metadata: ``N`` dicts of the prompts' other dataset columns (passed to rewards).
        embeds: ``[N, L, D]`` text-encoder states of the prompts.
        latents: ``[N, S + 1, C, h, w]`` x_T … x_0 (``S`` denoising steps).
        log_probs: ``[N, S]`` log p_θold of each step taken.
        timesteps: ``[S]`` the scheduler's timesteps, in sampling order.
        negative: ``[1, L, D]`` text-encoder states of the guidance's negative prompt (the same
            for every sample; kept so training re-scores steps without encoding it again).
        images: ``[N, 3, H, W]`` decoded images in [0, 1].
    """

    prompts: list[str]
    metadata: list[dict[str, Any]]
    embeds: Tensor
    latents: Tensor
    log_probs: Tensor
    timesteps: Tensor
    negative: Tensor
    images: Tensor = field(repr=False)

    def select(self, rows: Tensor) -> DiffusionRollout:
        """The sub-rollout of samples ``rows``."""
        picked = rows.tolist()
        return DiffusionRollout(
            [self.prompts[i] for i in picked],
            [self.metadata[i] for i in picked],
            self.embeds[rows],
            self.latents[rows],
            self.log_probs[rows],
            self.timesteps,
            self.negative,
            self.images[rows],
        )


@torch.no_grad()
def sample_trajectories(
    unet: Any,
    vae: Any,
    scheduler: Any,
    embeds: Tensor,
    negative: Tensor,
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    latent_size: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Denoise ``len(embeds)`` latents from Gaussian noise with :func:`ddim_step`.

    Returns ``(latents [N, S + 1, C, h, w], log_probs [N, S], timesteps [S], images
    [N, 3, H, W] in [0, 1])``. All noise comes from ``generator`` (default: the global
    stream of the device), so a restored random state repeats the samples.
    """
    scheduler.set_timesteps(num_steps, device=embeds.device)
    shape = (embeds.shape[0], unet.config.in_channels, latent_size, latent_size)
    x = torch.randn(shape, generator=generator, device=embeds.device, dtype=embeds.dtype) * scheduler.init_noise_sigma
    trajectory, log_probs = [x], []
    for t in scheduler.timesteps:
        eps = guided_noise(unet, scheduler.scale_model_input(x, t), t, embeds, negative, guidance_scale)
        x, log_prob = ddim_step(scheduler, eps, t, x, eta, generator=generator)
        trajectory.append(x)
        log_probs.append(log_prob)
    images = vae.decode(x / vae.config.scaling_factor).sample
    return (
        torch.stack(trajectory, dim=1),
        torch.stack(log_probs, dim=1),
        scheduler.timesteps.clone(),
        (images.float() / 2 + 0.5).clamp(0, 1),
    )
