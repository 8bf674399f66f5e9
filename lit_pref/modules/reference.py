"""The reference model as an explicit choice, and its precomputed log-prob cache."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from tqdm.auto import tqdm

from lit_pref.distributed import all_ranks_agree
from lit_pref.models import disable_dropout, freeze, is_adapter_dir, load_causal_lm
from lit_pref.modules.base import AlignmentModule
from lit_pref.types import CompletionLogps

ReferenceKind = Literal["auto", "copy", "model", "adapter_disabled", "adapter", "none"]

# Files whose identity stands for a local model directory in the cache key.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model")


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
    if kind != "none" and reference_free:
        raise ValueError(f"reference={kind!r} with reference_free=True: a reference-free loss uses reference='none'")
    if kind == "model" and not ref_model:
        raise ValueError("reference='model' needs ref_model_name_or_path")
    if kind != "model" and ref_model:
        raise ValueError(f"ref_model_name_or_path is given but reference={kind!r}; use reference='model' (or auto)")
    if kind == "adapter_disabled" and adapter_source:
        raise ValueError(
            "reference='adapter_disabled' with a policy that starts from an existing adapter would make "
            "the base model (not your SFT model) the reference; use reference='adapter'"
        )
    if kind == "adapter_disabled" and not peft:
        raise ValueError("reference='adapter_disabled' needs a LoRA policy (set peft)")
    if kind == "adapter" and not adapter_source:
        raise ValueError("reference='adapter' needs model_name_or_path to be a PEFT adapter directory")
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


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout), then put every submodule's mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _directory_fingerprint(path: Path) -> str:
    """Names, sizes and modification times of a model directory's weight and config files."""
    entries = []
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in _WEIGHT_SUFFIXES:
            stat = file.stat()
            entries.append(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:20]


def model_fingerprint(source: str | torch.nn.Module) -> str:
    """A cheap identity of a model's weights for cache keys.

    A local directory is identified by its weight/config files' names, sizes and modification
    times (an adapter directory also by its base model); a hub id by the commit of its cached
    snapshot when there is one; a model object by a hash of its weights.
    """
    if isinstance(source, str):
        path = Path(source)
        if path.is_dir():
            fingerprint = _directory_fingerprint(path)
            if is_adapter_dir(source):
                base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
                if base:
                    fingerprint += "+" + model_fingerprint(base)
            return fingerprint
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
            if isinstance(cached, str):
                return f"{source}@{Path(cached).parent.name}"
        except Exception:  # not a valid repo id, or no cache: the id is all we have
            pass
        return source
    digest = hashlib.sha256()
    for name, tensor in source.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


class RefLogpCache:
    """Per-row reference log-probs of one split, stored on disk under a data + model key.

    Args:
        directory: where cache files live.
        key: identifies the data, the reference weights and every option that changes the values.
    """

    def __init__(self, directory: str | Path, key: str) -> None:
        self.key = key
        self.path = Path(directory) / f"ref_logps-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"

    def load(self) -> torch.Tensor | None:
        if self.path.is_file():
            rank_zero_info(f"reusing precomputed reference log-probs from {self.path}")
            return torch.load(self.path, weights_only=True)
        return None

    def save(self, table: torch.Tensor, is_global_zero: bool) -> None:
        if is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so an interrupted run never leaves a truncated cache behind.
            partial = self.path.with_suffix(".partial")
            torch.save(table, partial)
            partial.replace(self.path)
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
        if ref_adapter_name == "default":
            raise ValueError("ref_adapter_name must differ from 'default', the name of the trained adapter")
        self.ref_model_source = ref_model_name_or_path
        self.ref_adapter_name = ref_adapter_name
        self.precompute_ref_logps = precompute_ref_logps
        self.ref_cache_dir = ref_cache_dir
        self.reference: torch.nn.Module | None = None
        self.ref_tables: dict[str, tuple[str, Tensor]] = {}
        # Set once fit has built its tables and dropped the reference network.
        self.reference_released = False
        self._ref_fingerprint: str | None = None
        self._policy_as_reference = False
        how = "precomputed once and cached" if precompute_ref_logps else "computed every step"
        rank_zero_info(f"{type(self).__name__} reference: {self.reference_kind} ({how})")

    # ----------------------------------------------------------------- networks
    def load_reference(self) -> None:
        """Build the reference network the chosen kind needs (adapters live inside the policy)."""
        if self.reference_kind == "copy":
            source = self.model_source
            reference = (
                copy.deepcopy(self.policy)
                if not isinstance(source, str)
                else load_causal_lm(source, self.dtype_name, self.attn_implementation)
            )
        elif self.reference_kind == "model":
            reference = load_causal_lm(self.ref_model_source, self.dtype_name, self.attn_implementation)
        elif self.reference_kind == "adapter":
            if self.ref_adapter_name not in self.policy.peft_config:
                self.policy.load_adapter(self.model_source, adapter_name=self.ref_adapter_name, is_trainable=False)
                if self.zero_dropout:
                    disable_dropout(self.policy)
            return
        else:
            return
        if self.zero_dropout:
            disable_dropout(reference)
        self.reference = freeze(reference)

    def release_reference(self) -> None:
        """Drop the reference network (or reference adapter) once its values are tabled."""
        self.reference = None
        if self.reference_kind == "adapter" and self.ref_adapter_name in getattr(self.policy, "peft_config", {}):
            self.policy.delete_adapter(self.ref_adapter_name)
        self.reference_released = True

    def configure_model(self) -> None:
        first = self.policy is None
        if first and self.precompute_ref_logps and not isinstance(self.model_source, str):
            # Fingerprint a model object before LoRA wrapping changes its state dict.
            self._ref_fingerprint = model_fingerprint(self.model_source)
        super().configure_model()
        if first and not self.precompute_ref_logps:
            self.load_reference()

    def reference_logps(self, batch: dict[str, Any], **kwargs: Any) -> CompletionLogps:
        """Reference completion log-probs of ``batch`` (no grad, eval mode) under the configured reference."""
        kwargs.setdefault("share_prompt", getattr(self, "share_prompt", True))
        with torch.no_grad():
            if self.reference_kind == "adapter_disabled":
                with self.policy.disable_adapter(), eval_mode(self.policy):
                    return self.logps(self.policy, batch, **kwargs)
            if self.reference_kind == "adapter":
                if self.ref_adapter_name not in getattr(self.policy, "peft_config", {}):
                    raise RuntimeError(f"the reference adapter {self.ref_adapter_name!r} is not loaded")
                with active_adapter(self.policy, self.ref_adapter_name), eval_mode(self.policy):
                    return self.logps(self.policy, batch, **kwargs)
            reference = self.policy if self._policy_as_reference else self.reference
            if reference is None:
                raise RuntimeError("the reference model is not loaded (precomputed log-probs are missing)")
            with eval_mode(reference):
                return self.logps(reference, batch, **kwargs)

    def reference_values(self, batch: dict[str, Any]) -> Tensor:
        """``[B, m]`` per-row reference quantities the loss needs (implemented by subclasses)."""
        raise NotImplementedError

    def cache_options(self) -> str:
        """Options that change :meth:`reference_values` (part of the cache key)."""
        return ""

    # ------------------------------------------------------- precomputed values
    def reference_fingerprint(self) -> str:
        """Identity of the reference weights (part of the cache key)."""
        if self.reference_kind == "model":
            return model_fingerprint(self.ref_model_source)
        if self._ref_fingerprint is None:
            self._ref_fingerprint = model_fingerprint(self.model_source)
        return self._ref_fingerprint

    def reference_values_for(self, batch: dict[str, Any], split: str) -> Tensor:
        """:meth:`reference_values` of ``batch``, from the precomputed table when enabled."""
        if self.precompute_ref_logps:
            return self.ref_table(split)[batch["index"]]
        return self.reference_values(batch)

    def ref_table(self, split: str) -> Tensor:
        """``[N, m]`` reference values of every row of ``split`` (by its ``index``), computed or loaded once."""
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "fingerprint"):
            raise RuntimeError(
                "precompute_ref_logps needs lit_pref's PreferenceDataModule (a data fingerprint and a "
                "sequential loader); set precompute_ref_logps=false with other data modules"
            )
        fingerprint = datamodule.fingerprint(split)
        cached = self.ref_tables.get(split)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        key = "|".join(
            (
                type(self).__name__,
                fingerprint,
                self.reference_kind,
                self.reference_fingerprint(),
                self.dtype_name,
                str(self.attn_implementation),
                self.cache_options(),
            )
        )
        cache = RefLogpCache(self.ref_cache_dir, key)
        # Every rank takes the same branch (a rank without the file, e.g. on another node's disk,
        # would otherwise score alone and hang the collectives of a sharded reference).
        table = cache.load() if all_ranks_agree(cache.path.is_file(), self.device) else None
        if table is None:
            table = self._compute_ref_table(split, cache)
        self.ref_tables[split] = (fingerprint, table.to(self.device))
        return self.ref_tables[split][1]

    def _policy_is_reference(self) -> bool:
        """Whether the policy still holds its starting weights (a ``copy`` reference can use it)."""
        trainer = self.trainer
        return self.reference_kind == "copy" and trainer.ckpt_path is None and trainer.global_step == 0

    def _compute_ref_table(self, split: str, cache: RefLogpCache) -> Tensor:
        if self.reference_released:
            raise RuntimeError(
                f"no precomputed reference log-probs for this {split} data (no cache at {cache.path}) and "
                "the reference network was released after fit; run fit on this data first, or set "
                "precompute_ref_logps=false to keep the reference in memory"
            )
        use_policy = self._policy_is_reference()
        if not use_policy and self.reference is None:
            if self.reference_kind == "copy" and not isinstance(self.model_source, str):
                raise RuntimeError(
                    f"no precomputed reference log-probs for this {split} data and the policy no longer holds "
                    "the weights of the model object it started from; pass a model path, or set "
                    "precompute_ref_logps=false"
                )
            self.load_reference()
            self.shard_networks()  # under FSDP2, sharded like the policy it is compared with
            if self.reference is not None:
                self.reference.to(self.device)
        # Every rank scores every row in order (no sampler), so no collective is needed and every
        # rank ends with the same table.
        loader = self.trainer.datamodule.sequential_dataloader(split)
        indices, rows = [], []
        # The starting policy *is* a copy reference: score with it rather than load a second copy.
        self._policy_as_reference = use_policy
        try:
            for batch in tqdm(
                loader, desc=f"reference log-probs ({split})", disable=not self.trainer.is_global_zero
            ):
                batch = self.trainer.strategy.batch_to_device(batch)
                rows.append(self.reference_values(batch).float().cpu())
                indices.append(batch["index"].cpu())
        finally:
            self._policy_as_reference = False
        index, values = torch.cat(indices), torch.cat(rows)
        if index.min() < 0 or index.unique().numel() != index.numel():
            raise ValueError(f"the {split} data's 'index' column must hold unique non-negative row ids")
        # Rows are looked up by their index column, so any order or gaps in it are fine; an index
        # never scored reads NaN, which the NaN alarm reports.
        table = torch.full((int(index.max()) + 1, values.shape[1]), float("nan"))
        table[index] = values
        cache.save(table, self.trainer.is_global_zero)
        return table

    def on_fit_start(self) -> None:
        if self.precompute_ref_logps:
            for split in self.trainer.datamodule.splits:
                self.ref_table(split)
            # The tables replace the network: free it.
            self.release_reference()
