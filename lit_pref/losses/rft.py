"""Rejection-sampling fine-tuning (RAFT, ReST-EM, expert iteration): which samples to keep, and the
SFT loss on them.

RAFT (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model
Alignment", arXiv:2304.06767, §3 and Alg. 1) samples K completions per prompt, keeps the one with
the highest reward, y* = argmax_j r(x, y_j), and fine-tunes on the kept set. ReST-EM (Singh et al.
2023, "Beyond Human Data: Scaling Self-Training for Problem-Solving with Language Models",
arXiv:2312.06585, §3, Improve step) keeps every sample a binary reward accepts and maximises the
reward-weighted log-likelihood

    J(θ) = E_{(x, y) ∼ D_i} [ r(x, y) · log p_θ(y | x) ],   r ∈ {0, 1},

i.e. the NLL of the accepted samples. Expert iteration is the same loop with a reward threshold.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

KeepRule = Literal["top1", "threshold"]
KEEP_RULES: tuple[str, ...] = get_args(KeepRule)


def select_completions(
    scores: Tensor, num_generations: int, keep: KeepRule = "top1", reward_threshold: float | None = None
) -> Tensor:
    """``[N]`` bool: the completions rejection sampling keeps.

    Rows ``i·k … i·k + k − 1`` are the ``k = num_generations`` completions of prompt ``i``.

    Args:
        scores: ``[N]`` total reward per completion, ``N`` a multiple of ``num_generations``.
        num_generations: completions per prompt k.
        keep: ``top1`` keeps each prompt's best completion (RAFT's y* = argmax_j r(x, y_j); a
            tie goes to the first sampled), ``threshold`` every completion with
            r ≥ ``reward_threshold`` (ReST-EM's binary filter r(x, y) = 1[r ≥ τ]).
        reward_threshold: τ. With ``top1`` (optional), the best completion is kept only when it
            also reaches τ; with ``threshold`` it is required. A prompt may then keep nothing.
    """
    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of {KEEP_RULES}, got {keep!r}")
    if keep == "threshold" and reward_threshold is None:
        raise ValueError("keep: threshold needs a reward_threshold")
    grouped = scores.view(-1, num_generations)
    if keep == "top1":
        kept = torch.zeros_like(grouped, dtype=torch.bool).scatter_(1, grouped.argmax(1, keepdim=True), True)
    else:
        kept = torch.ones_like(grouped, dtype=torch.bool)
    if reward_threshold is not None:
        kept &= grouped >= reward_threshold
    return kept.view(-1)


def rft_loss(token_logps: Tensor, mask: Tensor, num_items: Tensor | None = None) -> Tensor:
    """Token-mean NLL of the kept completions: ReST-EM's −J(θ) with r ∈ {0, 1}, per token,

        L = −(1 / T) Σ_i r_i Σ_t log π_θ(y_{i,t} | x_i, y_{i,<t}),   T = Σ_i r_i |y_i|,

    where ``mask`` holds r_i on each real completion token of row i.

    Args:
        token_logps: ``[B, L]`` log π_θ of each completion token.
        mask: ``[B, L]`` bool, the kept completions' tokens.
        num_items: T when the mean runs over more than this batch (the kept tokens of a whole
            mini-batch, accumulated over micro-batches); default the batch's own count.

    Returns:
        The scalar loss; 0 (never 0/0) when nothing is counted.
    """
    count = mask.sum() if num_items is None else num_items
    return -torch.where(mask, token_logps, 0.0).sum() / count.clamp(min=1)
