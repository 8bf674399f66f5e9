"""CPO and SimPO: reference-free preference optimisation on pairs."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lit_pref.losses.cpo import SIMPO_DEFAULT_BETA, SIMPO_DEFAULT_CPO_ALPHA, CPOLossConfig, cpo_loss
from lit_pref.metrics import reward_metrics
from lit_pref.modules.base import AlignmentModule
from lit_pref.types import PairedBatch

# β and α when the loss type is not simpo and the user leaves them unset.
CPO_DEFAULT_BETA = 0.1
CPO_DEFAULT_ALPHA = 1.0


class CPO(AlignmentModule):
    """Contrastive Preference Optimization (Xu et al. 2024, arXiv:2401.08417) and SimPO.

    Reference-free: the preference term compares the policy's own chosen and rejected
    log-probs, plus α times the chosen completion's NLL (mean over its tokens). No reference
    model is loaded. SimPO (Meng et al. 2024, arXiv:2405.14734) is the ``simpo`` loss type:
    length-normalised log-probs and a target reward margin γ. AlphaPO (Gupta et al. 2025,
    arXiv:2501.03884) is ``alpha`` ≠ 0: the α-reward ``(1 − p^{−α})/α`` replaces ``log p``
    in any loss type (``loss_type: alphapo`` is TRL's shorthand for ``simpo`` with it).

    Args:
        loss_type: ``sigmoid`` (CPO), ``hinge``, ``ipo``, ``simpo`` or ``alphapo`` (``simpo``
            without the NLL term, as TRL's CPOConfig; set ``alpha``).
        beta: β. Unset (``None``): 2.0 for ``simpo`` (SimPO's recommendation), 0.1 otherwise.
        cpo_alpha: α, the weight of the NLL term on chosen completions. Unset (``None``): 0.0
            for ``simpo`` (pure SimPO), 1.0 otherwise. ``simpo`` with α > 0 is CPO-SimPO.
        simpo_gamma: γ, SimPO's target reward margin (``simpo`` only).
        alpha: AlphaPO's reward shape α (TRL's CPOConfig ``alpha``): rewards
            ``(1 − p^{−α})/α`` of the (summed, or length-normalised) completion probability
            ``p``; 0 keeps ``log p``. Not to be confused with ``cpo_alpha``, the NLL weight.
        label_smoothing: ε ∈ [0, 0.5), the assumed label-flip rate (``sigmoid`` and ``simpo``).
        length_normalize: score completions by their mean instead of summed token log-probs.
            Unset: on for ``simpo`` (required: SimPO's reward is length-normalised) and ``ipo``,
            off otherwise.
        share_prompt: encode each prompt once for both completions.
        **kwargs: :class:`~lit_pref.modules.base.AlignmentModule` arguments (model, LoRA,
            optimizer, export…).
    """

    data_target = "paired"
    default_lr = 1e-6

    def __init__(
        self,
        loss_type: Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo"] = "sigmoid",
        beta: float | None = None,
        cpo_alpha: float | None = None,
        simpo_gamma: float = 1.0,
        alpha: float = 0.0,
        label_smoothing: float = 0.0,
        length_normalize: bool | None = None,
        share_prompt: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if loss_type == "alphapo":
            if cpo_alpha not in (None, 0.0):
                raise ValueError(
                    f"loss_type alphapo has no NLL term (TRL sets cpo_alpha=0), got cpo_alpha={cpo_alpha}; "
                    "use loss_type simpo with alpha and cpo_alpha for both"
                )
            loss_type = "simpo"
        simpo = loss_type == "simpo"
        if beta is None:
            beta = SIMPO_DEFAULT_BETA if simpo else CPO_DEFAULT_BETA
        if cpo_alpha is None:
            cpo_alpha = SIMPO_DEFAULT_CPO_ALPHA if simpo else CPO_DEFAULT_ALPHA
        self.loss_config = CPOLossConfig(
            loss_type=loss_type,
            beta=beta,
            label_smoothing=label_smoothing,
            cpo_alpha=cpo_alpha,
            simpo_gamma=simpo_gamma,
            alpha=alpha,
        )
        if simpo and length_normalize is False:
            raise ValueError(
                "loss_type='simpo' scores length-normalised log-probs; drop length_normalize=false"
            )
        self.length_normalize = (
            loss_type in ("simpo", "ipo") if length_normalize is None else length_normalize
        )
        self.share_prompt = share_prompt

    def shared_step(self, batch: PairedBatch, split: str = "train") -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and per-example metrics of one batch."""
        chosen, rejected = self.logps(self.policy, batch, share_prompt=self.share_prompt).pairs()
        if self.length_normalize:
            chosen_logps, rejected_logps = chosen.mean, rejected.mean
        else:
            chosen_logps, rejected_logps = chosen.sum, rejected.sum
        nll = -chosen.mean
        out = cpo_loss(chosen_logps, rejected_logps, self.loss_config, chosen_nll=nll)
        metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards, chosen.sum, rejected.sum)
        metrics |= {
            "loss": out.losses,
            "nll": nll,
            "logits/chosen": chosen.mean_logits,
            "logits/rejected": rejected.mean_logits,
        }
        return out.losses.mean(), metrics
