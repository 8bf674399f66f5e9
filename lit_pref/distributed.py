"""Distributed plumbing: FSDP2 sharding of every network, symmetric collectives, full state dicts.

Every function here is safe to call in a single process (it is then the identity or a plain
copy), so modules call them unconditionally. Each one that communicates is a collective: every
rank must call it at the same point, with the same arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn


def is_distributed() -> bool:
    """Whether a default process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Element-wise sum of ``tensor`` over every rank of the default process group.

    The identity in a single process (or before the process group exists), so modules call it
    unconditionally. Under DDP, FSDP and DeepSpeed the default group spans all ranks; every rank
    must call this at the same point of its step, as a collective.
    """
    if not is_distributed():
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def collective_device() -> torch.device:
    """Where tensors for the default group's collectives live (the current GPU under NCCL)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_agree(flag: bool, device: torch.device | str | None = None) -> bool:
    """Whether ``flag`` is true on every rank (a collective; ``flag`` itself in one process).

    Used before a branch that decides whether collectives run (e.g. "load the cached reference
    log-probs, or compute them with a sharded model"), so that every rank takes the same branch.
    """
    if not is_distributed():
        return flag
    if device is None or (dist.get_backend() == "nccl" and torch.device(device).type == "cpu"):
        device = collective_device()
    votes = all_reduce_sum(torch.tensor([float(flag)], device=device))
    return int(votes.item()) == dist.get_world_size()


def gather_keys(keys: list[str]) -> list[str]:
    """The sorted union of ``keys`` over every rank (a collective; sorted ``keys`` in one process)."""
    if not is_distributed():
        return sorted(set(keys))
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(set(keys)))
    return sorted({key for part in gathered for key in (part or [])})


# ------------------------------------------------------------------------------- FSDP2
def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (sharded by ``fully_shard``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def data_parallel_mesh(mesh: Any) -> Any:
    """The 1-D mesh to shard over: the ``data_parallel`` dimension of Lightning's 2-D mesh.

    Tensor parallelism is not implemented by lit_pref's modules; a mesh with a tensor-parallel
    dimension larger than one is refused rather than silently replicated.
    """
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"lit_pref shards with FSDP2 only; tensor_parallel_size={mesh['tensor_parallel'].size()} is not "
            "supported. Use lit_pref.distributed.FSDP2Strategy (configs/strategies/fsdp.yaml), or "
            "ModelParallelStrategy with tensor_parallel_size=1 and data_parallel_size=<world size>"
        )
    if "data_parallel" in names:
        return mesh["data_parallel"]
    if mesh.ndim != 1:
        raise ValueError(f"expected a 1-D device mesh or one with a 'data_parallel' dimension, got {mesh}")
    return mesh


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``, found through PEFT and other wrappers.

    A block list is any ``nn.ModuleList`` whose entries all have the same class and hold
    parameters (``model.layers`` in Llama / Qwen2 / Mistral, ``transformer.h`` in GPT-2…);
    the LoRA ``ModuleDict`` s PEFT adds inside the blocks are not lists, so they stay part of
    their block.
    """
    layers: list[nn.Module] = []
    inside: set[int] = set()  # modules of the blocks found so far (nested lists stay in their block)
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if len({type(m) for m in module}) == 1 and any(True for _ in module[0].parameters()):
            layers.extend(module)
            inside.update(id(m) for layer in module for m in layer.modules())
    return layers


def _owners_of(layers: list[nn.Module], model: nn.Module) -> list[nn.Module]:
    """The modules that directly hold a block list (the decoders: embeddings + blocks + norm)."""
    wanted = {id(layer) for layer in layers}
    owners = []
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and any(id(m) in wanted for m in child):
                owners.append(module)
                break
    return owners


def _unassigned(module: nn.Module, assigned: set[int]) -> bool:
    return any(id(p) not in assigned for p in module.parameters())


def shard_causal_lm(
    model: nn.Module,
    mesh: Any,
    *,
    reshard_after_forward: bool | None = None,
    mp_policy: Any = None,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (``torch.distributed.fsdp.fully_shard``); returns it.

    One function for every network a module holds (policy, reference, reward, value), frozen or
    trained, PEFT-wrapped or not, so they are all sharded the same way:

    1. each decoder layer (its LoRA weights included) is one group;
    2. each decoder — the module holding the layers: embeddings + final norm;
    3. the LM head separately, because :func:`lit_pref.ops.completion_logps` calls the decoder and
       the head separately (never the root's ``forward``), and every remaining leaf holder of
       parameters (a classifier's ``score``, a value head) likewise;
    4. the root last, only when it still holds parameters of its own, or with tied embeddings.

    Step 3 is why the root usually gets no group: a root group's hooks run only in the root's
    ``forward``, so calling ``get_decoder()`` / ``get_output_embeddings()`` directly would leave
    its parameters sharded; and FSDP2 makes the first group to run forward the root of its tree,
    which would then refuse a later ``model.generate``. Independent decoder and head groups work
    in any call order (generation through the root included). Tied input/output embeddings form
    one group (``fully_shard([decoder, head])``), since a parameter belongs to exactly one group;
    such a group cannot be a root, so the root is then sharded too and its tree initialised at
    once, after which the decoder and head may still be called on their own.

    Generation is made rank-synchronous (:func:`synced_generation`).

    Args:
        model: a ``transformers`` model (optionally PEFT-wrapped) or any module holding one.
        mesh: the device mesh; Lightning's 2-D ``(data_parallel, tensor_parallel)`` mesh is
            reduced to its data-parallel dimension.
        reshard_after_forward: free the gathered weights after each forward. ``None``: on for
            networks without trainable weights (a frozen reference never runs backward, so
            keeping its weights gathered would only cost memory), FSDP2's default otherwise.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` (``None``: parameters compute in their
            stored dtype; Lightning's ``*-mixed`` precision autocasts around them).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule) or is_sharded(model):
        return model
    mesh = data_parallel_mesh(mesh)
    if reshard_after_forward is None:
        trainable = any(p.requires_grad for p in model.parameters())
        reshard_after_forward = None if trainable else True
    kwargs: dict[str, Any] = {"mesh": mesh}
    if reshard_after_forward is not None:
        kwargs["reshard_after_forward"] = reshard_after_forward
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy

    assigned: set[int] = set()

    def shard(target: nn.Module | list[nn.Module]) -> None:
        fully_shard(target, **kwargs)
        for module in target if isinstance(target, list) else [target]:
            assigned.update(id(p) for p in module.parameters())

    layers = decoder_layers(model)
    for layer in layers:
        shard(layer)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    tied = False
    for decoder in _owners_of(layers, model):
        if head is not None and any(id(p) in head_ids for p in decoder.parameters()):
            tied = True
            shard([decoder, head])
        elif _unassigned(decoder, assigned):
            shard(decoder)
    if head is not None and _unassigned(head, assigned):
        shard(head)

    def shard_rest(module: nn.Module) -> None:
        if not _unassigned(module, assigned):
            return
        if any(id(p) not in assigned for p in module.parameters(recurse=False)):
            shard(module)
            return
        for child in module.children():
            shard_rest(child)

    synced_generation(model)
    if tied or any(id(p) not in assigned for p in model.parameters(recurse=False)):
        shard(model)
        # A group of several modules cannot be the root of its tree, and FSDP2 makes the first
        # group that runs forward the root: initialise the tree from the real root now, so that
        # the decoder and the head can then be called on their own (a chunked-loss pattern
        # FSDP2 supports once the root is known). FSDP2 has no public call for this.
        fully_shard.state(model)._lazy_init()  # type: ignore[attr-defined]  # FSDP2 attaches .state at run time
    else:
        for child in model.children():
            shard_rest(child)
    return model


def synced_generation(model: nn.Module) -> None:
    """Make ``generate`` on ``model`` keep every rank stepping until all ranks have finished.

    With sharded or partitioned weights every forward is a collective, so a rank whose samples
    all hit EOS early must keep taking part (dummy forwards) while the others generate, or they
    hang. ``transformers`` does that (``synced_gpus``) for models it marks as FSDP-managed.
    """
    for module in model.modules():
        if callable(getattr(module, "generate", None)):
            module._is_fsdp_managed_module = True  # type: ignore[assignment]


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The full, unsharded state dict of ``module`` on the CPU.

    Under FSDP2 this is a collective (every rank must call it): the shards are gathered, and only
    global rank zero receives the tensors (the other ranks get ``{}``, so no rank but one holds a
    second full copy). Unsharded, it is a detached CPU copy on every rank.
    """
    if not is_sharded(module):
        return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast(dict[str, Tensor], get_model_state_dict(module, options=options))


# --------------------------------------------------------------------------- DeepSpeed
def _zero3_params(module: nn.Module | None) -> list[nn.Parameter]:
    return [] if module is None else [p for p in module.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def zero3_gathered(module: nn.Module | None) -> Iterator[None]:
    """Inside, ``module``'s DeepSpeed ZeRO-3 partitioned parameters are whole on every rank.

    A collective under ZeRO-3 (every rank must enter it); a no-op for any other module, so
    callers use it unconditionally around rank-zero-only reads such as ``save_pretrained``.
    """
    params = _zero3_params(module)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextlib.contextmanager
def zero3_loading(strategy: Any) -> Iterator[None]:
    """Make ``from_pretrained`` load real weights inside Lightning's ZeRO-3 ``zero.Init`` context.

    Lightning runs ``configure_model`` inside ``deepspeed.zero.Init`` under ZeRO stage 3, which
    partitions parameters as they are created; ``transformers`` then loads checkpoints into the
    partitions only when an ``HfDeepSpeedConfig`` is alive (its documented non-Trainer DeepSpeed
    integration). A no-op under every other strategy.
    """
    if not getattr(strategy, "zero_stage_3", False):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    config = HfDeepSpeedConfig(strategy.config)  # transformers holds a weak reference: keep it alive
    try:
        yield
    finally:
        del config


# ---------------------------------------------------------------------------- strategy
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` set up for plain FSDP2.

    ``ModelParallelStrategy`` resolves ``data_parallel_size="auto"`` to the number of nodes (it is
    built for tensor parallelism inside a node), which fails for pure FSDP on one node. Here
    ``"auto"`` means every rank (``num_nodes × devices / tensor_parallel_size``) and
    ``tensor_parallel_size`` defaults to 1, so ``devices`` and ``num_nodes`` alone choose the
    shape. The modules shard their networks in ``configure_model`` with
    :func:`shard_causal_lm` whenever Lightning gives them a device mesh.

    Args:
        data_parallel_size: ranks parameters are sharded over; ``"auto"``: all of them.
        tensor_parallel_size: must stay 1 (lit_pref's modules do not implement tensor parallelism).
        save_distributed_checkpoint: each rank saves its shards (a checkpoint directory); ``False``:
            the full weights and optimizer state are gathered into one file on rank 0.
        process_group_backend: ``nccl`` / ``gloo``… (``None``: the device's default).
        timeout: timeout of the process group's collectives.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if tensor_parallel_size != 1:
            raise ValueError("lit_pref shards with FSDP2 only: tensor_parallel_size must be 1")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
