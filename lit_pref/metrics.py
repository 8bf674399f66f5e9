"""Metrics as torchmetrics, so they average correctly over accumulation steps and ranks.

Modules update a :class:`MetricGroup` on every micro-batch with per-example tensors (no host
sync) and compute it once per optimizer step or validation epoch: ``compute`` reduces over all
ranks, so every value is the mean over every example that contributed.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lit_pref.distributed import collective_device, gather_keys


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
        # Metric states must be ordinary tensors: created under validation's inference mode they
        # would be inference tensors, and the next fit could not update them in place.
        with torch.inference_mode(False):
            for name, value in values.items():
                key = name.replace("/", "__")
                if key not in self.means:
                    # nan_strategy="disable": a NaN must surface in the logged value, not be dropped.
                    self.means[key] = MeanMetric(nan_strategy="disable").to(value.device)
                self.mean(key).update(value.detach().float())

    def mean(self, key: str) -> MeanMetric:
        """The running mean stored under ``key`` (``/`` spelled ``__``)."""
        return cast(MeanMetric, self.means[key])

    def compute(self) -> dict[str, Tensor]:
        """Means over all ranks since the last reset, keyed ``prefix + name``; then reset.

        A collective when distributed (each metric syncs its state over the ranks): every rank
        computes the same metrics, in the same order: those that any rank updated. A rank whose
        micro-batches left one untouched (a KTO batch without undesirable rows) still takes part,
        contributing nothing, instead of skipping a collective the others wait in.
        """
        with torch.inference_mode(False):
            return self._compute_and_reset()

    def _compute_and_reset(self) -> dict[str, Tensor]:
        out = {}
        keys = gather_keys([key for key, metric in self.means.items() if metric.update_called])
        for key in keys:
            if key not in self.means:
                device = next((self.mean(k).device for k in self.means), None)
                self.means[key] = MeanMetric(nan_strategy="disable").to(device or collective_device())
            metric = self.mean(key)
            if not metric.update_called:
                metric.update(torch.zeros(0, device=metric.device))  # counts as updated, adds nothing
            out[self.prefix + key.replace("__", "/")] = metric.compute()
        for name in self.means:
            self.mean(name).reset()
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


class UnpairedMetricGroup(MetricGroup):
    """A :class:`MetricGroup` for unpaired (desirable / undesirable) batches (KTO, BCO).

    ``rewards/chosen`` and ``rewards/rejected`` hold the desirable and undesirable rows, in
    numbers that differ between micro-batches; a micro-batch without one class leaves that metric
    untouched (an empty update would compute 0/0 = NaN). ``rewards/margins`` is derived at compute
    time as mean desirable − mean undesirable reward over everything accumulated (all micro-batches
    and ranks), since there are no pairs to take per-row differences of.
    """

    def update(self, values: dict[str, Tensor]) -> None:
        super().update({name: value for name, value in values.items() if value.numel() > 0})

    def mean(self, key: str) -> MeanMetric:
        """The running mean stored under ``key`` (``/`` spelled ``__``)."""
        return cast(MeanMetric, self.means[key])

    def compute(self) -> dict[str, Tensor]:
        out = super().compute()
        chosen, rejected = out.get(f"{self.prefix}rewards/chosen"), out.get(f"{self.prefix}rewards/rejected")
        if chosen is not None and rejected is not None:
            out[f"{self.prefix}rewards/margins"] = chosen - rejected
        return out
