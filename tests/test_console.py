"""The console of a ``lit-pref`` run: one progress bar per phase, no warnings we could prevent."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
from cli_helpers import CONFIGS
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from lit_pref import console
from lit_pref.console import StepProgressBar, Trainer, headline_metrics, quiet_console

# A warning as Python prints it (`path.py:12: Category: message`) or as Lightning does (no category).
WARNING_LINE = re.compile(r"^\S+\.py:\d+: .*$", re.MULTILINE)
# What third-party noise looks like; none of it may reach the console.
NOISE = (
    "Warning",  # FutureWarning, UserWarning, PossibleUserWarning…
    "deprecated",
    "v_num",
    "Epoch",  # Lightning's per-epoch bar ("Epoch 0/-2" when only max_steps is set)
    "/-2",
    "module(s) in eval mode",  # the warning (the model summary rightly counts them: "Modules in eval mode")
    "Tip:",
    "Loading weights",
    "Writing model shards",
)


def run_lit_pref(*args: str) -> subprocess.CompletedProcess:
    """``lit-pref fit`` as a user runs it: its own process, a fresh console, no debug switch."""
    env = {k: v for k, v in os.environ.items() if k not in ("LIT_PREF_DEBUG", "PYTHONWARNINGS")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lit_pref.cli", "fit", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize(
    ("config", "readout", "expected_warnings"),
    [
        ("dpo.yaml", ("loss=", "margin=", "acc="), ()),
        # Documented in configs/grpo.yaml: the random tiny model mostly scores 0, so some of its
        # prompt groups carry no signal, and lit_pref says so.
        ("grpo.yaml", ("loss=", "reward="), ("prompt groups have zero reward variance",)),
    ],
)
def test_a_shipped_config_prints_one_bar_and_no_avoidable_warning(config, readout, expected_warnings, in_project):
    done = run_lit_pref(f"--config={CONFIGS / config}", "--trainer.max_steps=2")
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    warned = WARNING_LINE.findall(output)
    unexpected = [line for line in warned if not any(text in line for text in expected_warnings)]
    assert not unexpected, unexpected
    assert all("/lit_pref/" in line for line in warned), warned  # the expected ones are ours
    quiet = output
    for line in warned:  # the expected warnings, with the source line Python prints under each
        quiet = re.sub(re.escape(line) + r"\n(  .*\n)?", "", quiet)
    assert [noise for noise in NOISE if noise in quiet] == []
    # The training bar: optimizer steps against max_steps, and the loss / reward beside them.
    bar = [segment for segment in re.split(r"[\r\n]", done.stdout) if segment.startswith("train: 100%")]
    assert bar, done.stdout
    assert "2/2" in bar[-1] and all(item in bar[-1] for item in readout), bar[-1]


def test_the_trainer_adds_the_step_bar_unless_told_otherwise(tmp_path):
    def bars(**kwargs):
        trainer = Trainer(logger=False, enable_checkpointing=False, default_root_dir=tmp_path, **kwargs)
        return [type(c) for c in trainer.callbacks if isinstance(c, TQDMProgressBar)]

    assert bars() == [StepProgressBar]
    assert bars(enable_progress_bar=False) == []
    assert bars(barebones=True) == []
    assert bars(callbacks=[TQDMProgressBar()]) == [TQDMProgressBar]  # the user's own bar is kept


def test_headline_metrics_are_the_loss_and_reward_under_short_labels():
    logged = {"train/loss": 0.5, "train/rewards/margins": 0.25, "train/token_accuracy": 0.75, "train/kl": 1.0}
    assert headline_metrics(logged) == {"loss": 0.5, "margin": 0.25, "acc": 0.75}
    assert headline_metrics({"train/score": 2.0}) == {"reward": 2.0}


@pytest.fixture
def quieted():
    """``quiet_console()`` for this test only: warning filters, log filters and bars put back."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_bars_off, transformers_bars = are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        quiet_console()
        yield
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).removeFilter(console._DROP_TIPS)
    if transformers_bars:
        transformers_logging.enable_progress_bar()
    if hub_bars_off:
        disable_progress_bars()


def test_the_filters_silence_only_the_known_warnings_where_they_are_raised(quieted):
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_console()  # its filters go before "always"
        warnings.warn_explicit(message, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(message, FutureWarning, "ours.py", 1, module="lit_pref.ours")
        warnings.warn_explicit("something else", FutureWarning, "_pytree.py", 22, module="lightning.pytorch.utilities._pytree")
    assert [(str(w.message), w.filename) for w in caught] == [(message, "ours.py"), ("something else", "_pytree.py")]


def test_lightning_tips_are_dropped_and_other_info_kept(quieted, caplog):
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_help_and_print_config_never_load_datasets(in_project):
    """``--help``, ``--print_config`` and ``--model.help`` only build the parser, so `datasets` (with
    pandas and pyarrow, half a second of the 5 s these take) stays unloaded. Checked on what is
    imported rather than on time, which a shared machine makes noisy. (transformers itself is
    imported by Lightning, through torchmetrics.)"""
    code = (
        "import sys\n"
        "from lit_pref.cli import main\n"
        "for args in (['fit', '--help'], ['fit', '--model.help', 'lit_pref.modules.DPO'],\n"
        f"             ['fit', '--print_config', '--config', {str(CONFIGS / 'dpo.yaml')!r}]):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, args\n"
        "loaded = [m for m in ('datasets', 'pandas', 'pyarrow') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
