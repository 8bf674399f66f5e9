"""The bases of modules that compare with a reference: the arguments that choose it, and, for the
offline algorithms, the precomputed table.

The reference itself is a component (:class:`lit_pref.reference.Reference`); these classes only
turn the flat YAML arguments into it and build it beside the policy.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from tqdm.auto import tqdm

from lit_pref.distributed import all_ranks_agree
from lit_pref.models import disable_dropout, is_adapter_dir
from lit_pref.modules.base import AlignmentModule
from lit_pref.reference import (
    Reference,
    ReferenceKind,
    RefLogpCache,
    RefLogpTable,
    model_fingerprint,
    resolve_reference,
)
from lit_pref.types import CompletionBatch, CompletionLogps


class ReferenceModule(AlignmentModule):
    """An :class:`AlignmentModule` that compares the policy with a frozen reference (DPO, KTO, BCO,
    PPO, GRPO): ``self.reference`` is a :class:`~lit_pref.reference.Reference`.

    Args:
        reference: ``auto``, ``copy`` (frozen copy of the starting policy), ``model``
            (``ref_model_name_or_path``), ``adapter_disabled`` (the policy's base under a fresh
            LoRA), ``adapter`` (a frozen copy of the starting adapter, so the reference is the SFT
            model and not the base) or ``none`` (reference-free losses). ``auto`` picks one and
            logs which.
        ref_model_name_or_path: a separate reference model (hub id or local path).
        ref_adapter_name: the name under which the frozen reference adapter is loaded.
        reference_free: set by losses that need no reference (the subclass passes it).
        **kwargs: :class:`~lit_pref.modules.base.AlignmentModule` arguments (model, LoRA,
            optimizer, export…).
    """

    def __init__(
        self,
        reference: ReferenceKind = "auto",
        ref_model_name_or_path: str | None = None,
        ref_adapter_name: str = "reference",
        reference_free: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        kind = resolve_reference(
            reference,
            peft=self.peft_config is not None,
            ref_model=ref_model_name_or_path is not None,
            adapter_source=is_adapter_dir(self.model_source),
            reference_free=reference_free,
        )
        source = ref_model_name_or_path if kind == "model" else self.model_source
        self.reference = Reference(kind, source, ref_adapter_name)

    @property
    def keeps_reference_in_memory(self) -> bool:
        """Whether the reference is built with the policy (not when its values are precomputed)."""
        return True

    def build_networks(self) -> None:
        super().build_networks()
        if self.keeps_reference_in_memory:
            self.load_reference()

    def load_reference(self) -> None:
        """Build the reference beside the policy, with the policy's dropout setting."""
        self.reference.build(self.policy, self.load_network)
        if self.zero_dropout and self.reference.kind == "adapter":
            # The reference adapter's dropout layers live inside the policy.
            disable_dropout(self.policy)

    def reference_logps(self, batch: CompletionBatch, **kwargs: Any) -> CompletionLogps:
        """Reference completion log-probs of ``batch`` through the shared path (no grad, eval mode)."""
        kwargs.setdefault("chunk_size", self.chunk_size)
        kwargs.setdefault("packed_attention", self.packed_attention)
        return self.reference.logps(self.policy, batch, **kwargs)


class OfflineReferenceModule(ReferenceModule):
    """A :class:`ReferenceModule` trained on a fixed dataset (DPO, KTO, BCO), whose reference values
    can be precomputed once per row instead of keeping the reference in memory.

    Subclasses implement :meth:`reference_values` (the ``[B, m]`` per-row reference quantities
    their loss needs) and read them through :meth:`reference_values_for`.

    Args:
        precompute_ref_logps: compute the reference values once, after the strategy has set the
            model up, cache them on disk under a data + model key (reused by the next run), and
            keep no reference network in memory.
        ref_cache_dir: where precomputed reference values are cached.
        **kwargs: :class:`ReferenceModule` arguments (the reference choice) and
            :class:`~lit_pref.modules.base.AlignmentModule` ones (model, LoRA, optimizer, export…).
    """

    def __init__(
        self, precompute_ref_logps: bool = False, ref_cache_dir: str = ".lit_pref_cache", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        kind = self.reference.kind
        if precompute_ref_logps and kind == "none":
            raise ValueError("precompute_ref_logps has nothing to compute with a reference-free loss")
        self.ref_logp_table: RefLogpTable | None = None
        if precompute_ref_logps:
            # Fingerprinted now: LoRA wrapping would change a model object's state dict.
            source = self.reference.source if kind == "model" else self.model_source
            assert source is not None
            self.ref_logp_table = RefLogpTable(ref_cache_dir, model_fingerprint(source))
        how = "precomputed once and cached" if precompute_ref_logps else "computed every step"
        rank_zero_info(f"{type(self).__name__} reference: {kind} ({how})")

    @property
    def keeps_reference_in_memory(self) -> bool:
        return self.ref_logp_table is None

    def reference_values(self, batch: Any) -> Tensor:
        """``[B, m]`` per-row reference quantities the loss needs (implemented by subclasses)."""
        raise NotImplementedError

    def cache_options(self) -> str:
        """Options that change :meth:`reference_values` (part of the cache key)."""
        return ""

    def reference_values_for(self, batch: Any, split: str) -> Tensor:
        """:meth:`reference_values` of ``batch``, from the precomputed table when enabled."""
        if self.ref_logp_table is None:
            return self.reference_values(batch)
        return self.reference_table(split)[batch["index"]]

    # ------------------------------------------------------- precomputed values
    def reference_table(self, split: str) -> Tensor:
        """``[N, m]`` reference values of every row of ``split`` (by its ``index``), computed or loaded once."""
        table = self.ref_logp_table
        assert table is not None, "reference_table needs precompute_ref_logps"
        datamodule = self.datamodule()
        if datamodule is None or not hasattr(datamodule, "fingerprint"):
            raise RuntimeError(
                "precompute_ref_logps needs lit_pref's PreferenceDataModule (a data fingerprint and a "
                "sequential loader); set precompute_ref_logps=false with other data modules"
            )
        fingerprint = datamodule.fingerprint(split)
        values = table.get(split, fingerprint)
        if values is not None:
            return values
        cache = table.disk_cache(
            type(self).__name__,
            fingerprint,
            self.reference.kind,
            self.dtype_name,
            str(self.attn_implementation),
            self.cache_options(),
        )
        with cache.lock(self.trainer.is_global_zero):
            # Every rank takes the same branch (a rank without the file, e.g. on another node's disk,
            # would otherwise score alone and hang the collectives of a sharded reference).
            loaded = cache.load() if all_ranks_agree(cache.path.is_file(), self.device) else None
            if not all_ranks_agree(loaded is not None, self.device):
                loaded = None  # unreadable on some rank: every rank rebuilds it
            if loaded is None:
                loaded = self.score_reference_table(split, cache)
        return table.put(split, fingerprint, loaded.to(self.device))

    def score_reference_table(self, split: str, cache: RefLogpCache) -> Tensor:
        """Score every row of ``split`` under the reference and save the table to ``cache``."""
        assert self.ref_logp_table is not None
        if self.ref_logp_table.reference_released:
            raise RuntimeError(
                f"no precomputed reference log-probs for this {split} data (no cache at {cache.path}) and "
                "the reference network was released after fit; run fit on this data first, or set "
                "precompute_ref_logps=false to keep the reference in memory"
            )
        reference = self.reference
        trainer = self.trainer
        # The starting policy *is* a copy reference: score with it rather than load a second copy.
        use_policy = reference.kind == "copy" and trainer.ckpt_path is None and trainer.global_step == 0
        if not use_policy and reference.network is None:
            if reference.kind == "copy" and not isinstance(self.model_source, str):
                raise RuntimeError(
                    f"no precomputed reference log-probs for this {split} data and the policy no longer holds "
                    "the weights of the model object it started from; pass a model path, or set "
                    "precompute_ref_logps=false"
                )
            self.load_reference()
            self.shard_networks()  # under FSDP2, sharded like the policy it is compared with
            reference.to(self.device)
        # Every rank scores every row in order (no sampler), so no collective is needed and every
        # rank ends with the same table.
        loader = self.datamodule().sequential_dataloader(split)
        indices, rows = [], []
        with reference.policy_standing_in() if use_policy else contextlib.nullcontext():
            for batch in tqdm(loader, desc=f"reference log-probs ({split})", disable=not trainer.is_global_zero):
                batch = trainer.strategy.batch_to_device(batch)
                rows.append(self.reference_values(batch).float().cpu())
                indices.append(batch["index"].cpu())
        index, values = torch.cat(indices), torch.cat(rows)
        if index.min() < 0 or index.unique().numel() != index.numel():
            raise ValueError(f"the {split} data's 'index' column must hold unique non-negative row ids")
        # Rows are looked up by their index column, so any order or gaps in it are fine; an index
        # never scored reads NaN, which stops training as a non-finite loss.
        table = torch.full((int(index.max()) + 1, values.shape[1]), float("nan"))
        table[index] = values
        cache.save(table, trainer.is_global_zero)
        return table

    def on_fit_start(self) -> None:
        if self.ref_logp_table is not None:
            for split in self.datamodule().splits:
                self.reference_table(split)
            # The tables replace the network: free it.
            self.reference.release(self.policy)
            self.ref_logp_table.reference_released = True
