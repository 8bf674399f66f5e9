"""A callback the fault tests put in a ``lit-pref fit`` subprocess: a signal at a given step."""

from __future__ import annotations

import os
import signal

from lightning import Callback


class SignalAt(Callback):
    """Send ``signal_name`` to this process as the training batch after ``step`` optimizer steps starts."""

    def __init__(self, step: int, signal_name: str) -> None:
        self.step = step
        self.signum = getattr(signal, signal_name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
