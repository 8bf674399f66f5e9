"""Logging a small table: appended to a CSV in the run directory and sent to every logger."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning import Trainer


def markdown(columns: Sequence[str], data: list[list[Any]]) -> str:
    """A table as Markdown (what TensorBoard's text panel renders)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


def write_table(
    trainer: Trainer, path: Path, key: str, columns: Sequence[str], rows: list[dict[str, Any]]
) -> None:
    """Append ``rows`` to the CSV at ``path`` (header on creation) and log them under ``key``.

    Each logger gets the table in the richest form it takes: ``log_table`` (e.g. W&B), else
    ``log_text``, else TensorBoard's ``add_text`` as Markdown. Missing cells are left empty.
    """
    columns = list(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    data = [[row.get(c, "") for c in columns] for row in rows]
    for logger in trainer.loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(key=key, columns=columns, data=data, step=trainer.global_step)
        elif hasattr(logger, "log_text"):
            logger.log_text(key=key, columns=columns, data=data, step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_text"):
            experiment: Any = getattr(logger, "experiment")  # noqa: B009 (Logger does not declare it)
            experiment.add_text(key, markdown(columns, data), global_step=trainer.global_step)
