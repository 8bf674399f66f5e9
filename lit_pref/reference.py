"""The reference model as a component: which one, loaded how, scored how; and its precomputed table.

:class:`Reference` resolves, builds and scores the reference of any module that compares with
one (DPO, KTO, BCO, PPO, GRPO). :class:`RefLogpTable` holds precomputed reference values per
split and their disk cache; only the offline modules, which can precompute, hold one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_pref.models import freeze, is_adapter_dir
from lit_pref.ops import batch_logps
from lit_pref.types import CausalLM, CompletionBatch, CompletionLogps

try:  # POSIX file locks; without them (Windows) concurrent runs still never share a temporary file
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

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
def active_adapter(model: CausalLM, name: str) -> Iterator[None]:
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
    """A hash of the names and contents of a model directory's weight and config files.

    The contents, not sizes and modification times: weights rewritten in place with their
    mtime kept (``cp -p``, ``rsync -a``, ``tar x``) must not be served a stale cache. Reading
    the files costs about a second per GB, once per run that precomputes.
    """
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"{file.relative_to(path)}\0".encode())
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:20]


def model_fingerprint(source: str | torch.nn.Module) -> str:
    """A cheap identity of a model's weights for cache keys.

    A local directory is identified by a hash of its weight/config files' names and contents
    (an adapter directory also by its base model); a hub id by the commit of its cached
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
        """The cached table, or ``None`` when there is none or it cannot be read (then it is
        reported in one line and removed, so that it is rebuilt)."""
        if not self.path.is_file():
            return None
        try:
            table = torch.load(self.path, weights_only=True)
            if not isinstance(table, torch.Tensor) or table.dim() != 2:
                raise ValueError(f"holds a {type(table).__name__}, not a [rows, values] tensor")
        except Exception as error:  # a truncated or foreign file: any reader error means the same
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            rank_zero_warn(f"the reference-log-prob cache {self.path} is unreadable ({reason}); rebuilding it")
            self.path.unlink(missing_ok=True)
            return None
        rank_zero_info(f"reusing precomputed reference log-probs from {self.path}")
        return table

    @contextlib.contextmanager
    def lock(self, is_global_zero: bool) -> Iterator[None]:
        """Hold the cache's lock file (global rank zero only: the ranks of one run score together,
        and a rank waiting on its own run would hang the others' collectives). Another run on the
        same cache waits here, then finds the table written instead of computing it again."""
        if not is_global_zero or fcntl is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                rank_zero_info(f"waiting for another run that is computing {self.path}")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def save(self, table: torch.Tensor, is_global_zero: bool) -> None:
        if is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A temporary name of this process's own, renamed atomically: an interrupted run never
            # leaves a truncated cache, and two runs sharing the directory never write one file.
            partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
            torch.save(table, partial)
            os.replace(partial, self.path)
            rank_zero_info(f"cached reference log-probs to {self.path}")


class Reference(torch.nn.Module):
    """The frozen reference π_ref of a module, as one explicit, checked choice.

    A ``torch.nn.Module`` so that a reference network of its own (``copy``, ``model``) is a
    submodule of the LightningModule: moved to the device, sharded and checkpointed with it.
    Adapter kinds keep no network here: they score through the policy.

    Three verbs: :meth:`build` loads what the kind needs, :meth:`logps` scores a batch (no
    grad, eval mode), :meth:`release` frees it once its values are precomputed.

    Args:
        kind: ``copy`` (a frozen copy of the starting policy), ``model`` (another model),
            ``adapter_disabled`` (the policy's base under a fresh LoRA), ``adapter`` (a frozen
            copy of the starting adapter) or ``none``; resolve ``auto`` with
            :func:`resolve_reference` first.
        source: what ``copy`` / ``adapter`` load (the policy's source) or ``model`` loads.
        adapter_name: the name under which the frozen reference adapter is loaded.
    """

    def __init__(self, kind: str, source: str | torch.nn.Module | None, adapter_name: str = "reference") -> None:
        super().__init__()
        if adapter_name == "default":
            raise ValueError("ref_adapter_name must differ from 'default', the name of the trained adapter")
        self.kind = kind
        self.source = source
        self.adapter_name = adapter_name
        self.network: torch.nn.Module | None = None
        # The starting policy standing in for the copy it equals (see :meth:`policy_standing_in`).
        self._stand_in = False

    def build(self, policy: CausalLM, load: Callable[[str], torch.nn.Module]) -> None:
        """Load what the kind needs: a frozen network (``copy``, ``model``) or the reference adapter
        inside ``policy`` (``adapter``); nothing for ``adapter_disabled`` and ``none``.

        Args:
            policy: the module's policy, already built.
            load: loads a causal LM from a path or hub id with the policy's settings (dtype,
                attention, dropout).
        """
        if self.kind == "adapter":
            if self.adapter_name not in policy.peft_config:
                policy.load_adapter(self.source, adapter_name=self.adapter_name, is_trainable=False)
            return
        if self.kind not in ("copy", "model") or self.network is not None:
            return
        source = self.source
        self.network = freeze(copy.deepcopy(policy) if isinstance(source, torch.nn.Module) else load(str(source)))

    def release(self, policy: CausalLM) -> None:
        """Drop the reference network (or the reference adapter inside ``policy``)."""
        self.network = None
        if self.kind == "adapter" and self.adapter_name in getattr(policy, "peft_config", {}):
            policy.delete_adapter(self.adapter_name)

    def logps(self, policy: CausalLM, batch: CompletionBatch, **kwargs: Any) -> CompletionLogps:
        """Reference completion log-probs of ``batch`` (no grad, eval mode) through the shared path.

        Args:
            policy: the module's policy (adapter kinds score through it).
            batch: prompts and completions.
            **kwargs: options of :func:`~lit_pref.ops.completion_logps` (``chunk_size``,
                ``share_prompt``, ``temperature``…).
        """
        with torch.no_grad(), self._scoring_model(policy) as model, eval_mode(model):
            return batch_logps(model, batch, **kwargs)

    @contextlib.contextmanager
    def policy_standing_in(self) -> Iterator[None]:
        """While the policy still holds its starting weights, let it score in place of the
        ``copy`` it equals (precomputing a table needs no second copy in memory)."""
        if self.kind != "copy":
            raise ValueError(f"only a copy reference equals the starting policy, not {self.kind!r}")
        self._stand_in = True
        try:
            yield
        finally:
            self._stand_in = False

    @contextlib.contextmanager
    def _scoring_model(self, policy: CausalLM) -> Iterator[torch.nn.Module]:
        if self.kind == "adapter_disabled":
            with policy.disable_adapter():
                yield policy
        elif self.kind == "adapter":
            if self.adapter_name not in getattr(policy, "peft_config", {}):
                raise RuntimeError(f"the reference adapter {self.adapter_name!r} is not loaded")
            with active_adapter(policy, self.adapter_name):
                yield policy
        elif self._stand_in:
            yield policy
        elif self.network is None:
            raise RuntimeError(
                "the reference model is not loaded (reference='none', or its log-probs were precomputed)"
            )
        else:
            yield self.network

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class RefLogpTable:
    """Precomputed per-row reference values of each split, in memory and on disk.

    Each split's ``[N, m]`` table is looked up by the batch's ``index`` column. On disk it is
    keyed by the data, the reference weights and every option that changes the values, so the
    next run with the same key reuses it.

    Args:
        cache_dir: where cache files live.
        reference_fingerprint: identity of the reference weights (:func:`model_fingerprint`).
    """

    def __init__(self, cache_dir: str | Path, reference_fingerprint: str) -> None:
        self.cache_dir = Path(cache_dir)
        self.reference_fingerprint = reference_fingerprint
        self.tables: dict[str, tuple[str, Tensor]] = {}
        # Set once fit has built its tables and released the reference network.
        self.reference_released = False

    def get(self, split: str, data_fingerprint: str) -> Tensor | None:
        """The in-memory table of ``split`` if it was built for this data."""
        entry = self.tables.get(split)
        return entry[1] if entry is not None and entry[0] == data_fingerprint else None

    def put(self, split: str, data_fingerprint: str, table: Tensor) -> Tensor:
        self.tables[split] = (data_fingerprint, table)
        return table

    def disk_cache(self, *key_parts: str) -> RefLogpCache:
        """The disk cache of one split's table; ``key_parts`` name the data and the options."""
        return RefLogpCache(self.cache_dir, "|".join((*key_parts, self.reference_fingerprint)))
