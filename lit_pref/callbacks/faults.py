"""Runs that fail say so: divergence stops training, a preemption signal leaves a checkpoint.

Both callbacks are added to every lit_pref run by :meth:`AlignmentModule.configure_callbacks`
(with the defaults below) unless the trainer's callbacks already hold one, so YAML can set their
arguments under ``trainer.callbacks``.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

# The exit status of a process stopped by a signal, as shells report it (128 + the signal number).
EXIT_STATUS = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or gradient, or a loss far above its running level."""


def last_checkpoint(trainer: Trainer) -> str | None:
    """The newest checkpoint this run wrote, if any."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint):
        return callback.last_model_path or callback.best_model_path or None
    return None


class StopOnDivergence(Callback):
    """Stop before an optimizer step that would apply a non-finite update.

    Checked before every optimizer step, on every rank together (so DDP / FSDP ranks stop at the
    same step): the loss of the step's micro-batches and the gradients must be finite, and, with
    ``loss_spike_factor`` set, the step's |loss| must stay under that many times the median |loss|
    of the previous ``window`` steps. On failure :class:`TrainingDiverged` is raised: the weights
    keep the last finite update, nothing is exported and no later checkpoint replaces the last one.
    Under fp16 mixed precision the gradient check is left to the gradient scaler, which skips
    non-finite steps by design.

    Args:
        loss_spike_factor: stop when |loss| exceeds this multiple of its running median
            (``None``: only non-finite values stop the run).
        window: the steps the running median is taken over (the spike check starts after as many).
    """

    def __init__(self, loss_spike_factor: float | None = None, window: int = 20) -> None:
        if loss_spike_factor is not None and loss_spike_factor <= 1:
            raise ValueError(f"loss_spike_factor must be > 1, got {loss_spike_factor}")
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        self.loss_spike_factor = loss_spike_factor
        self.window = window
        self.recent: deque[float] = deque(maxlen=window)
        self._step_loss: torch.Tensor | float = 0.0

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        # Summed over the micro-batches of one optimizer step (each is already scaled by its share),
        # on the device: read once per step, not once per micro-batch.
        self._step_loss = self._step_loss + loss.detach().float()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        loss, self._step_loss = float(self._step_loss), 0.0
        problem = self.problem(trainer, pl_module, loss)
        if trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            where = last_checkpoint(trainer)
            kept = f"; the last checkpoint, {where}, holds the weights before it" if where else ""
            raise TrainingDiverged(
                f"training diverged at step {trainer.global_step + 1}: "
                f"{problem or 'another rank saw a non-finite loss or gradient'}; the step was not applied{kept}. "
                "Lower the learning rate or clip gradients (--trainer.gradient_clip_val)."
            )
        if math.isfinite(loss):
            self.recent.append(abs(loss))

    def problem(self, trainer: Trainer, pl_module: LightningModule, loss: float) -> str | None:
        """What is wrong with this step on this rank, or ``None``."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2 shards: this rank's part
            if local and not torch.isfinite(torch.nn.utils.get_total_norm(local)):
                return "the gradients are not finite"
        if self.loss_spike_factor is not None and len(self.recent) == self.window:
            level = statistics.median(self.recent)
            if abs(loss) > self.loss_spike_factor * level:
                return f"the loss jumped to {loss:.6g}, over {self.loss_spike_factor:g}× its running median {level:.6g}"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recent.extend(state_dict.get("recent", []))


class CheckpointOnSignal(Callback):
    """SIGTERM (what schedulers send before preempting) or a first Ctrl-C (SIGINT) ends the run
    after the current step with a checkpoint of that step, a line saying how to resume, and a
    non-zero exit status (143 for SIGTERM, 130 for SIGINT). A second Ctrl-C stops at once, with
    nothing saved beyond the checkpoints already written.

    Lightning notices SIGTERM at the end of a training batch (or at the next batch, under DDP, on
    every rank together); with gradient accumulation that can be inside an accumulation window,
    whose partial gradients a checkpoint does not hold.

    Args:
        filename: the checkpoint's file name, in the ``ModelCheckpoint`` directory (else the
            trainer's ``default_root_dir``); ``last.ckpt`` is what ``--ckpt_path last`` resumes.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self.received: str | None = None
        self.saved: Path | None = None
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.received = None
        self.saved = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous_sigint = signal.signal(signal.SIGINT, self._first_sigint)

    def _first_sigint(self, signum: int, frame: Any) -> None:
        # The next Ctrl-C interrupts at once; this one stops at the end of the step, through
        # Lightning's own SIGTERM path (which also tells the other ranks).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.received = "SIGINT"
        print("\nlit-pref: stopping after this step (Ctrl-C again to stop now)", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def checkpoint_path(self, trainer: Trainer) -> Path:
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or trainer.default_root_dir
        return Path(directory) / self.filename

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # Saved here, where ModelCheckpoint saves, so the loops resume from a state they expect;
        # decided on every rank together, as the save is a collective.
        if self.saved is None and trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            self.saved = self.checkpoint_path(trainer)
            trainer.save_checkpoint(self.saved)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        if self.saved is None:  # stopped outside a training batch (in validation)
            self.saved = self.checkpoint_path(trainer)
            trainer.save_checkpoint(self.saved)
        name = self.received or "SIGTERM"
        exception.code = EXIT_STATUS[name]
        say(
            f"lit-pref: stopped by {name} after step {trainer.global_step}; the run is saved in {self.saved}. "
            f"Resume it with the same configuration and --ckpt_path {self.saved} (or --ckpt_path last)."
        )


@rank_zero_only
def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
