"""Running the real ``lit-pref`` CLI inside a test and reading what the run logged."""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import lit_pref.cli as cli_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@contextlib.contextmanager
def capture_cli() -> Iterator[list]:
    """Patch the CLI class so the test can reach the trainer and module a run built."""
    runs: list = []

    class Capturing(cli_module.LitPrefCLI):
        def __init__(self, *args, **kwargs):
            runs.append(self)
            super().__init__(*args, **kwargs)

    with (
        mock.patch.object(cli_module, "LitPrefCLI", Capturing),
        mock.patch.dict(os.environ, {"LIT_PREF_DEBUG": "1"}),
        mock.patch.object(sys, "argv", ["lit-pref"]),
    ):
        yield runs


def read_metrics(cli) -> list[dict[str, float]]:
    """The rows of a CLI run's CSVLogger ``metrics.csv``, with empty cells dropped."""
    with (Path(cli.trainer.logger.log_dir) / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def run_config(subcommand: str, config: str, *extra: str):
    """``lit-pref <subcommand> --config configs/<config> <extra>`` in the current directory; returns
    the LightningCLI object and the rows of its CSV log."""
    args = [
        subcommand,
        f"--config={CONFIGS / config}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]
    with capture_cli() as runs:
        cli_module.main(args)
    cli = runs[-1]
    return cli, read_metrics(cli)
