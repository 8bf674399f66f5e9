"""Show what a reward model thinks: a small table of validation pairs and their rewards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from lit_pref.callbacks.tables import write_table

COLUMNS = ("step", "epoch", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "correct")


class RewardPredictionTable(Callback):
    """At each validation, tabulate the first validation pairs with their chosen/rejected rewards.

    The table goes to every logger that takes tables (``log_table``, e.g. W&B), else text
    (``log_text``, or TensorBoard's ``add_text`` as Markdown), and is always appended to a CSV
    file in the run directory (``trainer.log_dir``, else ``default_root_dir``), one block of
    rows per validation with its global step. Works with :class:`~lit_pref.modules.reward.RewardModel`
    (or any module whose ``validation_step`` returns ``chosen_rewards``/``rejected_rewards``, or
    that has ``pair_rewards(batch)``). The sanity-check validation is skipped.

    Args:
        num_rows: pairs shown per validation.
        max_chars: texts are cut to this many characters (…-terminated).
        filename: the CSV file's name inside the run directory.
        key: the name the table is logged under.
    """

    def __init__(
        self,
        num_rows: int = 8,
        max_chars: int = 300,
        filename: str = "reward_predictions.csv",
        key: str = "val/reward_predictions",
    ) -> None:
        if num_rows < 1:
            raise ValueError(f"num_rows must be positive, got {num_rows}")
        self.num_rows, self.max_chars, self.filename, self.key = num_rows, max_chars, filename, key
        self.rows: list[dict[str, Any]] = []
        self.csv_path: Path | None = None

    # ------------------------------------------------------------- collecting
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []

    def _clip(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[: self.max_chars - 1] + "…"

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or len(self.rows) >= self.num_rows:
            return
        module: Any = pl_module  # a RewardModel (pair_rewards, tokenizer)
        if isinstance(outputs, dict) and "chosen_rewards" in outputs:
            chosen, rejected = outputs["chosen_rewards"], outputs["rejected_rewards"]
        else:
            with torch.no_grad():
                chosen, rejected = module.pair_rewards(batch)
        decode = module.tokenizer.decode
        prompts, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"].bool()
        completions, completion_mask = (
            batch["completion_input_ids"],
            batch["completion_attention_mask"].bool(),
        )
        take = min(self.num_rows - len(self.rows), prompts.shape[0])
        chosen, rejected = chosen[:take].float().cpu().tolist(), rejected[:take].float().cpu().tolist()

        def text(ids: torch.Tensor, mask: torch.Tensor) -> str:
            return self._clip(decode(ids[mask].tolist(), skip_special_tokens=True))

        for i in range(take):
            self.rows.append(
                {
                    "prompt": text(prompts[i], prompt_mask[i]),
                    "chosen": text(completions[2 * i], completion_mask[2 * i]),
                    "rejected": text(completions[2 * i + 1], completion_mask[2 * i + 1]),
                    "chosen_reward": round(chosen[i], 4),
                    "rejected_reward": round(rejected[i], 4),
                    "correct": chosen[i] > rejected[i],
                }
            )

    # ---------------------------------------------------------------- writing
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.rows:
            return
        # log_dir broadcasts from rank 0, so every rank asks for it.
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        for row in self.rows:
            row["step"], row["epoch"] = trainer.global_step, trainer.current_epoch
        self._write(trainer, directory)

    @rank_zero_only
    def _write(self, trainer: Trainer, directory: Path) -> None:
        self.csv_path = directory / self.filename
        write_table(trainer, self.csv_path, self.key, COLUMNS, self.rows)
