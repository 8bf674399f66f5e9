"""TR-DPO: keep the reference model moving towards the policy (Gorbatovski et al. 2024)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from lit_pref.reference import Reference

log = logging.getLogger(__name__)


class RefModelSync(Callback):
    """Every ``sync_steps`` optimizer steps, ``ref ← α·policy + (1 − α)·ref`` (TR-DPO).

    Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment": the soft
    update (TR-DPO-α) with α = ``mixup_alpha``; α = 1 is the hard update (TR-DPO-τ, a plain copy
    every τ = ``sync_steps`` steps).

    What is synced depends on the module's reference:

    * a separate reference network (``copy`` or ``model``): every parameter, matched by name;
    * a reference adapter (``adapter``): the LoRA weights of the trained ``default`` adapter are
      mixed into the reference adapter's, factor by factor (for α < 1 that is a mixture of the A
      and B factors, not of the products BA).

    The reference weights are part of the checkpoint, so a resumed run continues from the synced
    reference. ``adapter_disabled`` (the base weights are the reference and cannot move without
    moving the policy), precomputed reference log-probs and reference-free losses cannot be
    synced, and are refused when fit starts.

    Args:
        sync_steps: optimizer steps between syncs (τ).
        mixup_alpha: weight α of the policy in the mixture, in (0, 1].
    """

    def __init__(self, sync_steps: int = 512, mixup_alpha: float = 0.6) -> None:
        if sync_steps < 1:
            raise ValueError(f"sync_steps must be >= 1, got {sync_steps}")
        if not 0.0 < mixup_alpha <= 1.0:
            raise ValueError(f"mixup_alpha must be in (0, 1], got {mixup_alpha}")
        self.sync_steps = sync_steps
        self.mixup_alpha = mixup_alpha
        self._last_step = 0
        self.num_syncs = 0

    # ------------------------------------------------------------------ checks
    @staticmethod
    def check_syncable(pl_module: LightningModule) -> None:
        """Raise a clear error when ``pl_module``'s reference cannot be synced."""
        reference = getattr(pl_module, "reference", None)
        if not isinstance(reference, Reference):
            raise ValueError(f"RefModelSync needs a module with a reference model; {type(pl_module).__name__} has none")
        kind = reference.kind
        if getattr(pl_module, "ref_logp_table", None) is not None:
            raise ValueError(
                "RefModelSync cannot update precomputed reference log-probs (they are fixed for the whole "
                "run); set precompute_ref_logps=false or drop the callback"
            )
        if kind == "none":
            raise ValueError("RefModelSync has no reference to update: the loss is reference-free")
        if kind == "adapter_disabled":
            raise ValueError(
                "RefModelSync cannot update an adapter_disabled reference: it is the base model the LoRA "
                "adapter trains on, so it cannot move without moving the policy; use reference='copy' "
                "(a frozen copy of the model) or start from an adapter directory (reference='adapter')"
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_syncable(pl_module)

    # ----------------------------------------------------------------- pairing
    @staticmethod
    def parameter_pairs(pl_module: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, policy tensor, reference tensor)`` for every reference weight that is synced."""
        RefModelSync.check_syncable(pl_module)
        policy = pl_module.policy
        if pl_module.reference.kind == "adapter":
            trained, frozen = "default", pl_module.reference.adapter_name
            configs = policy.peft_config
            for field in ("r", "lora_alpha", "use_rslora", "target_modules"):
                if getattr(configs[trained], field, None) != getattr(configs[frozen], field, None):
                    raise ValueError(
                        f"the trained and the reference adapters differ in {field}; they cannot be mixed"
                    )
            params = dict(policy.named_parameters())
            pairs = []
            for name, tensor in params.items():
                if f".{trained}." not in name:
                    continue
                ref_name = name.replace(f".{trained}.", f".{frozen}.")
                if ref_name not in params:
                    raise ValueError(f"the reference adapter has no counterpart of {name}")
                pairs.append((ref_name, tensor, params[ref_name]))
            if not pairs:
                raise ValueError(f"the policy has no weights of the {trained!r} adapter to sync")
            return pairs
        reference = pl_module.reference.network
        if reference is None:
            raise ValueError("RefModelSync found no reference network on the module")
        from lit_pref.models import is_peft_model

        if is_peft_model(policy):
            raise ValueError(
                "RefModelSync cannot mix a LoRA policy into a separate full reference model; start from "
                "an adapter directory (reference='adapter') or train all weights"
            )
        policy_params = dict(policy.named_parameters())
        reference_params = dict(reference.named_parameters())
        if policy_params.keys() != reference_params.keys():
            missing = sorted(policy_params.keys() ^ reference_params.keys())[:5]
            raise ValueError(f"policy and reference parameters differ (e.g. {missing}); they cannot be mixed")
        pairs = []
        for name, tensor in policy_params.items():
            ref = reference_params[name]
            if ref.shape != tensor.shape:
                raise ValueError(f"{name}: policy shape {tuple(tensor.shape)} != reference {tuple(ref.shape)}")
            pairs.append((name, tensor, ref))
        return pairs

    # -------------------------------------------------------------------- sync
    @torch.no_grad()
    def sync(self, pl_module: LightningModule) -> None:
        """Mix the policy into the reference now."""
        alpha = self.mixup_alpha
        for _, policy_tensor, ref_tensor in self.parameter_pairs(pl_module):
            # Sharded weights mix shard by shard: FSDP2 DTensors of one shape share placements (the
            # same function sharded both networks); ZeRO-3 keeps same-shaped partitions in ds_tensor.
            policy_tensor = getattr(policy_tensor, "ds_tensor", policy_tensor)
            ref_tensor = getattr(ref_tensor, "ds_tensor", ref_tensor)
            source = policy_tensor.detach().to(ref_tensor.dtype)
            if alpha == 1.0:
                ref_tensor.copy_(source)
            else:
                ref_tensor.mul_(1.0 - alpha).add_(source, alpha=alpha)
        self.num_syncs += 1
        log.info("TR-DPO: reference ← %s·policy + %s·reference", alpha, 1.0 - alpha)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed run must not sync again at the step it resumed from.
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # inside an accumulation window: no optimizer step yet
            return
        self._last_step = step
        if step % self.sync_steps == 0:
            self.sync(pl_module)
