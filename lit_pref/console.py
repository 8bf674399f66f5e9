"""The console of a ``lit-pref`` run: one progress bar per phase, and known third-party noise off.

:func:`lit_pref.cli.main` calls :func:`quiet_console` before it parses anything, and builds the
trainer as :class:`Trainer`, whose default progress bar is :class:`StepProgressBar`: optimizer
steps against ``max_steps`` with the loss and reward beside them. Importing lit_pref changes
none of this; library users keep their own warning filters and bars. ``LIT_PREF_DEBUG=1`` leaves
every warning and bar on (and on every rank).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_only
from transformers.utils import logging as transformers_logging

from lit_pref.models import quiet_weight_bars

# Warnings about third-party code calling third-party code, each silenced where it is raised
# (message, category and warning module all match), with the reason it is noise in a lit_pref
# run. Deprecated calls of our own are fixed instead of filtered.
THIRD_PARTY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning's pytree helper (2.6) still builds the LeafSpec that torch 2.13 deprecated.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # The frozen reference, reward and value networks are in eval mode on purpose.
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning, r"lightning\.pytorch\.loops\.fit_loop"),
    # peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a LoRA model.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
)
# Lightning's advertisements for its cloud services, logged at the start of every run.
LIGHTNING_TIPS = re.compile(r"💡 Tip: For seamless cloud (logging|uploads)")

# The training bar's readout: a short label and the logged names it shows, the first one found.
HEADLINE_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("train/loss",)),
    ("reward", ("train/score",)),  # online RL: the mean reward of the step's rollouts
    ("margin", ("train/rewards/margins",)),  # preference losses: the implicit reward margin
    ("acc", ("train/rewards/accuracies", "train/token_accuracy")),
)


class _DropMessages(logging.Filter):
    """Drop log records whose message matches ``pattern``."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# One instance, so calling quiet_console() again adds nothing (Logger.addFilter skips a filter it holds).
_DROP_TIPS = _DropMessages(LIGHTNING_TIPS)


def quiet_console() -> None:
    """Silence the known third-party noise of a run, for this process.

    The warnings in :data:`THIRD_PARTY_WARNINGS` and Lightning's tips are dropped; weights load
    and save without progress bars (:func:`~lit_pref.models.quiet_weight_bars`); ranks other
    than 0 print no warnings at all, since every rank runs the same code and rank 0 already
    shows each warning once.
    """
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # Lightning's rank_zero_info logs through one of these, whichever of lightning.fabric and
    # lightning.pytorch was imported last.
    for logger in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(logger).addFilter(_DROP_TIPS)
    quiet_weight_bars()
    if getattr(rank_zero_only, "rank", 0) != 0:
        warnings.simplefilter("ignore")
        transformers_logging.set_verbosity_error()


def headline_metrics(logged: dict[str, Any]) -> dict[str, float]:
    """The :data:`HEADLINE_METRICS` found in ``logged`` (``trainer.callback_metrics``), as floats."""
    shown = {}
    for label, names in HEADLINE_METRICS:
        name = next((n for n in names if n in logged), None)
        if name is not None:
            shown[label] = float(logged[name])
    return shown


class StepProgressBar(TQDMProgressBar):
    """One training bar for the whole run, counting optimizer steps against ``max_steps``.

    Lightning's bars count the batches of each epoch (``Epoch 0/-2`` when only ``max_steps`` is
    set) and show nothing but the logger's version; this one counts ``trainer.global_step``, so
    gradient accumulation and PPO/GRPO's several optimizer steps per batch read right, starts at
    the resumed step, and shows the loss and reward (:data:`HEADLINE_METRICS`) next to any metric
    a module logs with ``prog_bar=True``. Validation keeps Lightning's bar, one per validation run.
    """

    def init_train_tqdm(self) -> Tqdm:
        """Lightning's training bar, made with its total and first step (a bar made first and
        then reset would print twice at the start)."""
        trainer = self.trainer
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return Tqdm(
            desc="train",
            total=None if total == float("inf") else int(total),
            initial=trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """Nothing: the bar spans every epoch (Lightning's resets it per epoch)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        # Modules log a step's metrics in their own on_train_batch_end, which runs after the
        # callbacks' one: the next batch's start is the first time the finished step can be shown.
        if trainer.global_step - self.train_progress_bar.n >= self.refresh_rate:
            self._show_steps(trainer, pl_module)

    def on_train_batch_end(self, *_: Any) -> None:
        """Nothing: see :meth:`on_train_batch_start`."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._show_steps(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._show_steps(trainer, pl_module)
        super().on_validation_start(trainer, pl_module)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version: the run directory already names it
        return {**headline_metrics(trainer.callback_metrics), **items}

    def _show_steps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = self.train_progress_bar
        if bar.disable:
            return
        if bar.total is not None and trainer.global_step > bar.total:
            # PPO / GRPO finish the batch whose optimizer steps pass max_steps: the run's true total.
            bar.total = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)  # printed by the update
        bar.update(trainer.global_step - bar.n)


class Trainer(pl.Trainer):
    """Lightning's Trainer: customize every aspect of training via flags.

    The same arguments as ``lightning.pytorch.Trainer``; the progress bar is a
    :class:`StepProgressBar` unless ``callbacks`` hold a progress bar of their own or the bar is
    off (``enable_progress_bar=False``, ``barebones=True``).
    """

    def __init__(self, **kwargs: Any) -> None:
        callbacks = kwargs.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        wanted = kwargs.get("enable_progress_bar") is not False and not kwargs.get("barebones")
        if wanted and not any(isinstance(callback, ProgressBar) for callback in callbacks):
            kwargs["callbacks"] = [*callbacks, StepProgressBar()]
        super().__init__(**kwargs)
