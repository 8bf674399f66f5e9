"""ORPO: supervised fine-tuning plus an odds-ratio preference penalty, without a reference model.

References:
    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (arXiv:2403.07691): odds_θ(y|x) = P_θ(y|x) / (1 − P_θ(y|x)) with P_θ the length-normalised
    (per-token geometric mean) likelihood; L_ORPO = E[L_SFT + λ·L_OR] (Eq. 6) and
    L_OR = −log σ(log(odds_θ(y_w|x) / odds_θ(y_l|x))) (Eq. 7).

Conventions: inputs are ``[B]`` per-example tensors; losses are returned per example and never
reduced; every diagnostic is detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ORPOLossOutput", "log_odds", "orpo_loss"]

_LN2 = math.log(2.0)


@dataclass
class ORPOLossOutput:
    """Result of :func:`orpo_loss`.

    Attributes:
        losses: ``[B]`` per-example ``nll + λ·or_loss`` (the only field carrying a graph).
        nll: ``[B]`` detached SFT term as passed in.
        or_loss: ``[B]`` detached ``−log σ(log OR)``.
        log_odds_ratio: ``[B]`` detached ``log OR = log odds(y_w) − log odds(y_l)``.
        log_odds_chosen: ``[B]`` detached ``log odds(y_w) = log P − log(1 − P)`` of the chosen
            completion.
        chosen_rewards: ``[B]`` detached λ·(mean log-prob of y_w).
        rejected_rewards: ``[B]`` detached λ·(mean log-prob of y_l).
    """

    losses: Tensor
    nll: Tensor
    or_loss: Tensor
    log_odds_ratio: Tensor
    log_odds_chosen: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _log1mexp(x: Tensor) -> Tensor:
    # log(1 − eˣ) for x < 0 (Mächler 2012, "Accurately Computing log(1 − exp(−|a|))"): log1p is
    # exact when eˣ is small, expm1 when x is near 0; the switch at −ln 2 keeps both accurate.
    # Both branches are finite for every x < 0, so torch.where cannot leak a NaN gradient.
    return torch.where(x < -_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: Tensor) -> Tensor:
    """``log odds(y) = log P − log(1 − P)`` from ``log P`` (Hong et al. 2024, odds_θ(y|x)).

    ``log P`` is clamped to ``≤ −eps`` (machine epsilon of the compute dtype) first: at ``log P =
    0`` the odds are infinite, and just below it ``d/dlogP log(1 − P) ≈ −1/|log P|`` explodes.
    With the clamp the log-odds stay ≤ ``log(1/eps)`` and the gradient ≤ ``1/eps``; a clamped row
    has ``P = 1`` to working precision and gets zero gradient through this function. Half and
    bfloat16 inputs are computed in float32 (their eps would cap the odds at a few hundred).
    """
    dtype = torch.promote_types(mean_logps.dtype, torch.float32)
    x = mean_logps.to(dtype).clamp(max=-torch.finfo(dtype).eps)
    return x - _log1mexp(x)


def orpo_loss(
    chosen_mean_logps: Tensor,
    rejected_mean_logps: Tensor,
    chosen_nll: Tensor,
    beta: float,
) -> ORPOLossOutput:
    """Per-example ORPO loss (Hong et al. 2024, Eqs. 6-7).

    ::

        log OR   = log odds_θ(y_w|x) − log odds_θ(y_l|x)
        L_OR     = −log σ(log OR)                              (Eq. 7)
        L_ORPO   = L_SFT + λ·L_OR                              (Eq. 6)

    The paper's λ is called ``beta`` here, as in common ORPO implementations and configs.

    Args:
        chosen_mean_logps: ``[B]`` length-normalised (mean per-token) log-probs of y_w, ``≤ 0``.
            The mean, not the sum: ORPO's P_θ(y|x) is the per-token geometric-mean likelihood,
            which keeps ``1 − P`` away from 1 for long completions.
        rejected_mean_logps: ``[B]`` the same for y_l.
        chosen_nll: ``[B]`` L_SFT, the NLL of y_w (normally the mean per-token NLL).
        beta: λ ≥ 0, the weight of the odds-ratio term (0 reduces ORPO to SFT).

    Returns:
        :class:`ORPOLossOutput`; the result dtype is at least float32.
    """
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta (ORPO's λ) must be a finite number >= 0, got {beta!r}")
    shape = chosen_mean_logps.shape
    if chosen_mean_logps.dim() != 1 or rejected_mean_logps.shape != shape or chosen_nll.shape != shape:
        raise ValueError(
            "chosen_mean_logps, rejected_mean_logps and chosen_nll must share one 1-D [B] shape, got "
            f"{tuple(shape)}, {tuple(rejected_mean_logps.shape)} and {tuple(chosen_nll.shape)}"
        )

    log_odds_chosen = log_odds(chosen_mean_logps)
    log_odds_ratio = log_odds_chosen - log_odds(rejected_mean_logps)
    or_loss = -F.logsigmoid(log_odds_ratio)
    losses = chosen_nll.to(or_loss.dtype) + beta * or_loss

    return ORPOLossOutput(
        losses=losses,
        nll=chosen_nll.detach(),
        or_loss=or_loss.detach(),
        log_odds_ratio=log_odds_ratio.detach(),
        log_odds_chosen=log_odds_chosen.detach(),
        chosen_rewards=beta * chosen_mean_logps.detach(),
        rejected_rewards=beta * rejected_mean_logps.detach(),
    )
