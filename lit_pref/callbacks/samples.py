"""Show what an online-RL policy writes: a table of sampled prompts, completions and rewards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from lit_pref.callbacks.tables import write_table

BASE_COLUMNS = ("step", "prompt", "completion", "score")


class SampleTable(Callback):
    """Every ``every_n_steps`` optimizer steps, tabulate samples of the latest rollout.

    Works with the online-RL modules (:class:`~lit_pref.modules.PPO`,
    :class:`~lit_pref.modules.GRPO`), which keep the rows of their latest rollout in
    ``latest_samples`` (prompt, completion, total score and, with several reward sources, each
    source's reward). Costs no extra generation: the rows are those the policy was just trained
    on. The first rollout is always shown (the starting policy), then one table each time the
    global step crosses a multiple of ``every_n_steps``.

    The table goes to every logger that takes tables (``log_table``, e.g. W&B), else text
    (``log_text``, or TensorBoard's ``add_text`` as Markdown), and is always appended to a CSV file
    in the run directory (``trainer.log_dir``, else ``default_root_dir``) with its global step.
    Rank zero's samples are shown.

    Args:
        every_n_steps: optimizer steps between tables.
        num_samples: completions per table (the first ones of the rollout; with GRPO, whole
            groups of the same prompt come first).
        max_chars: texts are cut to this many characters (…-terminated).
        filename: the CSV file's name inside the run directory.
        key: the name the table is logged under.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        num_samples: int = 8,
        max_chars: int = 300,
        filename: str = "samples.csv",
        key: str = "train/samples",
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.every_n_steps, self.num_samples, self.max_chars = every_n_steps, num_samples, max_chars
        self.filename, self.key = filename, key
        self.csv_path: Path | None = None
        self.tables_written = 0
        self._last_step: int | None = None
        self._columns: list[str] | None = None

    def _clip(self, value: Any) -> Any:
        if not isinstance(value, str):
            return round(value, 4) if isinstance(value, float) else value
        text = " ".join(value.splitlines())
        return text if len(text) <= self.max_chars else text[: self.max_chars - 1] + "…"

    def _due(self, step: int) -> bool:
        return self._last_step is None or step // self.every_n_steps > self._last_step // self.every_n_steps

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        samples = getattr(pl_module, "latest_samples", None)
        step = trainer.global_step
        if not samples or not self._due(step):
            return
        self._last_step = step
        # log_dir broadcasts from rank 0, so every rank asks for it.
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        rows = [
            {"step": step} | {k: self._clip(v) for k, v in row.items()} for row in samples[: self.num_samples]
        ]
        self._write(trainer, directory, rows)

    @rank_zero_only
    def _write(self, trainer: Trainer, directory: Path, rows: list[dict[str, Any]]) -> None:
        if self._columns is None:
            extra = sorted({k for row in rows for k in row} - set(BASE_COLUMNS))
            self._columns = [*BASE_COLUMNS, *extra]
        self.csv_path = directory / self.filename
        write_table(trainer, self.csv_path, self.key, self._columns, rows)
        self.tables_written += 1

