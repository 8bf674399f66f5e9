"""The plumbing every algorithm shares: loading the policy, optimizers, metrics, export."""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, get_args

import torch
from lightning import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_pref.callbacks.faults import CheckpointOnSignal, StopOnDivergence, TrainingDiverged
from lit_pref.data.sampling import global_seed
from lit_pref.distributed import (
    full_state_dict,
    is_sharded,
    shard_causal_lm,
    synced_generation,
    zero3_gathered,
    zero3_loading,
)
from lit_pref.metrics import MetricGroup
from lit_pref.models import (
    apply_lora,
    disable_dropout,
    enable_activation_checkpointing,
    is_adapter_dir,
    is_peft_model,
    is_quantized,
    load_adapter_model,
    load_causal_lm,
    load_tokenizer,
    merge_into_full_precision,
    prepare_kbit_training,
    quantized_layers,
)
from lit_pref.ops import PackedAttention, batch_logps
from lit_pref.resume import (
    CHECKPOINT_KEY,
    logger_records,
    restore_rank_rng,
    rng_state,
    rng_states_of_all_ranks,
    seed_all,
    set_rng_state,
)
from lit_pref.types import CausalLM, CompletionBatch, CompletionLogps

log = logging.getLogger(__name__)


def default_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass over each tensor instead of one per operation), or
    the plain implementation for parameters the fused kernel does not take."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr)


class AlignmentModule(LightningModule):
    """Base of every lit_pref module: a trainable policy plus what all algorithms need.

    Subclasses set ``data_target`` (the data shape they train on) and implement
    :meth:`shared_step` (or ``training_step`` / ``validation_step``); they add their other
    networks by overriding :meth:`build_networks`.

    Args:
        model_name_or_path: the policy: a hub id, a local directory, or a model object.
        tokenizer_name_or_path: the tokenizer, when it differs from ``model_name_or_path``.
        dtype: weight dtype when loading (``auto``, ``float32``, ``bfloat16``, ``float16``).
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``… (``None``: the model's default).
        peft: LoRA settings (``peft.LoraConfig`` fields, e.g. ``{r: 16, lora_alpha: 32,
            target_modules: all-linear}``); ``None`` trains all weights.
        quantization: QLoRA: load the policy's base quantized by bitsandbytes, the fields of
            ``transformers.BitsAndBytesConfig`` (e.g. ``{load_in_4bit: true, bnb_4bit_quant_type:
            nf4, bnb_4bit_compute_dtype: bfloat16}``, or ``{load_in_8bit: true}``); needs ``peft``
            (or an adapter directory as the policy). The base stays frozen and quantized; a frozen
            reference loaded from a path is quantized the same way.
        gradient_checkpointing: recompute activations in backward to save memory.
        freeze_vision_tower: a vision-language policy trains its language model only (the vision
            tower and projector frozen); with ``peft`` the adapter skips them anyway.
        disable_dropout: zero every dropout probability (default on: preference losses compare
            forward passes, and dropout noise biases them).
        chunk_size: completion tokens per LM-head chunk in the log-prob path.
        packed_attention: how padding-free rows (``packing: true``) keep their examples apart:
            ``spans`` runs SDPA once per prompt and completion span (:mod:`lit_pref.attention`),
            ``mask`` passes a dense ``[R, 1, T, T]`` block-causal mask (eager / SDPA attention),
            ``position_ids`` passes no mask and lets ``transformers`` find the examples from the
            restarting position ids (the flash-attention varlen path; one completion per prompt
            only); ``auto`` picks ``spans`` for SDPA, ``mask`` for eager and ``position_ids``
            for flash attention.
        optimizer: optimizer factory; default AdamW at the module's ``default_lr`` (the fused
            kernel where the parameters allow it).
        lr_scheduler: learning-rate scheduler factory (stepped every optimizer step).
        output_dir: where the trained policy and tokenizer are saved in Hugging Face format at
            the end of fit (``None``: not saved).
        merge_lora: merge a LoRA adapter into the weights when saving (with ``quantization``:
            into a full-precision copy of the base, loaded again from its source); ``False``
            saves the adapter alone.
        alarm_after_steps: optimizer steps after which a loss still at its starting value is
            reported (0 disables the check). A non-finite loss or gradient stops the run (see
            :class:`~lit_pref.callbacks.faults.StopOnDivergence`, also for loss spikes).
    """

    data_target: ClassVar[str] = "paired"
    default_lr: ClassVar[float] = 1e-5
    # The loss value that means "nothing learned yet"; None when there is no such value.
    stuck_loss: float | None = None
    # What the export holds, for the log line.
    exported_name: ClassVar[str] = "policy"

    def __init__(
        self,
        model_name_or_path: str | PreTrainedModel,
        tokenizer_name_or_path: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        peft: dict[str, Any] | None = None,
        quantization: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        freeze_vision_tower: bool = False,
        disable_dropout: bool = True,
        chunk_size: int = 1024,
        packed_attention: PackedAttention = "auto",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        output_dir: str | None = None,
        merge_lora: bool = True,
        alarm_after_steps: int = 20,
    ) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if packed_attention not in get_args(PackedAttention):
            raise ValueError(f"packed_attention must be one of {', '.join(get_args(PackedAttention))}, got {packed_attention!r}")
        self.model_source = model_name_or_path
        tokenizer_source = tokenizer_name_or_path or model_name_or_path
        if not isinstance(tokenizer_source, str):
            raise ValueError("pass tokenizer_name_or_path when model_name_or_path is a model object")
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(tokenizer_source)
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.peft_config = peft
        if quantization is not None and peft is None and not is_adapter_dir(model_name_or_path):
            raise ValueError(
                "quantization trains a LoRA adapter on the frozen quantized base: set peft (e.g. "
                "{r: 16, lora_alpha: 32, target_modules: all-linear}) or start from an adapter directory"
            )
        self.quantization = quantization
        self.gradient_checkpointing = gradient_checkpointing
        self.freeze_vision_tower = freeze_vision_tower
        self.zero_dropout = disable_dropout
        self.chunk_size = chunk_size
        self.packed_attention = packed_attention
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.output_dir = output_dir
        self.merge_lora = merge_lora
        self.alarm_after_steps = alarm_after_steps
        self.policy: Any = None  # a transformers / PEFT model once build_networks has run
        self._networks_built = False
        self.train_metrics = MetricGroup("train/")
        self.val_metrics = MetricGroup("val/")
        self._last_logged_step = -1
        # Set by the CLI: a hash of the run's configuration, saved in checkpoints so that resuming
        # the "last" checkpoint never picks another run's.
        self.run_identity: str | None = None
        self._resumed_rng: list[dict[str, Any]] | None = None
        self._training_rng: dict[str, Any] | None = None

    # ----------------------------------------------------------------- networks
    def load_policy(self) -> CausalLM:
        """Load the trainable policy (LoRA-wrapped when ``peft`` is set)."""
        if isinstance(self.model_source, str) and is_adapter_dir(self.model_source):
            if self.peft_config is not None:
                raise ValueError("model_name_or_path is already a PEFT adapter; drop the peft settings")
            policy = load_adapter_model(
                self.model_source, self.dtype_name, self.attn_implementation, quantization=self.quantization
            )
        else:
            policy = load_causal_lm(
                self.model_source, self.dtype_name, self.attn_implementation, quantization=self.quantization
            )
            if self.quantization is not None:
                policy = prepare_kbit_training(policy)
        if self.gradient_checkpointing:
            enable_activation_checkpointing(policy)
            policy.config.use_cache = False
        if self.freeze_vision_tower:
            from lit_pref.vision.modeling import freeze_vision_tower, is_vision_language

            if not is_vision_language(policy.config):
                raise ValueError("freeze_vision_tower: the policy has no vision tower (not a vision-language model)")
            freeze_vision_tower(policy)
        if self.peft_config is not None:
            policy = apply_lora(policy, self.peft_config)
        if self.zero_dropout:
            # After LoRA wrapping, so the adapters' own dropout is zeroed too.
            disable_dropout(policy)
        return policy.train()

    def load_network(self, source: str) -> torch.nn.Module:
        """A causal LM from ``source`` loaded as the policy is (dtype, attention, dropout), for the
        frozen networks a module compares with."""
        model = load_causal_lm(source, self.dtype_name, self.attn_implementation, quantization=self.quantization)
        if self.zero_dropout:
            disable_dropout(model)
        return model

    def datamodule(self) -> Any:
        """The trainer's data module (``None`` when fit was given bare data loaders, or outside a trainer)."""
        return getattr(self._trainer, "datamodule", None)

    def build_networks(self) -> None:
        """Build every network the module holds; called exactly once, by :meth:`configure_model`.

        The base builds the policy; a subclass that holds more (a reference, a value network,
        reward models) overrides this, calls ``super().build_networks()`` first, then builds its own.
        """
        self.policy = self.load_policy()

    def configure_model(self) -> None:
        """Build the networks (first call only), then shard them under FSDP2.

        Lightning calls this inside the strategy's context (sharded init under FSDP, partitioned
        under ZeRO-3) once per fit / validate call; building is not repeated. Override
        :meth:`build_networks`, not this.
        """
        if not self._networks_built:
            with zero3_loading(self._trainer.strategy if self._trainer is not None else None):
                self.build_networks()
            self._networks_built = True
        self.shard_networks()

    def shard_networks(self) -> None:
        """Shard every network the module holds, frozen ones included, when Lightning gave it a
        device mesh (FSDP2 through ``ModelParallelStrategy`` / ``FSDP2Strategy``); else a no-op.

        All go through the same :func:`~lit_pref.distributed.shard_causal_lm`, so a reference is
        sharded exactly as the policy it is compared with. Networks already sharded are skipped,
        so a network built later (a reference loaded in ``on_fit_start``) calls this again.
        """
        mesh = self.device_mesh
        zero_stage_3 = bool(getattr(self._trainer and self._trainer.strategy, "zero_stage_3", False))
        if self.quantization is not None and (mesh is not None or zero_stage_3):
            raise NotImplementedError(
                "a quantized (QLoRA) policy is not supported under FSDP2 or DeepSpeed ZeRO-3 yet; use DDP"
            )
        if mesh is None:
            if zero_stage_3:
                # ZeRO-3 partitions the networks itself; generation must still run in lockstep.
                for child in self.children():
                    synced_generation(child)
            return
        for child in self.children():
            if any(True for _ in child.parameters()):
                shard_causal_lm(child, mesh)

    def logps(self, model: torch.nn.Module, batch: CompletionBatch, **kwargs: Any) -> CompletionLogps:
        """Completion log-probs of ``batch`` under ``model`` through the shared path."""
        kwargs.setdefault("packed_attention", self.packed_attention)
        return batch_logps(model, batch, chunk_size=self.chunk_size, **kwargs)

    # -------------------------------------------------------------------- steps
    def shared_step(self, batch: Any, split: str) -> tuple[Tensor, dict[str, Tensor]]:
        """The step contract of every offline module: ``(loss, metrics)`` of one batch.

        ``loss`` is the scalar that is backpropagated; ``metrics`` maps names to detached
        tensors (per example, per token or scalar), averaged into ``train/<name>`` /
        ``val/<name>`` over the optimizer step's micro-batches and every rank. ``split`` is
        ``train`` or ``val``; state that only training updates (BCO's reward shift) is updated
        when it is ``train``.
        """
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss, metrics = self.shared_step(batch, "train")
        self.train_metrics.update(metrics)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        loss, metrics = self.shared_step(batch, "val")
        self.val_metrics.update(metrics)
        return loss

    # --------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("the module has no trainable parameters")
        if self.optimizer_factory is None:
            optimizer = default_optimizer(params, self.default_lr)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "step"}
        if self.automatic_optimization and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Lightning steps it with a monitored value (the online modules step it themselves).
            config["monitor"] = "train/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def configure_callbacks(self) -> list[Callback]:
        """A divergence stop and a checkpoint on SIGTERM / Ctrl-C in every run, with their defaults
        unless the trainer's callbacks already configure them."""
        present = getattr(self._trainer, "callbacks", [])
        return [
            callback()
            for callback in (StopOnDivergence, CheckpointOnSignal)
            if not any(isinstance(c, callback) for c in present)
        ]

    # ------------------------------------------------------------------ metrics
    def on_train_start(self) -> None:
        # The first log is due once the first optimizer step of this run is taken (not after the
        # first micro-batch of an accumulation window, nor again at a resumed step).
        self._last_logged_step = self.trainer.global_step
        if self._resumed_rng is not None:
            # Here, after the sanity check and data setup, right before the first resumed step:
            # the random stream continues exactly where the checkpointed run left it.
            restore_rank_rng(self._resumed_rng, self.trainer.global_rank)
            self._resumed_rng = None

    def on_validation_start(self) -> None:
        # Validation draws from a seed of its own (the same whenever it runs at a given step) and
        # hands the training stream back untouched, so it cannot shift a resumed run.
        self._training_rng = rng_state()
        seed_all(global_seed() + self.trainer.global_step)

    def on_validation_end(self) -> None:
        if self._training_rng is not None:
            set_rng_state(self._training_rng)
            self._training_rng = None

    # --------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add every rank's random state and the run identity (a collective: all ranks save).
        Subclasses that save state of their own call ``super()`` first."""
        # Saved during validation (a preemption there), the training stream is the one set aside.
        state = self._training_rng if self._training_rng is not None else rng_state()
        checkpoint[CHECKPOINT_KEY] = {
            "rng": rng_states_of_all_ranks(state),
            "run_identity": self.run_identity,
            "loggers": logger_records(self.trainer.loggers),
        }
        if self.quantization is not None:
            # The quantized base is frozen and loaded again from its source: checkpoints hold the
            # adapter, not a second copy of the base (whose packed layout load_state_dict refuses).
            prefixes = tuple(f"{name}.weight" for name in quantized_layers(self))
            state = checkpoint["state_dict"]
            for key in [key for key in state if key.startswith(prefixes)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.quantization is not None:
            # The base's weights as loaded (see on_save_checkpoint), so the strict load finds them.
            for name, layer in quantized_layers(self).items():
                checkpoint["state_dict"].setdefault(f"{name}.weight", layer.weight)
        saved = checkpoint.get(CHECKPOINT_KEY, {})
        self._resumed_rng = saved.get("rng")
        if self._resumed_rng is None:
            rank_zero_warn("the checkpoint holds no random state: sampling after the resume differs from a straight run")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Metrics are computed once per optimizer step, so they cover every micro-batch of the
        # accumulation window and every rank.
        if self.automatic_optimization and self.trainer.global_step == self._last_logged_step:
            return
        self._last_logged_step = self.trainer.global_step
        values = self.train_metrics.compute()
        if values:
            self.log_dict(values, on_step=True, on_epoch=False, sync_dist=False, batch_size=1)
            self.check_alarms(values)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        if values:
            # Already means over every rank; sync_dist=True averages these equal values once more
            # (one small collective per validation) and tells Lightning so, which otherwise warns
            # under DDP, once per metric, that epoch-level values should be synced.
            self.log_dict(values, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def check_alarms(self, values: dict[str, Tensor]) -> None:
        """Warn on a loss still at its untrained value (non-finite losses stop the run before the
        step: see :class:`~lit_pref.callbacks.faults.StopOnDivergence`)."""
        loss = values.get("train/loss")
        if loss is None or self.stuck_loss is None or not self.alarm_after_steps:
            return
        loss_value = float(loss)
        if self.trainer.global_step == self.alarm_after_steps and abs(loss_value - self.stuck_loss) < 1e-6:
            warnings.warn(
                f"train/loss is still {loss_value:.6f} (= its untrained value {self.stuck_loss:.6f}) after "
                f"{self.alarm_after_steps} optimizer steps: is the reference the policy itself, or is the "
                "learning rate 0?",
                stacklevel=2,
            )

    # ------------------------------------------------------------------- export
    def on_fit_end(self) -> None:
        if self.output_dir is not None:
            self.save_pretrained(self.output_dir)

    def export_model(self) -> CausalLM | None:
        """The policy as it should be saved (LoRA merged into a copy when ``merge_lora``).

        Under FSDP2 this is a collective (every rank must call it): the shards are gathered into
        an unsharded replica on global rank zero, and the other ranks get ``None``.
        """
        policy: CausalLM = self.policy
        if is_sharded(policy):
            if not isinstance(self.model_source, str):
                raise RuntimeError(
                    "exporting a sharded policy rebuilds it from model_name_or_path; pass a path or hub id, "
                    "not a model object, under FSDP"
                )
            state = full_state_dict(policy)
            if self._trainer is not None and not self.trainer.is_global_zero:
                return None
            policy = self.load_policy()
            missing = policy.load_state_dict(state, strict=False).missing_keys
            if missing:
                raise RuntimeError(f"the gathered policy weights lack {missing[:5]}")
            return policy.merge_and_unload() if is_peft_model(policy) and self.merge_lora else policy
        if is_peft_model(policy) and self.merge_lora:
            if is_quantized(policy):
                return merge_into_full_precision(policy, self.dtype_name, self.attn_implementation)
            return copy.deepcopy(policy).merge_and_unload()
        return policy

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the policy and tokenizer in Hugging Face format; global rank zero writes.

        Every rank must call it: under FSDP2 and DeepSpeed ZeRO-3 the full weights are first
        gathered collectively (a rank returning early would leave the others waiting). The
        files are written to a temporary sibling of ``directory`` that is then renamed into
        place, so ``directory`` is never half-written: a run killed during the export leaves
        the previous export (or none) and a ``.partial`` sibling.
        """
        zero = self._trainer is None or self.trainer.is_global_zero
        with zero3_gathered(self.policy):
            model = self.export_model() if zero or is_sharded(self.policy) else None
            if model is None:
                return
            check_finite(model, self.exported_name)
            with atomic_directory(directory) as partial:
                self.write_export(model, partial)
        rank_zero_info(f"saved the trained {self.exported_name} and tokenizer to {directory}")

    def write_export(self, model: CausalLM, directory: Path) -> None:
        """Write what :meth:`save_pretrained` exports into ``directory`` (a subclass adds its files)."""
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        processor = getattr(self.datamodule(), "processor", None)
        if processor is not None:  # a vision-language model reloads with AutoProcessor
            processor.save_pretrained(directory)


def manual_optimizer_step(module: LightningModule, loss: Tensor, max_grad_norm: float | None) -> None:
    """One optimizer step of a manually optimised module (PPO / GRPO, DDPO): clip the accumulated
    gradients to ``max_grad_norm``, step the optimizer and the step-interval schedulers, zero the
    gradients. Lightning does none of this under manual optimisation; ``ReduceLROnPlateau`` steps
    on ``loss`` (the last micro-batch's)."""
    optimizer = module.optimizers()
    assert not isinstance(optimizer, list), f"{type(module).__name__} takes one optimizer"
    if max_grad_norm is not None:
        # A LightningOptimizer wraps the Optimizer that clip_gradients reads.
        module.clip_gradients(
            optimizer,  # type: ignore[arg-type]
            gradient_clip_val=max_grad_norm,
            gradient_clip_algorithm="norm",
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedulers = module.lr_schedulers()
    for scheduler in schedulers if isinstance(schedulers, list) else [] if schedulers is None else [schedulers]:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(float(loss))
        else:
            scheduler.step()


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse to export weights that hold NaN or inf."""
    bad = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise TrainingDiverged(
            f"not exporting the {what}: {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}); "
            "the last finite checkpoint is the one to export from"
        )


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``directory`` to write into; on success it replaces
    ``directory`` by renames (on one filesystem), on failure it is left as ``<name>.partial``."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    yield partial
    previous = target.with_name(target.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    if target.exists():
        target.rename(previous)
    partial.rename(target)
    if previous.exists():
        shutil.rmtree(previous)
