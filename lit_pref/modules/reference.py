"""The reference model as an explicit choice, and its precomputed log-prob cache."""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from tqdm.auto import tqdm

from lit_pref.models import freeze, is_adapter_dir, load_causal_lm
from lit_pref.modules.base import AlignmentModule
from lit_pref.types import CompletionLogps

ReferenceKind = Literal["auto", "copy", "model", "adapter_disabled", "adapter", "none"]


def resolve_reference(
    kind: str, *, peft: bool, ref_model: bool, adapter_source: bool, reference_free: bool
) -> str:
    """Turn ``auto`` into a concrete reference kind and reject impossible combinations.

    ``auto`` picks, in order: ``none`` for reference-free losses, ``model`` when a reference path
    is given, ``adapter`` when the policy starts from an existing adapter (the reference must then
    be the SFT model, not the base), ``adapter_disabled`` when training a fresh LoRA, else ``copy``.
    """
    if kind not in ("auto", "copy", "model", "adapter_disabled", "adapter", "none"):
        raise ValueError(
            f"reference must be auto, copy, model, adapter_disabled, adapter or none, got {kind!r}"
        )
    if kind == "auto":
        if reference_free:
            return "none"
        if ref_model:
            return "model"
        if adapter_source:
            return "adapter"
        return "adapter_disabled" if peft else "copy"
    if kind == "none" and not reference_free:
        raise ValueError("reference='none' needs reference_free=True (the loss would have nothing to compare to)")
    if kind == "model" and not ref_model:
        raise ValueError("reference='model' needs ref_model_name_or_path")
    if kind == "adapter_disabled" and not peft:
        raise ValueError("reference='adapter_disabled' needs a LoRA policy (set peft)")
    if kind == "adapter" and not adapter_source:
        raise ValueError("reference='adapter' needs model_name_or_path to be a PEFT adapter directory")
    if kind == "adapter_disabled" and adapter_source:
        raise ValueError(
            "reference='adapter_disabled' with a policy that starts from an existing adapter would make "
            "the base model (not your SFT model) the reference; use reference='adapter'"
        )
    return kind


@contextlib.contextmanager
def active_adapter(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with adapter ``name`` active, restoring the previous adapter and grad flags.

    PEFT's ``set_adapter`` marks the adapter it activates as trainable; the reference adapter must
    stay frozen, so every flag is put back on exit.
    """
    previous = model.active_adapter
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


class RefLogpCache:
    """Per-row reference log-probs of one split, stored on disk under a data + model key.

    Args:
        directory: where cache files live.
        key: identifies the data, the reference weights and every option that changes the values.
    """

    def __init__(self, directory: str | Path, key: str) -> None:
        self.path = Path(directory) / f"ref_logps-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"

    def load(self) -> torch.Tensor | None:
        if self.path.is_file():
            rank_zero_info(f"reusing precomputed reference log-probs from {self.path}")
            return torch.load(self.path, weights_only=True)
        return None

    def save(self, table: torch.Tensor, is_global_zero: bool) -> None:
        if is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(table, self.path)
            rank_zero_info(f"cached reference log-probs to {self.path}")


class ReferenceModule(AlignmentModule):
    """An :class:`AlignmentModule` that also holds a frozen reference (DPO, KTO, BCO).

    Subclasses implement :meth:`reference_values` (the per-row reference quantities their loss
    needs) and read them through :meth:`reference_values_for`, which serves them from a
    precomputed table when ``precompute_ref_logps`` is on.

    Args:
        reference: ``auto``, ``copy`` (frozen copy of the starting policy), ``model``
            (``ref_model_name_or_path``), ``adapter_disabled`` (the policy's base under a fresh
            LoRA), ``adapter`` (a frozen copy of the starting adapter, so the reference is the SFT
            model and not the base) or ``none`` (reference-free losses). ``auto`` picks one and
            logs which.
        ref_model_name_or_path: a separate reference model (hub id or local path).
        ref_adapter_name: the name under which the frozen reference adapter is loaded.
        precompute_ref_logps: compute the reference values once, after the strategy has set the
            model up, cache them on disk under a data + model key (reused by the next run), and
            keep no reference network in memory.
        ref_cache_dir: where precomputed reference values are cached.
        reference_free: set by losses that need no reference (the subclass passes it).
        **kwargs: :class:`~lit_pref.modules.base.AlignmentModule` arguments (model, LoRA,
            optimizer, export…).
    """

    def __init__(
        self,
        reference: ReferenceKind = "auto",
        ref_model_name_or_path: str | None = None,
        ref_adapter_name: str = "reference",
        precompute_ref_logps: bool = False,
        ref_cache_dir: str = ".lit_pref_cache",
        reference_free: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.reference_kind = resolve_reference(
            reference,
            peft=self.peft_config is not None,
            ref_model=ref_model_name_or_path is not None,
            adapter_source=is_adapter_dir(self.model_source),
            reference_free=reference_free,
        )
        if precompute_ref_logps and self.reference_kind == "none":
            raise ValueError("precompute_ref_logps has nothing to compute with a reference-free loss")
        self.ref_model_source = ref_model_name_or_path
        self.ref_adapter_name = ref_adapter_name
        self.precompute_ref_logps = precompute_ref_logps
        self.ref_cache_dir = ref_cache_dir
        self.reference: torch.nn.Module | None = None
        self.ref_tables: dict[str, tuple[str, Tensor]] = {}
        how = "precomputed once and cached" if precompute_ref_logps else "computed every step"
        rank_zero_info(f"{type(self).__name__} reference: {self.reference_kind} ({how})")

    # ----------------------------------------------------------------- networks
    def load_reference(self) -> None:
        """Build the reference network the chosen kind needs (adapters live inside the policy)."""
        if self.reference_kind == "copy":
            source = self.model_source
            self.reference = freeze(
                copy.deepcopy(self.policy)
                if not isinstance(source, str)
                else load_causal_lm(source, self.dtype_name, self.attn_implementation)
            )
        elif self.reference_kind == "model":
            self.reference = freeze(load_causal_lm(self.ref_model_source, self.dtype_name, self.attn_implementation))
        elif self.reference_kind == "adapter":
            self.policy.load_adapter(self.model_source, adapter_name=self.ref_adapter_name, is_trainable=False)

    def configure_model(self) -> None:
        first = self.policy is None
        super().configure_model()
        if first and not self.precompute_ref_logps:
            self.load_reference()

    def reference_logps(self, batch: dict[str, Any], **kwargs: Any) -> CompletionLogps:
        """Reference completion log-probs of ``batch`` (no grad) under the configured reference."""
        kwargs.setdefault("share_prompt", getattr(self, "share_prompt", True))
        with torch.no_grad():
            if self.reference_kind == "adapter_disabled":
                with self.policy.disable_adapter():
                    return self.logps(self.policy, batch, **kwargs)
            if self.reference_kind == "adapter":
                with active_adapter(self.policy, self.ref_adapter_name):
                    return self.logps(self.policy, batch, **kwargs)
            if self.reference is None:
                raise RuntimeError("the reference model is not loaded (precomputed log-probs are missing)")
            return self.logps(self.reference, batch, **kwargs)

    def reference_values(self, batch: dict[str, Any]) -> Tensor:
        """``[B, m]`` per-row reference quantities the loss needs (implemented by subclasses)."""
        raise NotImplementedError

    def cache_options(self) -> str:
        """Options that change :meth:`reference_values` (part of the cache key)."""
        return ""

    # ------------------------------------------------------- precomputed values
    def reference_values_for(self, batch: dict[str, Any], split: str) -> Tensor:
        """:meth:`reference_values` of ``batch``, from the precomputed table when enabled."""
        if self.precompute_ref_logps:
            return self.ref_table(split)[batch["index"]]
        return self.reference_values(batch)

    def ref_table(self, split: str) -> Tensor:
        """``[N, m]`` reference values of every row of ``split``, computed or loaded once."""
        datamodule = self.trainer.datamodule
        fingerprint = datamodule.fingerprint(split)
        cached = self.ref_tables.get(split)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        source = self.ref_model_source or self.model_source
        key = f"{type(self).__name__}|{fingerprint}|{source}|{self.reference_kind}|{self.cache_options()}"
        cache = RefLogpCache(self.ref_cache_dir, key)
        table = cache.load()
        if table is None:
            table = self._compute_ref_table(split, cache)
        self.ref_tables[split] = (fingerprint, table.to(self.device))
        return self.ref_tables[split][1]

    def _compute_ref_table(self, split: str, cache: RefLogpCache) -> Tensor:
        if self.reference is None and not self.ref_tables and self.reference_kind in ("copy", "model", "adapter"):
            self.load_reference()
            if self.reference is not None:
                self.reference.to(self.device)
        if self.reference is None and self.reference_kind in ("copy", "model"):
            raise RuntimeError(
                f"no precomputed reference log-probs for the {split} data and no reference model to compute "
                "them with; run fit on this data first or set precompute_ref_logps=false"
            )
        # Every rank scores every row in order (no sampler), so no collective is needed and every
        # rank ends with the same table.
        loader = self.trainer.datamodule.sequential_dataloader(split)
        rows = [
            self.reference_values(self.trainer.strategy.batch_to_device(batch)).float().cpu()
            for batch in tqdm(loader, desc=f"reference log-probs ({split})", disable=not self.trainer.is_global_zero)
        ]
        table = torch.cat(rows)
        cache.save(table, self.trainer.is_global_zero)
        return table

    def on_fit_start(self) -> None:
        if self.precompute_ref_logps:
            for split in self.trainer.datamodule.splits:
                self.ref_table(split)
            # The tables replace the network: free it.
            self.reference = None
