"""Small typed containers that flow between a forward pass and a loss."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class CompletionLogps:
    """Per-token log-probabilities of completions under one model.

    ``Bc`` completions of length ``L`` (right-padded). Completion row ``j`` belongs to prompt
    ``j // k`` when a batch has ``k`` completions per prompt (chosen/rejected pairs are rows
    ``2i`` and ``2i + 1``).

    Attributes:
        token_logps: ``[Bc, L]`` log π(y_t | x, y_<t); 0 where ``mask`` is unset.
        mask: ``[Bc, L]`` bool, the completion tokens that count (the loss mask).
        mean_logits: ``[Bc]`` detached mean over vocabulary and counted tokens (a diagnostic).
        entropy: ``[Bc, L]`` detached per-token entropy when requested, else ``None``.
        log_sq_norm: ``[Bc, L]`` detached log Σ_v π(v)² per token (WPO) when requested, else ``None``.
        argmax: ``[Bc, L]`` most likely token at each counted position when requested (token
            accuracy), else ``None``; 0 where ``mask`` is unset.
    """

    token_logps: Tensor
    mask: Tensor
    mean_logits: Tensor
    entropy: Tensor | None = None
    log_sq_norm: Tensor | None = None
    argmax: Tensor | None = None

    @property
    def sum(self) -> Tensor:
        """``[Bc]`` sequence log-probability Σ_t log π(y_t)."""
        return self.token_logps.sum(-1)

    @property
    def count(self) -> Tensor:
        """``[Bc]`` number of counted completion tokens."""
        return self.mask.sum(-1)

    @property
    def mean(self) -> Tensor:
        """``[Bc]`` length-normalised log-probability (IPO, SimPO, ORPO)."""
        return self.sum / self.count.clamp(min=1)

    def pairs(self) -> tuple[CompletionLogps, CompletionLogps]:
        """Split an interleaved chosen/rejected batch into its (chosen, rejected) halves."""
        return self.select(slice(0, None, 2)), self.select(slice(1, None, 2))

    def select(self, rows: slice | Tensor) -> CompletionLogps:
        """The same fields restricted to ``rows``."""
        return CompletionLogps(
            token_logps=self.token_logps[rows],
            mask=self.mask[rows],
            mean_logits=self.mean_logits[rows],
            entropy=None if self.entropy is None else self.entropy[rows],
            log_sq_norm=None if self.log_sq_norm is None else self.log_sq_norm[rows],
            argmax=None if self.argmax is None else self.argmax[rows],
        )
