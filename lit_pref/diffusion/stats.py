"""Per-prompt reward statistics: DDPO's advantage normalisation (Black et al. 2023, §4.3)."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from lit_pref.losses.diffusion import normalized_advantages


class PerPromptStatTracker:
    """Each prompt's last ``buffer_size`` rewards; advantages use that prompt's mean and std once
    it has ``min_count`` of them, and the whole batch's before (the global fallback).

    Args:
        buffer_size: rewards remembered per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size} and {min_count}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """``[N]`` advantages of ``rewards``, the buffers updated with them first."""
        values = rewards.float().cpu()
        batch_mean, batch_std = values.mean(), values.std(correction=0)
        out = torch.empty_like(values)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                seen = torch.tensor(list(buffer))
                mean, std = seen.mean(), seen.std(correction=0)
            out[rows] = normalized_advantages(values[rows], mean, std)
        return out.to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {p: deque(values, maxlen=self.buffer_size) for p, values in state["buffers"].items()}
