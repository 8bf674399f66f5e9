"""Losses of diffusion-model alignment: DDPO's clipped objective and Diffusion-DPO.

References:
    Black et al. 2023, "Training Diffusion Models with Reinforcement Learning" (DDPO; the
    importance-sampled, clipped objective over denoising steps, §4.3, eq. 4 with PPO's clip).
    Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization"
    (Diffusion-DPO, eq. 14).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from lit_pref.losses.grpo import SurrogateParams, clipped_surrogate


@dataclass
class DDPOLossOutput:
    """Per-sample DDPO loss of one denoising step and its detached diagnostics."""

    loss: Tensor
    approx_kl: Tensor
    clipped: Tensor


def ddpo_loss(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float, adv_clip_max: float
) -> DDPOLossOutput:
    """DDPO-IS with PPO clipping for one denoising step of each sample.

    ``ρ = p_θ(x_{t−1} | x_t, c) / p_θold(x_{t−1} | x_t, c)``, ``Â = clip(A, −a, a)``:
    ``ℓ = −min(ρ Â, clip(ρ, 1 − ε, 1 + ε) Â)`` (Black et al. 2023, eq. 4 trust-region-clipped as
    in Schulman et al. 2017, eq. 7); the gradient at ρ = 1 is the REINFORCE estimator of
    eq. 3. Also ``approx_kl = ½ (log ρ)²`` and whether the clip was active, per sample.

    Args:
        log_probs: ``[B]`` log p_θ of the steps taken (with grad).
        old_log_probs: ``[B]`` log p_θold recorded while sampling.
        advantages: ``[B]`` normalised rewards of the samples.
        clip_range: ε (DDPOConfig's ``train_clip_range``, 1e-4 by default there).
        adv_clip_max: a (``train_adv_clip_max``).
    """
    if clip_range <= 0 or adv_clip_max <= 0:
        raise ValueError(f"clip_range and adv_clip_max must be > 0, got {clip_range} and {adv_clip_max}")
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()
    clipped_adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    terms = clipped_surrogate(ratio, log_probs, clipped_adv, SurrogateParams(clip_range, clip_range))
    return DDPOLossOutput(
        terms.loss,
        (0.5 * log_ratio.square()).detach(),
        ((ratio - 1).abs() > clip_range).float().detach(),
    )


def normalized_advantages(rewards: Tensor, mean: Tensor, std: Tensor, eps: float = 1e-6) -> Tensor:
    """``(r − μ) / (σ + eps)``: DDPO's advantage, with μ, σ those of the prompt (stat tracking)
    or of the whole batch."""
    return (rewards - mean) / (std + eps)


@dataclass
class DiffusionDPOOutput:
    """Per-pair Diffusion-DPO loss and detached diagnostics.

    Attributes:
        loss: ``[B]``.
        chosen_rewards: ``[B]`` ``−β/2 (‖ε^w − ε_θ‖² − ‖ε^w − ε_ref‖²)``: the implicit reward
            of the chosen image (positive when the policy denoises it better than the reference).
        rejected_rewards: ``[B]`` the same for the rejected image.
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def diffusion_dpo_loss(
    policy_chosen_mse: Tensor,
    policy_rejected_mse: Tensor,
    ref_chosen_mse: Tensor,
    ref_rejected_mse: Tensor,
    beta: float,
) -> DiffusionDPOOutput:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14), on one shared noise draw and timestep per pair:

    ``L = −log σ(−β/2 [(‖ε^w − ε_θ(x^w_t, t)‖² − ‖ε^w − ε_ref(x^w_t, t)‖²)
    − (‖ε^l − ε_θ(x^l_t, t)‖² − ‖ε^l − ε_ref(x^l_t, t)‖²)])``.

    The paper's ``T ω(λ_t)`` is folded into β (constant weighting, as its released training
    code does); the ½ is that code's, so β values carry over (e.g. 5000 for SD 1.5, 2500 for
    SDXL). Policy = reference gives ``ln 2``; denoising the chosen image better than the
    reference does (a lower error) lowers the loss.

    Args:
        policy_chosen_mse: ``[B]`` mean squared noise-prediction error of the policy on the
            noised chosen latents; the others likewise for the rejected latents / the reference.
        beta: β > 0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen = -0.5 * beta * (policy_chosen_mse - ref_chosen_mse)
    rejected = -0.5 * beta * (policy_rejected_mse - ref_rejected_mse)
    return DiffusionDPOOutput(-F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach())


# Diffusion-DPO's loss when the policy is the reference: nothing learned yet.
DIFFUSION_DPO_UNTRAINED_LOSS = math.log(2.0)


def noise_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``[B]`` mean over a sample's elements of ``(pred − target)²``, in float32."""
    return (pred.float() - target.float()).square().mean(dim=tuple(range(1, pred.ndim)))

