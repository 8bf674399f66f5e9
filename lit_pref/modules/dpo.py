"""DPO and its whole loss family as one LightningModule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_pref.losses.dpo import DPOLossConfig, dpo_loss, ld_sequence_logps, wpo_weights
from lit_pref.metrics import reward_metrics
from lit_pref.modules.reference import OfflineReferenceModule
from lit_pref.types import CompletionLogps, PairedBatch


def untrained_loss(config: DPOLossConfig) -> float | None:
    """The loss while the policy still equals the reference (every log-ratio 0), if it is a constant.

    ``ln 2`` for sigmoid DPO, 1 for hinge, ``1/(4β²)`` for IPO…; ``None`` when the loss also
    depends on the policy's own likelihoods (``sft``, RPO, reference-free) or on WPO weights.
    """
    if config.reference_free or config.rpo_alpha is not None or config.use_weighting or "sft" in config.loss_type:
        return None
    zeros = torch.zeros(1)
    return float(dpo_loss(zeros, zeros, zeros, zeros, config).losses[0])


class DPO(OfflineReferenceModule):
    """Direct Preference Optimization (Rafailov et al. 2023) and the DPO loss family.

    The policy scores chosen and rejected completions in one forward pass (each prompt encoded
    once, its KV cache shared by both completions); the reference does the same without grad, or
    its log-probs come precomputed from a disk cache.

    Args:
        beta: KL-constraint strength β.
        loss_type: one loss name or a list (MPO-style weighted combination): sigmoid, hinge, ipo,
            exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired (alias aot_pair),
            apo_zero, apo_down, discopop, sft, sigmoid_norm (TRL's names).
        loss_weights: one weight per loss type (equal weights when omitted).
        label_smoothing: label-noise rate ε of cDPO / robust DPO, in [0, 0.5).
        reference_free: compare against a uniform reference (no reference model is loaded).
        f_divergence_type: reverse_kl, forward_kl, js_divergence or alpha_divergence (f-DPO).
        f_alpha_divergence_coef: α of the α-divergence, f'(u) = (1 − u^−α)/α (Wang et al. 2023;
            TRL's coefficient is 1 − α, the same at the default 0.5).
        discopop_tau: temperature of DiscoPOP's gate.
        rpo_alpha: weight of the NLL on chosen completions added to the loss (RPO).
        use_weighting: weight each pair by its WPO weight.
        ld_alpha: LD-DPO weight of the tokens of the longer completion beyond the shorter's length.
        length_normalize: ``None``: each loss gets the log-probs it is defined on (length-averaged
            for ipo and sigmoid_norm, summed for the others, also within one list); ``true``:
            length-average for every loss; ``false``: sums for every loss.
        share_prompt: encode each prompt once for both completions (exactly the same log-probs as
            two concatenated rows; off automatically under gradient checkpointing).
        **kwargs: :class:`~lit_pref.modules.reference.OfflineReferenceModule` arguments (the
            reference choice, precomputed reference log-probs) and :class:`~lit_pref.modules.base.AlignmentModule` ones (model, LoRA,
            optimizer, export…).
    """

    data_target = "paired"
    default_lr = 5e-7
    # Sigmoid DPO's value; each instance sets the value of its own loss (see untrained_loss).
    stuck_loss: float | None = math.log(2)

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        rpo_alpha: float | None = None,
        use_weighting: bool = False,
        ld_alpha: float | None = None,
        length_normalize: bool | None = None,
        share_prompt: bool = True,
        **kwargs: Any,
    ) -> None:
        # The loss configuration is validated first, so a bad one fails before anything loads.
        loss_config = DPOLossConfig(
            loss_type=tuple([loss_type] if isinstance(loss_type, str) else loss_type),
            loss_weights=None if loss_weights is None else tuple(loss_weights),
            beta=beta,
            label_smoothing=label_smoothing,
            reference_free=reference_free,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau,
            rpo_alpha=rpo_alpha,
            use_weighting=use_weighting,
            ld_alpha=ld_alpha,
            length_normalize=length_normalize,
        )
        super().__init__(reference_free=reference_free, **kwargs)
        self.loss_config = loss_config
        self.stuck_loss = untrained_loss(loss_config)
        self.share_prompt = share_prompt

    # ------------------------------------------------------------ sequence logps
    def pair_logps(self, logps: CompletionLogps) -> tuple[Tensor, Tensor]:
        """Per-pair (chosen, rejected) summed sequence log-probs (LD-DPO's weighted sums with
        ``ld_alpha``); the losses that are length-normalised divide them by the lengths."""
        chosen, rejected = logps.pairs()
        if self.loss_config.ld_alpha is not None:
            public = torch.minimum(chosen.count, rejected.count)
            alpha = self.loss_config.ld_alpha
            return (
                ld_sequence_logps(chosen.token_logps, chosen.mask, public, alpha),
                ld_sequence_logps(rejected.token_logps, rejected.mask, public, alpha),
            )
        return chosen.sum, rejected.sum

    def cache_options(self) -> str:
        # "sums": cached reference values are sums since length normalisation moved into the loss.
        return f"sums|{self.loss_config.ld_alpha}"

    def reference_values(self, batch: PairedBatch) -> Tensor:
        """``[B, 2]`` reference (chosen, rejected) sequence log-probs."""
        return torch.stack(self.pair_logps(self.reference_logps(batch, share_prompt=self.share_prompt)), -1)

    # ------------------------------------------------------------------- steps
    def dpo_step(self, batch: PairedBatch, split: str) -> DPOStep:
        """The policy's and the reference's pair log-probs of one batch, the configured loss, and its metrics."""
        policy = self.logps(
            self.policy, batch, share_prompt=self.share_prompt, with_sq_norm=self.loss_config.use_weighting
        )
        chosen_logps, rejected_logps = self.pair_logps(policy)
        ref_chosen = ref_rejected = None
        if self.reference.kind != "none":
            reference = self.reference_values_for(batch, split)
            ref_chosen, ref_rejected = reference[:, 0], reference[:, 1]
        chosen, rejected = policy.pairs()
        weights = None
        if self.loss_config.use_weighting:
            assert chosen.log_sq_norm is not None and rejected.log_sq_norm is not None
            weights = wpo_weights(
                chosen.token_logps, chosen.log_sq_norm, chosen.mask,
                rejected.token_logps, rejected.log_sq_norm, rejected.mask,
            )  # fmt: skip
        out = dpo_loss(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, self.loss_config,
            chosen_nll=-chosen.mean, weights=weights,
            chosen_lengths=chosen.count, rejected_lengths=rejected.count,
        )  # fmt: skip
        metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards, chosen.sum, rejected.sum)
        metrics |= {"loss": out.losses, "logits/chosen": chosen.mean_logits, "logits/rejected": rejected.mean_logits}
        return DPOStep(out.losses, chosen_logps, rejected_logps, ref_chosen, ref_rejected, metrics)

    def shared_step(self, batch: PairedBatch, split: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and per-example metrics of one batch (``split`` is ``train`` or ``val``)."""
        step = self.dpo_step(batch, split)
        return step.losses.mean(), step.metrics


@dataclass
class DPOStep:
    """What :meth:`DPO.dpo_step` computed for one batch of ``B`` pairs (a subclass adds terms to it).

    Attributes:
        losses: ``[B]`` per-pair loss of the configured loss type(s).
        chosen_logps, rejected_logps: ``[B]`` the policy's summed sequence log-probs (LD-DPO's
            weighted sums with ``ld_alpha``), as the loss reads them.
        ref_chosen, ref_rejected: ``[B]`` the same under the reference (``None`` reference-free).
        metrics: the standard per-pair metrics (``loss``, ``rewards/*``, ``logps/*``, ``logits/*``).
    """

    losses: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    metrics: dict[str, Tensor]
