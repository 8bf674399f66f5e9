"""The ``lit-pref`` command line: parsing, documented help, argument links, shipped configs, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import yaml

from lit_pref.cli import LitPrefCLI, main
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules.base import AlignmentModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/**/*.yaml"))


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch):
    """Only ``args`` reach the parser (not pytest's own command line)."""
    monkeypatch.setattr(sys, "argv", ["lit-pref"])


def run_cli(args, capsys):
    """``main(args)``: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def make_cli(args, tmp_path):
    return LitPrefCLI(
        AlignmentModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        run=False,
        args=[*args, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)],
    )


def test_print_config(tiny_lm_dir, capsys):
    code, out, _ = run_cli(
        ["fit", "--model", "lit_pref.modules.DPO", "--model.model_name_or_path", str(tiny_lm_dir), "--print_config"],
        capsys,
    )
    assert code == 0
    config = yaml.safe_load(out)
    assert config["model"]["class_path"] == "lit_pref.modules.DPO"
    assert config["model"]["init_args"]["model_name_or_path"] == str(tiny_lm_dir)
    assert config["model"]["init_args"]["beta"] == 0.1
    assert config["data"]["dataset"] == "lit_pref.tasks:mood_preferences"
    # data.tokenizer_name_or_path is a link target: computed from the model, so jsonargparse leaves
    # it out of the dump; test_the_tokenizer_is_linked_from_model_to_data checks its value.


def test_help_shows_the_docstrings(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside the phrases looked for
    code, out, _ = run_cli(["fit", "--model.help", "lit_pref.modules.DPO"], capsys)
    assert code == 0
    assert "--model.beta BETA" in out and "KL-constraint strength β." in out
    assert "label-noise rate ε of cDPO / robust DPO" in out
    code, out, _ = run_cli(["fit", "--help"], capsys)
    assert code == 0
    assert "limit on prompt + completion tokens." in out
    assert "--data.truncation_mode {keep_end,keep_start,drop,error}" in out


def test_the_tokenizer_is_linked_from_model_to_data(tiny_lm_dir, tmp_path):
    cli = make_cli(["--model", "lit_pref.modules.SFT", "--model.model_name_or_path", str(tiny_lm_dir)], tmp_path)
    assert cli.config.data.tokenizer_name_or_path == str(tiny_lm_dir)
    assert cli.datamodule.tokenizer_source == str(tiny_lm_dir)
    assert cli.datamodule.tokenizer.get_vocab() == cli.model.tokenizer.get_vocab()
    # A model with its own tokenizer path passes that one on, not the weights' path.
    tokenizer_dir = tmp_path / "tokenizer"
    cli.model.tokenizer.save_pretrained(tokenizer_dir)
    cli = make_cli(
        [
            "--model", "lit_pref.modules.SFT",
            "--model.model_name_or_path", str(tiny_lm_dir),
            "--model.tokenizer_name_or_path", str(tokenizer_dir),
        ],
        tmp_path,
    )  # fmt: skip
    assert cli.datamodule.tokenizer_source == str(tokenizer_dir)


def test_the_config_glob_runs():
    assert (ROOT / "configs").is_dir()
    assert all(path.suffix == ".yaml" for path in CONFIGS)
    if (ROOT / "configs" / "dpo.yaml").exists():
        assert ROOT / "configs" / "dpo.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_shipped_config_parses(path, tiny_lm_dir, capsys):
    args = ["fit", "--config", str(path)]
    if "model" not in (yaml.safe_load(path.read_text()) or {}):
        # A partial config (a strategy) is used on top of an algorithm's.
        args += ["--model", "lit_pref.modules.SFT", "--model.model_name_or_path", str(tiny_lm_dir)]
    code, out, err = run_cli([*args, "--print_config"], capsys)
    assert code == 0, err
    config = yaml.safe_load(out)
    assert config["model"]["class_path"].startswith("lit_pref.modules.")
    assert config["model"]["init_args"]["model_name_or_path"]


@pytest.fixture
def quiet_progress():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.mark.parametrize(
    ("make_dataset", "message"),
    [
        (lambda d: (d / "bad.json").write_text(json.dumps([{"question": "q", "answer": "a"}])) and d / "bad.json",
         "DataFormatError: unrecognised dataset columns ['answer', 'question']; accepted shapes are paired:"),
        (lambda d: d / "missing.jsonl", "FileNotFoundError: data file "),
        (lambda d: "lit_pref.tasks:no_such_dataset", "DataFormatError: cannot import 'lit_pref.tasks:no_such_dataset'"),
        (lambda d: "lit-pref-tests/no-such-dataset", "ConnectionError: Couldn't reach 'lit-pref-tests/no-such-dataset'"),
    ],
    ids=["wrong-columns", "missing-file", "bad-import", "hub-offline"],
)
def test_a_bad_dataset_is_one_readable_line(make_dataset, message, tiny_lm_dir, tmp_path, capsys, quiet_progress,
                                             monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("LIT_PREF_DEBUG", raising=False)
    code, _, err = run_cli(
        [
            "fit",
            "--model", "lit_pref.modules.SFT",
            "--model.model_name_or_path", str(tiny_lm_dir),
            "--data.dataset", str(make_dataset(tmp_path)),
            "--trainer.max_steps", "1",
            "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ],
        capsys,
    )  # fmt: skip
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lit-pref: error: " + message)
