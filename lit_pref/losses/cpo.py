"""Reference-free paired preference losses: CPO (and its hinge/IPO variants) and SimPO.

Both methods drop the reference model of DPO. CPO (Xu et al. 2024) assumes a uniform reference
policy, under which π_ref cancels from the DPO logit, and adds a behaviour-cloning NLL term on the
chosen completion. SimPO (Meng et al. 2024) uses length-normalised log-probabilities as the
implicit reward and asks the reward gap to exceed a target margin γ.

References:
    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation" (arXiv:2401.08417), §3: L_CPO = L_prefer + L_NLL.
    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv:2405.14734), Eq. 6.
    Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290), Eq. 7 (the
    sigmoid loss of which L_prefer is the reference-free case).
    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (hinge).
    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (arXiv:2310.12036): the sampled IPO loss.
    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (conservative
    DPO, i.e. label smoothing ε).
    Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment" (arXiv:2501.03884):
    the α-reward ``(1 − π^{−α})/α`` in place of ``log π``.

Conventions: inputs are ``[B]`` per-example sequence log-probabilities; losses are returned per
example and never reduced; rewards are detached diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CPO_LOSS_TYPES",
    "SIMPO_DEFAULT_BETA",
    "SIMPO_DEFAULT_CPO_ALPHA",
    "CPOLossConfig",
    "CPOLossOutput",
    "alpha_reward",
    "cpo_loss",
]

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
# Meng et al. 2024 train SimPO with β around 2 and no NLL term; CPOLossConfig.for_simpo uses these.
SIMPO_DEFAULT_BETA = 2.0
SIMPO_DEFAULT_CPO_ALPHA = 0.0

# Loss types whose preference term is a (smoothable) Bradley-Terry log-likelihood.
_SMOOTHABLE = ("sigmoid", "simpo")


@dataclass(frozen=True)
class CPOLossConfig:
    """Hyper-parameters of :func:`cpo_loss`.

    Attributes:
        loss_type: one of :data:`CPO_LOSS_TYPES`.
        beta: β > 0, the scale of the log-probability difference (for ``ipo`` it sets the target
            gap 1/(2β)).
        label_smoothing: ε ∈ [0, 0.5), the assumed probability that a preference label is flipped
            (conservative DPO). Only ``sigmoid`` and ``simpo`` have a smoothable likelihood, so a
            non-zero ε is rejected for ``hinge`` and ``ipo``.
        cpo_alpha: α ≥ 0, the weight of the NLL (behaviour-cloning) term on the chosen completion.
            ``0`` turns it off.
        simpo_gamma: γ ≥ 0, SimPO's target reward margin (in reward units, i.e. after β). Used by
            ``simpo`` only.
        alpha: AlphaPO's reward shape α (TRL's CPOConfig ``alpha``): every loss type compares
            :func:`alpha_reward` of the log-probs instead of the log-probs themselves; ``0`` is
            the plain log-prob reward.

    For ``simpo`` the defaults above are those of CPO, not of SimPO: Meng et al. recommend β ≈ 2
    and pure SimPO has no NLL term (α = 0). :meth:`for_simpo` builds that configuration
    (:data:`SIMPO_DEFAULT_BETA`, :data:`SIMPO_DEFAULT_CPO_ALPHA`); α > 0 with ``simpo`` is the
    "CPO-SimPO" combination and is allowed.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    cpo_alpha: float = 1.0
    simpo_gamma: float = 1.0
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"unknown CPO loss_type {self.loss_type!r}; expected one of {CPO_LOSS_TYPES}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing!r}; "
                "at 0.5 the two labels are equally likely and the loss carries no preference signal"
            )
        if self.label_smoothing > 0 and self.loss_type not in _SMOOTHABLE:
            raise ValueError(
                f"label_smoothing={self.label_smoothing!r} is only defined for loss_type in {_SMOOTHABLE}, "
                f"got loss_type={self.loss_type!r}; set label_smoothing=0.0 or pick a smoothable loss"
            )
        if not (math.isfinite(self.cpo_alpha) and self.cpo_alpha >= 0):
            raise ValueError(
                f"cpo_alpha must be a finite number >= 0 (0 disables the NLL term), got {self.cpo_alpha!r}"
            )
        if not (math.isfinite(self.simpo_gamma) and self.simpo_gamma >= 0):
            raise ValueError(f"simpo_gamma must be a finite number >= 0, got {self.simpo_gamma!r}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number (0: log-prob rewards), got {self.alpha!r}")

    @classmethod
    def for_simpo(
        cls,
        *,
        beta: float = SIMPO_DEFAULT_BETA,
        simpo_gamma: float = 1.0,
        cpo_alpha: float = SIMPO_DEFAULT_CPO_ALPHA,
        label_smoothing: float = 0.0,
    ) -> CPOLossConfig:
        """A ``simpo`` configuration with SimPO's recommended defaults (β = 2, α = 0)."""
        return cls(
            loss_type="simpo",
            beta=beta,
            label_smoothing=label_smoothing,
            cpo_alpha=cpo_alpha,
            simpo_gamma=simpo_gamma,
        )


@dataclass
class CPOLossOutput:
    """Result of :func:`cpo_loss`.

    Attributes:
        losses: ``[B]`` per-example losses (preference term + α·NLL).
        chosen_rewards: ``[B]`` detached β·r_α(log π_θ(y_w|x)) (length-normalised for SimPO;
            r_0 is the identity, see :func:`alpha_reward`).
        rejected_rewards: ``[B]`` detached β·r_α(log π_θ(y_l|x)).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def alpha_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward of a completion from its log-prob (Gupta et al. 2025, arXiv:2501.03884).

    ``r_α = (1 − p^{−α}) / α`` with ``p = exp(logps)``, written ``−expm1(−α·logps) / α`` so that
    a long completion's tiny ``p`` never underflows to ``0^{−α}``; ``r_α → log p`` as ``α → 0``
    (``alpha = 0`` returns ``logps``). ``dr_α / d log p = p^{−α}``: for α > 0 the reward is
    steeper where ``p`` is small, so less likely completions weigh more in the gradient; for
    α < 0 it is flatter there. With length-normalised log-probs (``simpo``) ``p`` is the
    per-token geometric-mean probability, the paper's setting.
    """
    if alpha == 0.0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def _smoothed_bt_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    # Negative log-likelihood of the observed label under a Bradley-Terry model whose label is
    # flipped with probability ε; logsigmoid keeps it exact for large |logits|.
    loss = -F.logsigmoid(logits)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def _preference_loss(h: Tensor, config: CPOLossConfig) -> Tensor:
    beta, eps = config.beta, config.label_smoothing
    if config.loss_type == "sigmoid":
        # Xu et al. 2024, §3 (L_prefer): DPO (Rafailov et al. 2023, Eq. 7) with a uniform π_ref,
        # which cancels: −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
        return _smoothed_bt_loss(beta * h, eps)
    if config.loss_type == "hinge":
        # SLiC-HF (Zhao et al. 2023): relu(1 − β·h), i.e. a margin of 1/β in log-prob units.
        return F.relu(1 - beta * h)
    if config.loss_type == "ipo":
        # IPO (Azar et al. 2023): regress h onto 1/(2β) instead of pushing it to infinity.
        return (h - 1 / (2 * beta)).square()
    # SimPO (Meng et al. 2024, Eq. 6): −log σ(β·h − γ) with h on length-normalised log-probs.
    # Written as β·(h − γ/β): the target margin γ is a log-prob gap of γ/β.
    return _smoothed_bt_loss(beta * (h - config.simpo_gamma / beta), eps)


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    config: CPOLossConfig,
    *,
    chosen_nll: Tensor | None = None,
) -> CPOLossOutput:
    """Per-example CPO / SimPO loss.

    With ``h = r_α(log π_θ(y_w|x)) − r_α(log π_θ(y_l|x))`` (no reference model; ``r_α`` is
    :func:`alpha_reward`, the log-prob itself for α = 0):

    * ``sigmoid`` (Xu et al. 2024, §3, L_prefer): ``−(1−ε)·log σ(βh) − ε·log σ(−βh)``
    * ``hinge`` (Zhao et al. 2023): ``relu(1 − βh)``
    * ``ipo`` (Azar et al. 2023): ``(h − 1/(2β))²``
    * ``simpo`` (Meng et al. 2024, Eq. 6): ``−(1−ε)·log σ(β(h − γ/β)) − ε·log σ(−β(h − γ/β))``

    and then ``+ α·chosen_nll`` (Xu et al. 2024, §3, L_NLL, the behaviour-cloning regulariser
    that keeps the policy on the chosen distribution).

    For ``simpo`` the caller must pass *length-normalised* log-probs (the mean over completion
    tokens: SimPO's length-normalised reward); the other types normally take summed log-probs. The
    function cannot tell the two apart, so this is the caller's contract.

    Args:
        policy_chosen_logps: ``[B]`` log π_θ(y_w|x).
        policy_rejected_logps: ``[B]`` log π_θ(y_l|x).
        config: loss type and hyper-parameters.
        chosen_nll: ``[B]`` NLL of the chosen completion (with the token normalisation the
            caller wants). Required when ``config.cpo_alpha > 0``; ignored when it is 0.

    Returns:
        :class:`CPOLossOutput` with un-reduced ``[B]`` losses.
    """
    if policy_chosen_logps.dim() != 1 or policy_rejected_logps.shape != policy_chosen_logps.shape:
        raise ValueError(
            "policy_chosen_logps and policy_rejected_logps must share one 1-D [B] shape, got "
            f"{tuple(policy_chosen_logps.shape)} and {tuple(policy_rejected_logps.shape)}"
        )
    use_nll = config.cpo_alpha > 0
    if use_nll and chosen_nll is None:
        raise ValueError(
            f"chosen_nll is required when cpo_alpha > 0 (got cpo_alpha={config.cpo_alpha!r}); "
            "pass the chosen completions' NLL or set cpo_alpha=0.0"
        )
    if use_nll and chosen_nll is not None and chosen_nll.shape != policy_chosen_logps.shape:
        raise ValueError(
            f"chosen_nll must have shape {tuple(policy_chosen_logps.shape)}, got {tuple(chosen_nll.shape)}"
        )

    chosen = alpha_reward(policy_chosen_logps, config.alpha)
    rejected = alpha_reward(policy_rejected_logps, config.alpha)
    losses = _preference_loss(chosen - rejected, config)
    if use_nll and chosen_nll is not None:
        losses = losses + config.cpo_alpha * chosen_nll

    return CPOLossOutput(
        losses=losses,
        chosen_rewards=config.beta * chosen.detach(),
        rejected_rewards=config.beta * rejected.detach(),
    )
