"""ORPO: supervised fine-tuning and preference optimisation in one loss, without a reference."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from lit_pref.losses.orpo import orpo_loss
from lit_pref.metrics import reward_metrics
from lit_pref.modules.base import AlignmentModule
from lit_pref.types import PairedBatch


class ORPO(AlignmentModule):
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691).

    The loss is the chosen completion's NLL plus λ times the odds-ratio penalty
    ``−log σ(log odds_θ(y_w|x) − log odds_θ(y_l|x))``, with the odds taken on per-token
    (length-normalised) likelihoods. The NLL is each chosen completion's mean token NLL, averaged
    over the pairs of the batch. No reference model is loaded.

    Args:
        beta: λ, the weight of the odds-ratio term (the paper's λ; called ``beta`` as in common
            ORPO configs). 0 reduces ORPO to SFT on the chosen completions.
        share_prompt: encode each prompt once for both completions.
        **kwargs: :class:`~lit_pref.modules.base.AlignmentModule` arguments (model, LoRA,
            optimizer, export…).
    """

    data_target = "paired"
    default_lr = 1e-6

    def __init__(self, beta: float = 0.1, share_prompt: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta (ORPO's λ) must be a finite number >= 0, got {beta!r}")
        self.beta = beta
        self.share_prompt = share_prompt

    def shared_step(self, batch: PairedBatch, split: str = "train") -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and per-example metrics of one batch."""
        chosen, rejected = self.logps(self.policy, batch, share_prompt=self.share_prompt).pairs()
        out = orpo_loss(chosen.mean, rejected.mean, -chosen.mean, self.beta)
        metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards, chosen.sum, rejected.sum)
        metrics |= {
            "loss": out.losses,
            "nll": out.nll,
            "or_loss": out.or_loss,
            "log_odds_ratio": out.log_odds_ratio,
            "log_odds_chosen": out.log_odds_chosen,
            "logits/chosen": chosen.mean_logits,
            "logits/rejected": rejected.mean_logits,
        }
        return out.losses.mean(), metrics
