"""The rollout engine's log-probs against the trainer's: the mismatch and its truncated
importance-sampling correction.

An engine with its own kernels (vLLM) samples token ``o_t`` from π_engine, which differs from
π_old, the same weights evaluated by the trainer (other kernels, other reduction orders, bf16
rounding, top-p / top-k renormalisation). The PPO / GRPO objectives are expectations under
π_old, so a rollout from π_engine is off-policy; the per-token weight
``π_old(o_t) / π_engine(o_t)`` corrects for it, truncated at ``C`` to bound its variance.

References:
    Ionides 2008, "Truncated Importance Sampling" (J. Comput. Graph. Stat. 17(2)).
    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
    (truncated importance sampling, TIS, for the vLLM / trainer mismatch).
"""

from __future__ import annotations

import torch
from torch import Tensor


def logp_mismatch(old_logps: Tensor, sampler_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, max)`` of ``|log π_old(o_t) − log π_engine(o_t)|`` over the completion tokens.

    Tokens the engine gave no log-prob (NaN) are left out; with no token left both are 0.

    Args:
        old_logps: ``[B, T]`` the trainer's log-probs of the sampled tokens.
        sampler_logps: ``[B, T]`` the engine's log-probs of the same tokens.
        mask: ``[B, T]`` completion mask.
    """
    with torch.no_grad():
        diff = (old_logps - sampler_logps).abs()
        diff = diff[mask.bool() & ~diff.isnan()]
        if diff.numel() == 0:
            zero = torch.zeros((), dtype=old_logps.dtype, device=old_logps.device)
            return zero, zero
        return diff.mean(), diff.max()


def truncated_is_weights(old_logps: Tensor, sampler_logps: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Per-token truncated importance weights ``w_t = min(π_old(o_t) / π_engine(o_t), C)``.

    ``w_t = min(exp(log π_old − log π_engine), C)`` (Ionides 2008; Yao et al. 2025), detached:
    it multiplies each token's policy loss, ``Σ_t w_t ℓ_t``, so the gradient estimated from
    π_engine's samples is that of the objective under π_old, up to the truncation's bias. The
    weight is 1 off the mask and where the engine gave no log-prob (NaN), so those tokens are
    left as they are.

    Args:
        old_logps: ``[B, T]`` the trainer's log-probs of the sampled tokens (π_old).
        sampler_logps: ``[B, T]`` the engine's log-probs of the same tokens (π_engine).
        mask: ``[B, T]`` completion mask.
        cap: C > 0, the truncation.

    Returns:
        ``[B, T]`` detached weights in ``(0, C]``.
    """
    if not cap > 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    with torch.no_grad():
        log_ratio = torch.where(mask.bool(), old_logps - sampler_logps, torch.zeros_like(old_logps))
        return torch.exp(torch.nan_to_num(log_ratio, nan=0.0)).clamp(max=cap)
