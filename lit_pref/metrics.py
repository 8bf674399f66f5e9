"""Metrics as torchmetrics, so they average correctly over accumulation steps and ranks.

Modules update a :class:`MetricGroup` on every micro-batch with per-example tensors (no host
sync) and compute it once per optimizer step or validation epoch: ``compute`` reduces over all
ranks, so every value is the mean over every example that contributed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MeanMetric


class MetricGroup(torch.nn.Module):
    """Named running means, created on first use.

    Args:
        prefix: prepended to every name when computed (``"train/"``, ``"val/"``).
    """

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.means = torch.nn.ModuleDict()

    def update(self, values: dict[str, Tensor]) -> None:
        """Add per-example (or scalar) values; each element counts once in the mean."""
        for name, value in values.items():
            key = name.replace("/", "__")
            if key not in self.means:
                # nan_strategy="disable": a NaN must surface in the logged value, not be dropped.
                self.means[key] = MeanMetric(nan_strategy="disable").to(value.device)
            self.means[key].update(value.detach().float())

    def compute(self) -> dict[str, Tensor]:
        """Means over all ranks since the last reset, keyed ``prefix + name``; then reset."""
        out = {}
        for key, metric in self.means.items():
            if metric.update_called:
                out[self.prefix + key.replace("__", "/")] = metric.compute()
            metric.reset()
        return out


def reward_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, Tensor]:
    """The standard preference diagnostics, per example."""
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
    }
