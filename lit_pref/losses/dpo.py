"""Direct preference optimisation losses on per-sequence log-probabilities.

Every loss here is a pure function of the policy's and the reference's log-probabilities of a
chosen and a rejected completion, and returns one value per example (``[B]``, never reduced), so
the caller decides how to reduce and can reweight, mask or log per example.

Notation used throughout (all ``[B]``):

* ``logratio_c = log π(y_w|x) − log π_ref(y_w|x)`` and ``logratio_r`` likewise for ``y_l``, from
  log-probs *summed* over the completion tokens (or LD-DPO's weighted sums);
* ``ψ(ℓ) = f'(e^ℓ) − f'(1)``, the f-DPO score of a log-ratio (``ψ(ℓ) = ℓ`` under the reverse KL of
  plain DPO, see :func:`_score`), and ``h = ψ(logratio_c) − ψ(logratio_r)`` the margin;
* for the length-normalised losses (``ipo``, ``sigmoid_norm``) every quantity is divided by the
  number of tokens of its own completion, ``|y_w|`` or ``|y_l|``, so ``h = ψ(ℓ_c)/|y_w| − ψ(ℓ_r)/|y_l|``;
* ``β`` the strength of the KL constraint, ``ε`` the label-smoothing (flip) probability.

Each loss type is one small function declared once in :data:`DPO_LOSSES` with its properties (which
log-probs it is defined on, whether it takes ε, a reference-free form, an f-divergence); the
configuration is validated from those declarations. :data:`DPO_LOSS_ALIASES` holds the other
spellings accepted for the same losses.

References (one per loss type, cited again next to each formula):
    Rafailov et al. 2023, "Direct Preference Optimization" (``sigmoid``, eq. 7).
    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO smoothing).
    Zhao et al. 2023, "SLiC-HF" and Liu et al. 2024, "Statistical Rejection Sampling Improves
    Preference Optimization" (``hinge``).
    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (``ipo``, eq. 17).
    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment" (``exo_pair``,
    eq. 16).
    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards" (``nca_pair``).
    Chowdhury et al. 2024, "Provably Robust DPO" (``robust``).
    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment" (``bco_pair``).
    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment" (``sppo_hard``).
    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
    (``aot``, ``aot_unpaired``).
    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions"
    (``apo_zero``, eq. 7; ``apo_down``, eq. 8).
    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models" (``discopop``, the LRML objective, eq. 5).
    Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models via
    Mixed Preference Optimization" (``sft`` and weighted combinations of loss types).
    Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints" (f-DPO, Table 1).
    Pang et al. 2024, "Iterative Reasoning Preference Optimization" (``rpo_alpha``).
    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization" (:func:`wpo_weights`, eq. 2).
    Liu et al. 2024, "Length Desensitization in Preference Optimization" (:func:`ld_sequence_logps`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_pref.ops import masked_mean, masked_sum

F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# EXO needs ε > 0 (it appears as log ε), so hard labels are approximated by a small flip rate.
_EXO_DEFAULT_EPSILON = 1e-3


@dataclass(frozen=True)
class DPOLossConfig:
    """Which DPO-family losses to combine and their hyper-parameters.

    Validation happens at construction so a bad config fails before any model is loaded.

    Attributes:
        loss_type: One or more names from :data:`DPO_LOSS_TYPES` or :data:`DPO_LOSS_ALIASES`
            (normalised to the canonical names); a single string is accepted and normalised to a
            1-tuple. Several types are combined as ``Σ_i w_i · loss_i`` (MPO).
        loss_weights: One weight per loss type; ``None`` means 1.0 each.
        beta: KL-constraint strength β (> 0).
        label_smoothing: Label flip probability ε in ``[0, 0.5)``, used by the losses declared
            with ``label_smoothing`` in :data:`DPO_LOSSES` (sigmoid and sigmoid_norm as cDPO,
            robust, exo_pair, the aot losses). In a combination it applies only to those types; at
            least one of them must be present when ε > 0.
        reference_free: Treat the reference log-probs as 0 (only for losses declared
            ``reference_free``).
        f_divergence_type: One of :data:`F_DIVERGENCES` (f-DPO); anything but ``reverse_kl`` needs
            a reference and margin-based losses only.
        f_alpha_divergence_coef: α of the α-divergence, in Wang et al. 2023's convention
            (``f'(u) = (1 − u^{−α})/α``: α → 0 is reverse KL, α = 1 forward KL). TRL's
            ``f_alpha_divergence_coef`` is ``1 − α`` of this one; the two agree at the default 0.5.
        discopop_tau: Temperature τ (> 0) of DiscoPOP's mixing gate.
        rpo_alpha: If set (≥ 0), adds ``rpo_alpha · NLL(chosen)`` (RPO).
        use_weighting: Multiply each example's loss by its WPO weight (:func:`wpo_weights`).
            The weights are per example, so this cannot be combined with the sorted aot losses.
        ld_alpha: LD-DPO weight in ``[0, 1]`` for tokens beyond the public length; consumed by the
            caller through :func:`ld_sequence_logps`, not by :func:`dpo_loss`.
        length_normalize: ``None`` (default): each loss gets the log-probs it is defined on — sums
            for all but ``ipo`` and ``sigmoid_norm``, which divide by the completion length.
            ``True``: every loss in the list is length-normalised; ``False``: none is (IPO then
            regresses summed log-ratios).
    """

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    rpo_alpha: float | None = None
    use_weighting: bool = False
    ld_alpha: float | None = None
    length_normalize: bool | None = None

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise through object.__setattr__ so configs from YAML (lists) or a
        # bare string behave like the documented tuples, and every alias reads as its loss.
        names = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        object.__setattr__(self, "loss_type", tuple(DPO_LOSS_ALIASES.get(name, name) for name in names))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        self._validate_loss_types()
        self._validate_scalars()
        self._validate_compatibility()

    @property
    def resolved_loss_weights(self) -> tuple[float, ...]:
        """The weight of each loss type, with ``None`` expanded to 1.0 each."""
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_type)

    def normalizes(self, name: str) -> bool:
        """Whether loss ``name`` reads length-normalised log-ratios under this configuration."""
        return DPO_LOSSES[name].length_normalized if self.length_normalize is None else self.length_normalize

    def _with(self, prop: str) -> list[str]:
        return [name for name in self.loss_type if getattr(DPO_LOSSES[name], prop)]

    def _validate_loss_types(self) -> None:
        if not self.loss_type:
            raise ValueError(f"loss_type is empty; choose at least one of {DPO_LOSS_TYPES}")
        for name in self.loss_type:
            if name not in DPO_LOSSES:
                raise ValueError(
                    f"unknown loss_type {name!r}; valid loss types are {DPO_LOSS_TYPES} "
                    f"(also accepted: {sorted(DPO_LOSS_ALIASES)})"
                )
        duplicates = sorted({name for name in self.loss_type if self.loss_type.count(name) > 1})
        if duplicates:
            raise ValueError(f"loss_type lists {duplicates} more than once; merge them into one weight")
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(self.loss_type):
                raise ValueError(
                    f"loss_weights has {len(self.loss_weights)} entries but loss_type {self.loss_type} "
                    f"has {len(self.loss_type)}; give one weight per loss type or None for equal weights"
                )
            for name, weight in zip(self.loss_type, self.loss_weights, strict=True):
                if not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"loss weight {weight} for {name!r} must be finite and >= 0")
        if self.length_normalize is False and "sigmoid_norm" in self.loss_type:
            raise ValueError(
                "sigmoid_norm is the length-normalised sigmoid; drop length_normalize=False or use sigmoid"
            )

    def _validate_scalars(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            # ε = 0.5 makes the labels pure noise (and divides by zero in rDPO's 1 − 2ε).
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(
                f"unknown f_divergence_type {self.f_divergence_type!r}; valid types are {F_DIVERGENCES}"
            )
        if self.f_divergence_type == "alpha_divergence" and not (
            math.isfinite(self.f_alpha_divergence_coef) and self.f_alpha_divergence_coef > 0
        ):
            raise ValueError(f"f_alpha_divergence_coef must be > 0, got {self.f_alpha_divergence_coef}")
        if "discopop" in self.loss_type and not (math.isfinite(self.discopop_tau) and self.discopop_tau > 0):
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")
        if self.rpo_alpha is not None and not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
            raise ValueError(f"rpo_alpha must be None or a finite number >= 0, got {self.rpo_alpha}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be None or in [0, 1], got {self.ld_alpha}")

    def _validate_compatibility(self) -> None:
        if self.label_smoothing > 0 and not self._with("label_smoothing"):
            raise ValueError(
                f"label_smoothing={self.label_smoothing} has no effect on loss_type {self.loss_type}; "
                f"it is used only by {sorted(_names_with('label_smoothing'))} — set it to 0.0"
            )
        if self.reference_free:
            needs_ref = [name for name in self.loss_type if not DPO_LOSSES[name].reference_free]
            if needs_ref:
                raise ValueError(
                    f"loss types {needs_ref} need reference log-probs and cannot run with "
                    f"reference_free=True; reference-free losses are {sorted(REFERENCE_FREE_COMPATIBLE)}"
                )
        if self.f_divergence_type != "reverse_kl":
            if self.reference_free:
                raise ValueError(
                    f"f_divergence_type={self.f_divergence_type!r} constrains the ratio π/π_ref and "
                    "needs a reference model; use reverse_kl with reference_free=True"
                )
            reward_losses = [name for name in self.loss_type if name != "sft"]
            unsupported = [name for name in reward_losses if not DPO_LOSSES[name].f_divergence]
            if unsupported or not reward_losses:
                raise ValueError(
                    f"f_divergence_type={self.f_divergence_type!r} is defined only for margin losses "
                    f"{sorted(_names_with('f_divergence'))}; loss_type {self.loss_type} has "
                    f"{unsupported or 'none of them'}"
                )
        if self.use_weighting:
            sorted_losses = sorted(name for name in self.loss_type if not DPO_LOSSES[name].per_example)
            if sorted_losses:
                raise ValueError(
                    f"use_weighting=True weights examples, but {sorted_losses} return per-quantile "
                    "(batch-sorted) losses; drop one of them"
                )


@dataclass
class DPOLossOutput:
    """Per-example loss and implicit rewards.

    Attributes:
        losses: ``[B]`` differentiable loss: the weighted sum over loss types, plus the RPO term,
            times the WPO weights when used. For the aot losses entry ``i`` is the ``i``-th
            quantile rather than example ``i``; the batch mean is unaffected.
        chosen_rewards: ``[B]`` detached ``β·logratio_c`` of the log-probs as passed (summed for
            the training module, whatever the loss types normalise; reference = 0 when
            reference-free).
        rejected_rewards: ``[B]`` detached ``β·logratio_r``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class _Terms(NamedTuple):
    """Everything a loss may read, computed once per call (and once more, length-normalised)."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    logratio_chosen: Tensor
    logratio_rejected: Tensor
    margin: Tensor  # h = ψ(ℓ_c) − ψ(ℓ_r), see _score
    chosen_nll: Tensor | None


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    config: DPOLossConfig,
    *,
    chosen_nll: Tensor | None = None,
    weights: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> DPOLossOutput:
    """Per-example DPO-family loss for the loss type(s) in ``config``.

    ``losses = w_WPO · (Σ_i w_i · loss_i + rpo_alpha · chosen_nll)``.

    Args:
        policy_chosen_logps: ``[B]`` log π(y_w|x), summed over the completion tokens (or LD-DPO's
            weighted sum).
        policy_rejected_logps: ``[B]`` log π(y_l|x).
        ref_chosen_logps: ``[B]`` log π_ref(y_w|x); may be ``None`` only when
            ``config.reference_free``, and is ignored (treated as 0) in that case.
        ref_rejected_logps: ``[B]`` log π_ref(y_l|x), same rules.
        config: The loss configuration.
        chosen_nll: ``[B]`` mean token NLL of the chosen completion; required for ``sft`` and
            ``rpo_alpha``, otherwise ignored.
        weights: ``[B]`` WPO weights; required if and only if ``config.use_weighting``.
        chosen_lengths: ``[B]`` number of completion tokens of y_w, by which the length-normalised
            losses (:meth:`DPOLossConfig.normalizes`) divide the scores. ``None``: the log-probs
            are taken as already normalised (length 1), for callers that pass length-averaged
            log-probs themselves.
        rejected_lengths: ``[B]`` the same for y_l; given together with ``chosen_lengths``.

    Returns:
        A :class:`DPOLossOutput` with ``[B]`` tensors.
    """
    _check_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, config)
    needs_nll = "sft" in config.loss_type or config.rpo_alpha is not None
    if needs_nll:
        if chosen_nll is None:
            raise ValueError("chosen_nll is required when loss_type contains 'sft' or rpo_alpha is set")
        _check_shape("chosen_nll", chosen_nll, policy_chosen_logps)
    if config.use_weighting:
        if weights is None:
            raise ValueError("weights (from wpo_weights) are required when use_weighting=True")
        _check_shape("weights", weights, policy_chosen_logps)
    elif weights is not None:
        raise ValueError("weights were given but use_weighting=False; set use_weighting=True to apply them")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths are given together or not at all")
    if chosen_lengths is not None and rejected_lengths is not None:
        _check_shape("chosen_lengths", chosen_lengths, policy_chosen_logps)
        _check_shape("rejected_lengths", rejected_lengths, policy_chosen_logps)

    if config.reference_free or ref_chosen_logps is None or ref_rejected_logps is None:
        ref_chosen = torch.zeros_like(policy_chosen_logps)
        ref_rejected = torch.zeros_like(policy_rejected_logps)
    else:
        # The reference is a constant of the objective in every paper here; detaching guards against
        # reference log-probs computed from the policy's own weights (e.g. adapters disabled) with grad.
        ref_chosen, ref_rejected = ref_chosen_logps.detach(), ref_rejected_logps.detach()

    summed = _terms(policy_chosen_logps, policy_rejected_logps, ref_chosen, ref_rejected, chosen_nll, config)
    normalised = summed
    if any(config.normalizes(name) for name in config.loss_type) and chosen_lengths is not None:
        assert rejected_lengths is not None  # checked above
        # The same clamp as CompletionLogps.mean: an empty completion divides by 1, not 0.
        n_c = chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
        n_r = rejected_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
        normalised = _terms(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen,
            ref_rejected,
            chosen_nll,
            config,
            (n_c, n_r),
        )

    losses = torch.zeros_like(policy_chosen_logps)
    for name, weight in zip(config.loss_type, config.resolved_loss_weights, strict=True):
        terms = normalised if config.normalizes(name) else summed
        losses = losses + weight * DPO_LOSSES[name].loss(terms, config)
    if config.rpo_alpha is not None:
        assert chosen_nll is not None  # checked above
        losses = losses + config.rpo_alpha * chosen_nll
    if weights is not None:
        losses = losses * weights.detach()

    return DPOLossOutput(
        losses=losses,
        chosen_rewards=(config.beta * summed.logratio_chosen).detach(),
        rejected_rewards=(config.beta * summed.logratio_rejected).detach(),
    )


def _terms(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_nll: Tensor | None,
    config: DPOLossConfig,
    lengths: tuple[Tensor, Tensor] | None = None,
) -> _Terms:
    """The terms on summed log-probs, or with every per-sequence quantity divided by its length.

    ψ is applied to the *sequence* log-ratio before dividing, because f-DPO's ψ is defined on the
    sequence ratio π(y|x)/π_ref(y|x); dividing afterwards is the IPO length normalisation (Azar et
    al. 2023's experiments use per-token averages). Under reverse KL ψ is the identity, so this is
    the same as IPO on mean log-probs; for the other divergences neither paper defines the
    combination, and this order (TRL's) keeps ψ on the quantity f-DPO derives it for.
    """
    logratio_chosen = policy_chosen - ref_chosen
    logratio_rejected = policy_rejected - ref_rejected
    score_chosen = _score(logratio_chosen, config)
    score_rejected = _score(logratio_rejected, config)
    if lengths is not None:
        n_c, n_r = lengths
        policy_chosen, ref_chosen, logratio_chosen = (
            policy_chosen / n_c,
            ref_chosen / n_c,
            logratio_chosen / n_c,
        )
        policy_rejected, ref_rejected = policy_rejected / n_r, ref_rejected / n_r
        logratio_rejected = logratio_rejected / n_r
        score_chosen, score_rejected = score_chosen / n_c, score_rejected / n_r
    return _Terms(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        logratio_chosen=logratio_chosen,
        logratio_rejected=logratio_rejected,
        margin=score_chosen - score_rejected,
        chosen_nll=chosen_nll,
    )


def _check_shape(name: str, tensor: Tensor, like: Tensor) -> None:
    if tensor.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}")


def _check_inputs(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    config: DPOLossConfig,
) -> None:
    if policy_chosen.ndim != 1:
        raise ValueError(f"log-probs must be per-sequence [B], got shape {tuple(policy_chosen.shape)}")
    _check_shape("policy_rejected_logps", policy_rejected, policy_chosen)
    if config.reference_free:
        return
    if ref_chosen is None or ref_rejected is None:
        raise ValueError("ref_chosen_logps and ref_rejected_logps are required unless reference_free=True")
    _check_shape("ref_chosen_logps", ref_chosen, policy_chosen)
    _check_shape("ref_rejected_logps", ref_rejected, policy_chosen)


def _score(logratio: Tensor, config: DPOLossConfig) -> Tensor:
    """``ψ(ℓ) = f'(e^ℓ) − f'(1)``: the f-DPO reward of log-ratio ℓ over β (Wang et al. 2023, Table 1).

    f-DPO's implicit reward is ``β·f'(π/π_ref)`` up to a per-prompt constant; in a margin any
    constant cancels, but once chosen and rejected scores are divided by different lengths
    (IPO, sigmoid_norm) it would not, so the constant is fixed by ``ψ(0) = 0`` (no reward where the
    policy equals the reference). With ``u = e^ℓ``:

    * reverse KL, ``f(u) = u log u``: ``f'(u) = log u + 1`` → ``ψ = ℓ`` (plain DPO);
    * forward KL, ``f(u) = −log u``: ``f'(u) = −1/u`` → ``ψ = 1 − e^{−ℓ}``;
    * Jensen–Shannon, ``f(u) = u log u − (u+1) log((u+1)/2)``: ``f'(u) = log(2u/(1+u))``
      → ``ψ = log 2 + log σ(ℓ)``;
    * α-divergence, ``f(u) = (u^{1−α} − (1−α)u − α)/(α(α−1))``: ``f'(u) = (1 − u^{−α})/α``
      → ``ψ = (1 − e^{−αℓ})/α``. This is the paper's α (→ 0: reverse KL, 1: forward KL); TRL
      writes ``f'(u) = (u^{α'−1} − 1)/(α'−1)``, the same function at ``α' = 1 − α``.

    Log-space forms avoid forming u itself, which over/underflows for sequence-level ratios.
    """
    kind = config.f_divergence_type
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return -torch.expm1(-logratio)
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":
        alpha = config.f_alpha_divergence_coef
        return -torch.expm1(-alpha * logratio) / alpha
    raise ValueError(f"unknown f_divergence_type {kind!r}; valid types are {F_DIVERGENCES}")


def _smoothed_sigmoid(logits: Tensor, epsilon: float) -> Tensor:
    """``−(1−ε) log σ(z) − ε log σ(−z)``: BCE of the Bradley–Terry probability against a label that is
    flipped with probability ε (Mitchell 2023, cDPO)."""
    return -(1.0 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)


def _sigmoid_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), cDPO-smoothed: ``−(1−ε) log σ(βh) − ε log σ(−βh)``.

    TRL 1.16 applies no ε to its sigmoid loss; cDPO (Mitchell 2023) is kept here, so for ε > 0 this
    is ``(1−ε)·TRL(y_w, y_l) + ε·TRL(y_l, y_w)``. As ``sigmoid_norm`` the margin is the
    length-normalised one.
    """
    return _smoothed_sigmoid(config.beta * t.margin, config.label_smoothing)


def _hinge_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """SLiC calibration loss (Zhao et al. 2023, SLiC-HF) on reference log-ratios as in RSO
    (Liu et al. 2024): ``max(0, 1 − βh)``, i.e. a margin of 1/β on h."""
    return torch.relu(1.0 - config.beta * t.margin)


def _ipo_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): ``(h − 1/(2β))²`` with τ = β, on length-normalised h.

    Eq. 17 does not say how the log-likelihoods are normalised; per-token averages are the common
    practice (TRL's, which it reports the authors confirmed), so the registry declares IPO
    length-normalised.
    """
    return (t.margin - 1.0 / (2.0 * config.beta)).square()


def _exo_pair_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """EXO, pairwise (Ji et al. 2024, eq. 16, the K = 2 case of the EXO objective).

    Reverse KL from the policy's pair distribution ``p_θ = (σ(βh), σ(−βh))`` to the smoothed
    preference distribution ``(1−ε, ε)``:
    ``σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε)``.
    ε must be > 0 (it is inside a log), so ``label_smoothing = 0`` means ε = 1e-3, the paper's
    value (TRL rejects ε = 0 instead).
    """
    epsilon = config.label_smoothing or _EXO_DEFAULT_EPSILON
    logits = config.beta * t.margin
    kl_preferred = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-epsilon))
    kl_dispreferred = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(epsilon))
    return kl_preferred + kl_dispreferred


def _nca_pair_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """NCA, pairwise (Chen et al. 2024): ``−log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)``, ``r = β·logratio``.

    Unlike DPO it constrains each reward on an absolute scale, so the chosen likelihood is not
    pushed down together with the rejected one.
    """
    reward_chosen = config.beta * t.logratio_chosen
    reward_rejected = config.beta * t.logratio_rejected
    return (
        -F.logsigmoid(reward_chosen)
        - 0.5 * F.logsigmoid(-reward_chosen)
        - 0.5 * F.logsigmoid(-reward_rejected)
    )


def _robust_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """rDPO (Chowdhury et al. 2024, the de-biased BCE loss):
    ``((1−ε)·ℓ(βh) − ε·ℓ(−βh)) / (1 − 2ε)`` with ``ℓ(z) = −log σ(z)``.

    Unlike cDPO this is an unbiased estimate of the clean-label loss under flip rate ε, which is why
    it can go negative.
    """
    epsilon = config.label_smoothing
    logits = config.beta * t.margin
    clean_label, flipped_label = -F.logsigmoid(logits), -F.logsigmoid(-logits)
    return ((1.0 - epsilon) * clean_label - epsilon * flipped_label) / (1.0 - 2.0 * epsilon)


def _bco_pair_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """BCO on pairs (Jung et al. 2024): ``−log σ(r_w − δ) − log σ(−(r_l − δ))``, ``r = β·logratio``.

    δ is the reward shift; the paper tracks it as a running mean of the rewards, and a pure function
    can only use the batch: δ = mean of all chosen and rejected rewards in the batch, detached (it is
    a statistic, not something to optimise). Consequently each entry depends on the whole batch.
    TRL 1.16 drops δ; its value equals this one's with both log-ratios lowered by δ/β.
    """
    reward_chosen = config.beta * t.logratio_chosen
    reward_rejected = config.beta * t.logratio_rejected
    delta = torch.cat([reward_chosen, reward_rejected]).mean().detach()
    return -F.logsigmoid(reward_chosen - delta) - F.logsigmoid(-(reward_rejected - delta))


def _sppo_hard_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """SPPO with hard labels (Wu et al. 2024, Algorithm 1, the squared-error SPPO update).

    The paper regresses ``log(π/π_t)`` onto ``η·(P̂(y ≻ π_t) − ½)``. Hard labels give P̂ = 1 for
    y_w and 0 for y_l; with ``η = 1/β``: ``(logratio_c − 1/(2β))² + (logratio_r + 1/(2β))²``, on
    the paper's scale (so a weighted mix with it weighs it as the paper and TRL do).
    """
    target = 0.5 / config.beta
    return (t.logratio_chosen - target).square() + (t.logratio_rejected + target).square()


def _sorted_difference(a: Tensor, b: Tensor) -> Tensor:
    # The 1-D optimal transport plan between two empirical distributions pairs their order
    # statistics, so comparing sorted vectors tests first-order stochastic dominance of a over b.
    return torch.sort(a).values - torch.sort(b).values


def _aot_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """AOT, paired (Melnyk et al. 2024): smoothed sigmoid loss on
    ``β·(sort(π_c − π_r) − sort(ref_c − ref_r))``: over the batch, the distribution of the policy's
    per-pair margins dominates the reference's (each margin needs its pair)."""
    delta = _sorted_difference(t.policy_chosen - t.policy_rejected, t.ref_chosen - t.ref_rejected)
    return _smoothed_sigmoid(config.beta * delta, config.label_smoothing)


def _aot_unpaired_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024): smoothed sigmoid loss on
    ``β·(sort(logratio_c) − sort(logratio_r))``: the distribution of chosen log-ratios dominates
    that of rejected ones across the batch, whichever pair each came from."""
    delta = _sorted_difference(t.logratio_chosen, t.logratio_rejected)
    return _smoothed_sigmoid(config.beta * delta, config.label_smoothing)


def _apo_zero_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): ``(1 − σ(r_w)) + σ(r_l)``, ``r = β·logratio``.

    For pairs whose chosen answer beats the model: raise the chosen and lower the rejected
    likelihood. The paper's ``−σ(r_w) + σ(r_l)`` is shifted by 1 so the loss lies in [0, 2].
    """
    reward_chosen = config.beta * t.logratio_chosen
    reward_rejected = config.beta * t.logratio_rejected
    return (1.0 - torch.sigmoid(reward_chosen)) + torch.sigmoid(reward_rejected)


def _apo_down_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): ``σ(r_w) + (1 − σ(r_w − r_l))``, ``r = β·logratio``.

    For pairs whose chosen answer is worse than the model: lower both likelihoods, the rejected one
    more. The first term deliberately *penalises* raising the chosen likelihood.
    """
    reward_chosen = config.beta * t.logratio_chosen
    reward_rejected = config.beta * t.logratio_rejected
    return torch.sigmoid(reward_chosen) + (1.0 - torch.sigmoid(reward_chosen - reward_rejected))


def _discopop_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """DiscoPOP / LRML (Lu et al. 2024, eq. 5): with ``ρ = βh`` and gate ``m = σ(ρ/τ)``,
    ``(1 − m)·(−log σ(ρ)) + m·exp(−ρ)`` — a log-ratio-modulated blend of DPO's logistic loss and an
    exponential loss.

    ``m·exp(−ρ)`` is evaluated as ``exp(log σ(ρ/τ) − ρ)``: for very negative ρ, exp(−ρ) alone
    overflows to inf and 0·inf would give NaN, while the log-space exponent goes to −∞ for τ < 1.
    """
    logits = config.beta * t.margin
    gate = torch.sigmoid(logits / config.discopop_tau)
    exp_term = torch.exp(F.logsigmoid(logits / config.discopop_tau) - logits)
    return (1.0 - gate) * -F.logsigmoid(logits) + exp_term


def _sft_loss(t: _Terms, config: DPOLossConfig) -> Tensor:
    """MPO's generation ("SFT") term (Wang et al. 2024): the chosen completion's mean token NLL.

    Per example, then averaged over examples by the caller; TRL 1.16 averages over all chosen
    tokens of the batch instead, so the two differ when chosen lengths differ.
    """
    assert t.chosen_nll is not None  # dpo_loss checks this before dispatching
    return t.chosen_nll


@dataclass(frozen=True)
class DPOLossSpec:
    """One loss type and the properties validation and dispatch read.

    Attributes:
        loss: the formula, ``(terms, config) → [B]``.
        length_normalized: defined on length-normalised log-ratios (``ψ/|y|``) rather than sums.
        label_smoothing: has an ε (label flip probability); the others would silently ignore it.
        reference_free: meaningful without a reference. Dropping the reference shifts each
            log-ratio by log π_ref, and a loss that only compares chosen with rejected (a margin,
            or sorted margins) becomes the known reference-free variant. The losses without it put
            an absolute target or threshold on a single log-ratio — NCA's σ(β·logratio_c), BCO's
            classifier (whose equivalence to the KL-regularised optimum, Jung et al. 2024, is stated
            for the reference ratio), SPPO's ±1/(2β) regression targets on log π/π_t, APO's anchors
            — and without a reference that target would be put on the raw sequence
            log-likelihood, a different (length-dominated) objective.
        f_divergence: sees the log-ratios only through the margin h, so f-DPO's margin can replace
            it. f′ is identified only up to a per-prompt constant (the partition function in Wang et
            al. 2023's reward), which cancels in a margin but not in the single-log-ratio targets
            of nca_pair / bco_pair / sppo_hard / apo_*; the aot losses sort log-ratios rather than
            form a margin per example. ``sft`` has no reward at all and is allowed alongside.
        per_example: entry ``i`` belongs to example ``i`` (the aot losses return sorted quantiles).
    """

    loss: Callable[[_Terms, DPOLossConfig], Tensor]
    length_normalized: bool = False
    label_smoothing: bool = False
    reference_free: bool = False
    f_divergence: bool = False
    per_example: bool = True


# The one table of DPO loss types (canonical names are TRL 1.16's).
DPO_LOSSES: dict[str, DPOLossSpec] = {
    "sigmoid": DPOLossSpec(_sigmoid_loss, label_smoothing=True, reference_free=True, f_divergence=True),
    "hinge": DPOLossSpec(_hinge_loss, reference_free=True, f_divergence=True),
    "ipo": DPOLossSpec(_ipo_loss, length_normalized=True, reference_free=True, f_divergence=True),
    "exo_pair": DPOLossSpec(_exo_pair_loss, label_smoothing=True, reference_free=True, f_divergence=True),
    "nca_pair": DPOLossSpec(_nca_pair_loss),
    "robust": DPOLossSpec(_robust_loss, label_smoothing=True, reference_free=True, f_divergence=True),
    "bco_pair": DPOLossSpec(_bco_pair_loss),
    "sppo_hard": DPOLossSpec(_sppo_hard_loss),
    "aot": DPOLossSpec(_aot_loss, label_smoothing=True, reference_free=True, per_example=False),
    "aot_unpaired": DPOLossSpec(
        _aot_unpaired_loss, label_smoothing=True, reference_free=True, per_example=False
    ),
    "apo_zero": DPOLossSpec(_apo_zero_loss),
    "apo_down": DPOLossSpec(_apo_down_loss),
    "discopop": DPOLossSpec(_discopop_loss, reference_free=True, f_divergence=True),
    "sft": DPOLossSpec(_sft_loss, reference_free=True),
    "sigmoid_norm": DPOLossSpec(
        _sigmoid_loss, length_normalized=True, label_smoothing=True, reference_free=True, f_divergence=True
    ),
}

# Other spellings of the same losses: lit_pref's earlier name for AOT's unpaired form.
DPO_LOSS_ALIASES: dict[str, str] = {"aot_pair": "aot_unpaired"}
assert set(DPO_LOSS_ALIASES.values()) <= set(DPO_LOSSES) and not set(DPO_LOSS_ALIASES) & set(DPO_LOSSES)

DPO_LOSS_TYPES: tuple[str, ...] = tuple(DPO_LOSSES)


def _names_with(prop: str) -> frozenset[str]:
    return frozenset(name for name, spec in DPO_LOSSES.items() if getattr(spec, prop))


REFERENCE_FREE_COMPATIBLE: frozenset[str] = _names_with("reference_free")


def ld_sequence_logps(token_logps: Tensor, mask: Tensor, public_length: Tensor, alpha: float) -> Tensor:
    """Length-desensitised sequence log-prob (Liu et al. 2024, LD-DPO).

    ``log π̃(y) = Σ_{t ≤ l_p} log p_t + α·Σ_{t > l_p} log p_t`` where t counts completion tokens and
    ``l_p`` is the public length (the caller passes ``min(|y_w|, |y_l|)`` for both sides). The
    excess tokens of the longer answer are down-weighted so that verbosity alone cannot dominate
    the DPO margin; α = 1 recovers the plain sum.

    Args:
        token_logps: ``[B, L]`` per-token log-probs; masked positions may hold anything.
        mask: ``[B, L]`` 0/1 completion mask (prompt and padding are 0, on either side).
        public_length: ``[B]`` number of leading completion tokens that count fully.
        alpha: Weight in ``[0, 1]`` for the remaining completion tokens.

    Returns:
        ``[B]`` weighted sums.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if token_logps.shape != mask.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(token_logps.shape)}")
    # Rank among completion tokens, 1-based; counting the mask rather than positions makes the prompt
    # and padding layout irrelevant.
    rank = torch.cumsum(mask.long(), dim=-1)
    is_public = rank <= public_length.to(rank.device).long().unsqueeze(-1)
    scale = torch.where(is_public, 1.0, alpha).to(token_logps.dtype)
    return masked_sum(token_logps * scale, mask, dim=-1)


def wpo_weights(
    chosen_token_logps: Tensor,
    chosen_token_log_sq_norm: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_token_log_sq_norm: Tensor,
    rejected_mask: Tensor,
) -> Tensor:
    """Per-pair WPO weight (Zhou et al. 2024, the length-normalised, distribution-aligned weight).

    ``w(y) = exp((1/|y|)·Σ_t [log p(y_t) − log Σ_v p(v)²])`` and the pair weight is
    ``w(y_w)·w(y_l)``. Dividing by ``Σ_v p_v²`` (the probability the policy would pick its own
    sample) rescales each token so that a greedy-ish policy is not over-favoured; the length mean
    keeps long answers from getting vanishing weights.

    Args:
        chosen_token_logps: ``[B, L]`` per-token log-probs of the chosen completion.
        chosen_token_log_sq_norm: ``[B, L]`` ``log Σ_v p_v²`` at each position.
        chosen_mask: ``[B, L]`` 0/1 completion mask.
        rejected_token_logps, rejected_token_log_sq_norm, rejected_mask: the same for the rejected one.

    Returns:
        ``[B]`` detached weights (they rescale the loss; they are not trained).
    """
    with torch.no_grad():
        chosen = masked_mean(chosen_token_logps - chosen_token_log_sq_norm, chosen_mask, dim=-1)
        rejected = masked_mean(rejected_token_logps - rejected_token_log_sq_norm, rejected_mask, dim=-1)
        return torch.exp(chosen + rejected)
