"""Every mistake a user makes on the command line is one line (``lit-pref: error: …``, exit 2) that
names the argument, the value and what is allowed, and comes before anything slow: configuration
errors, paths that do not exist, hub ids with no network, bad data files, unwritable outputs. The
HH-style data the bad-row policy exists for trains end to end through the CLI."""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub.constants
import pytest
import torch
from cli_helpers import capture_cli

import lit_pref.cli as cli_module
import lit_pref.data.sources as sources
from lit_pref.cli import ConfigError, LitPrefCLI, check_writable, main
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules.base import AlignmentModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DPO = str(CONFIGS / "dpo.yaml")


@pytest.fixture(autouse=True)
def cli_env(tmp_path, monkeypatch):
    """Only ``args`` reach the parser, errors are explained (not raised), caches are private, no hub."""
    monkeypatch.setattr(sys, "argv", ["lit-pref"])
    monkeypatch.delenv("LIT_PREF_DEBUG", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def run_cli(args, capsys):
    """``main(args)``: (exit code, stderr lines, seconds)."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(args)
    elapsed = time.perf_counter() - start
    _, err = capsys.readouterr()
    return info.value.code, err.strip().splitlines(), elapsed


def dpo(tiny_lm_dir, *extra):
    return ["fit", "--config", DPO, "--model.model_name_or_path", str(tiny_lm_dir), "--trainer.max_steps", "1", *extra]


# --------------------------------------------------------- configuration errors
@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--model.bta", "0.1"], "model.bta: no such argument of lit_pref.modules.DPO; did you mean model.beta?"),
        (["--model.beta", "abc"], "model.beta: got 'abc', expected a float"),
        (["--trainer.max_stepz", "3"], "unknown argument --trainer.max_stepz; did you mean --trainer.max_steps?"),
        (["--datta.batch_size", "3"], "unknown argument --datta.batch_size; did you mean --data.batch_size?"),
        (
            ["--data.truncation_mode", "keepend"],
            "data.truncation_mode: got 'keepend', expected one of keep_end, keep_start, drop, error; "
            "did you mean keep_end?",
        ),
        (["--data.bad_rows", "skipp"], "data.bad_rows: got 'skipp', expected one of error, skip; did you mean skip?"),
        (["--data.max_length", "abc"], "data.max_length: got 'abc', expected an int or null"),
        (["--data.batch_size", "2.5"], "data.batch_size: got '2.5', expected an int"),
        (["--model.optimizer.lr", "x"], "model.optimizer.lr: got 'x', expected a float or a torch.Tensor"),
        (
            ["--model.optimizer.lrr", "1"],
            "model.optimizer.lrr: no such argument of torch.optim.AdamW; did you mean model.optimizer.lr?",
        ),
        (["--model", "lit_pref.modules.DPOO"], "model: lit_pref.modules.DPOO does not exist; did you mean lit_pref.modules.DPO?"),
        (["--model.help", "lit_pref.modules.DPOO"], "lit_pref.modules.DPOO does not exist; did you mean lit_pref.modules.DPO?"),
        (["--model.reference", "bogus"],
         "model.reference: got 'bogus', expected one of auto, copy, model, adapter_disabled, adapter, none"),
        # Values the module itself refuses: its own message, out of jsonargparse's Union wrapper.
        (["--model.beta", "-1"], "ValueError: beta must be a finite number > 0, got -1.0"),
        (["--data.batch_size", "0"], "ValueError: batch_size must be positive, got 0"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_a_configuration_error_is_one_line(extra, line, tiny_lm_dir, in_project, capsys):
    code, lines, _ = run_cli(dpo(tiny_lm_dir, *extra), capsys)
    assert (code, lines) == (2, [f"lit-pref: error: {line}"])


def test_an_unknown_loss_type_lists_the_valid_ones(tiny_lm_dir, in_project, capsys):
    code, lines, _ = run_cli(dpo(tiny_lm_dir, "--model.loss_type", "bogus"), capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("lit-pref: error: ValueError: unknown loss_type 'bogus'; valid loss types are (")
    assert "'sigmoid'" in lines[0] and "'ipo'" in lines[0]


@pytest.mark.parametrize(
    ("yaml_text", "line"),
    [
        ("trainer:\n  max_stepz: 3\n", "trainer.max_stepz: no such argument; did you mean trainer.max_steps?"),
        ("model:\n  init_args:\n    bta: 0.2\n", "model.bta: no such argument of lit_pref.modules.DPO; did you mean model.beta?"),
    ],
    ids=["trainer-key", "model-key"],
)
def test_a_mistyped_key_in_a_config_file_is_one_line(yaml_text, line, tiny_lm_dir, in_project, capsys):
    (in_project / "typo.yaml").write_text(yaml_text)
    code, lines, _ = run_cli(dpo(tiny_lm_dir, "--config", "typo.yaml"), capsys)
    assert (code, lines) == (2, [f"lit-pref: error: {line}"])


def test_lit_pref_debug_raises_with_jsonargparse_s_whole_message(tiny_lm_dir, in_project, monkeypatch):
    monkeypatch.setenv("LIT_PREF_DEBUG", "1")
    with pytest.raises(ConfigError, match=r"^model\.beta: got 'abc', expected a float$") as info:
        main(dpo(tiny_lm_dir, "--model.beta", "abc"))
    detail = str(info.value.__cause__)
    assert "Does not validate against any of the Union subtypes" in detail and "Got value: abc" in detail
    with pytest.raises(ValueError, match="Union subtypes"):  # the module's error in its jsonargparse wrapper
        main(dpo(tiny_lm_dir, "--model.beta", "-1"))


# ------------------------------------------------- model paths and the hub
def test_a_missing_local_model_path_fails_at_once_naming_it(tiny_lm_dir, in_project, capsys):
    code, lines, elapsed = run_cli(dpo(tiny_lm_dir, "--model.model_name_or_path", "outputs/does-not-exist"), capsys)
    assert (code, lines) == (
        2,
        [
            "lit-pref: error: FileNotFoundError: model.model_name_or_path 'outputs/does-not-exist' does not exist "
            f"({in_project / 'outputs'} exists, does-not-exist does not)"
        ],
    )
    # Parsing only (measured ~0.4 s on 2 busy cores); it used to be a minute of hub retries.
    assert elapsed < 2.0


def test_a_missing_reference_or_tokenizer_path_is_named_too(tiny_lm_dir, in_project, capsys):
    code, lines, _ = run_cli(dpo(tiny_lm_dir, "--model.ref_model_name_or_path", "./ref"), capsys)
    assert (code, lines) == (2, ["lit-pref: error: FileNotFoundError: model.ref_model_name_or_path './ref' does not exist"])
    code, lines, _ = run_cli(dpo(tiny_lm_dir, "--model.tokenizer_name_or_path", str(in_project / "tok")), capsys)
    assert (code, lines) == (
        2, [f"lit-pref: error: FileNotFoundError: model.tokenizer_name_or_path '{in_project / 'tok'}' does not exist"]
    )


HUB_HINT = (
    "lit-pref: error: ConnectionError: model.model_name_or_path 'someorg/some-model' is not a local path and the "
    "Hugging Face Hub cannot be reached (offline); download it where the Hub is reachable "
    "(`hf download someorg/some-model`) and pass the local directory or file instead (e.g. ./some-model)"
)


def test_a_hub_model_in_offline_mode_fails_at_once_saying_how_to_use_local_files(tiny_lm_dir, in_project, capsys):
    code, lines, elapsed = run_cli(dpo(tiny_lm_dir, "--model.model_name_or_path", "someorg/some-model"), capsys)
    assert (code, lines) == (2, [HUB_HINT])
    assert elapsed < 2.0


def test_a_hub_model_with_no_network_is_detected_and_fails_fast(tiny_lm_dir, in_project, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(sources, "_reachable", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    code, lines, elapsed = run_cli(dpo(tiny_lm_dir, "--model.model_name_or_path", "someorg/some-model"), capsys)
    assert (code, lines) == (2, [HUB_HINT])
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # switched to offline: cached models still load
    assert elapsed < 2.0


# ---------------------------------------------------------------- data files
def _hh(path: Path, empty_chosen=(2,), n=16) -> Path:
    turn = "\n\nHuman: Write a {} line about the sea.\n\nAssistant:"
    with gzip.open(path, "wt") as f:
        for i in range(n):
            prompt = turn.format(("happy", "sad")[i % 2])
            chosen = "" if i in empty_chosen else " good warm day" if i % 2 == 0 else " dark cold night"
            f.write(json.dumps({"chosen": prompt + chosen, "rejected": prompt + " the river"}) + "\n")
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # Files are named relative to the working directory when they are under it.
        ("empty.jsonl", b"", "DataFormatError: data file 'empty.jsonl' is empty (0 bytes)"),
        ("corrupt.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n',
         "DataFormatError: data file 'corrupt.jsonl' line 2: not valid JSON (Expecting value, column 12)"),
        ("missing.jsonl.gz", None, "FileNotFoundError: data file '{path}' does not exist"),
        ("hh.jsonl.gz", "hh", "DataFormatError: row 2 of hh.jsonl.gz: column 'chosen' is empty; data.bad_rows=skip leaves such rows out"),
    ],
    ids=["empty", "corrupt-line", "missing", "hh-empty-answer"],
)
def test_a_bad_data_file_is_one_line(name, content, message, tiny_lm_dir, in_project, capsys):
    path = in_project / name
    if content == "hh":
        _hh(path)
    elif content is not None:
        path.write_bytes(content)
    code, lines, _ = run_cli(dpo(tiny_lm_dir, "--data.dataset", str(path), "--trainer.logger", "false"), capsys)
    assert (code, lines) == (2, [f"lit-pref: error: {message.format(path=path)}"])


def test_hh_style_data_trains_end_to_end_with_skip(tiny_lm_dir, in_project, recwarn):
    path = _hh(in_project / "harmless-base-test.jsonl.gz", empty_chosen=(2, 9), n=24)
    args = [
        "fit", f"--config={DPO}", f"--model.model_name_or_path={tiny_lm_dir}", f"--data.dataset={path}",
        "--data.bad_rows=skip", "--data.val_size=6", "--data.batch_size=4", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
    ]  # fmt: skip
    with capture_cli() as runs:
        cli_module.main(args)
    cli = runs[-1]
    assert cli.trainer.global_step == 2
    counts = cli.datamodule.counts
    assert counts["train"]["bad"] + counts["val"]["bad"] == 2
    assert len(cli.datamodule.splits["train"]) + len(cli.datamodule.splits["val"]) == 22
    skipped = " ".join(str(w.message) for w in recwarn if "skipped" in str(w.message))
    assert f"row 2 of {path.name}" in skipped and f"row 9 of {path.name}" in skipped
    assert (in_project / "outputs" / "dpo" / "model" / "config.json").is_file()


# ------------------------------------------------------ outputs before training
def test_an_output_dir_under_a_file_fails_before_training(tiny_lm_dir, in_project, capsys):
    (in_project / "taken").write_text("a file")
    code, lines, _ = run_cli(dpo(tiny_lm_dir, "--model.output_dir", "taken/model", "--trainer.logger", "false"), capsys)
    assert (code, lines) == (
        2, [f"lit-pref: error: NotADirectoryError: model.output_dir 'taken/model' cannot be created: {in_project / 'taken'} is a file, not a directory"]
    )
    assert not (in_project / "outputs" / "dpo" / "checkpoints").exists()  # no step was taken


def test_a_checkpoint_dir_that_cannot_be_created_fails_before_training(tiny_lm_dir, in_project, capsys):
    (in_project / "outputs" / "dpo").write_text("a file where the run's directory goes")
    args = dpo(tiny_lm_dir, "--model.output_dir", str(in_project / "model"), "--trainer.logger", "false")
    code, lines, _ = run_cli(args, capsys)
    checkpoints = in_project / "outputs" / "dpo" / "checkpoints"
    assert (code, lines) == (
        2,
        [f"lit-pref: error: NotADirectoryError: ModelCheckpoint dirpath '{checkpoints}' cannot be created: "
         f"{in_project / 'outputs' / 'dpo'} is a file, not a directory"],
    )  # fmt: skip
    assert not (in_project / "model").exists()


def test_check_writable(tmp_path, monkeypatch):
    check_writable(str(tmp_path / "new" / "deeper"), "model.output_dir")  # creatable: fine, nothing created
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^model\.output_dir '.*file' is a file, not a directory$"):
        check_writable(str(tmp_path / "file"), "model.output_dir")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # root writes anywhere, so a refusing filesystem is simulated.
    monkeypatch.setattr(cli_module.tempfile, "TemporaryFile", refuse)
    with pytest.raises(PermissionError) as info:
        check_writable(str(tmp_path / "out"), "model.output_dir")
    assert str(info.value) == (
        f"model.output_dir '{tmp_path / 'out'}' cannot be written: {tmp_path} refuses new files (Permission denied)"
    )


# --------------------------------------------------------------- strategies
def _cli(tiny_lm_dir, tmp_path, *extra):
    return LitPrefCLI(
        AlignmentModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        run=False,
        args=["--config", DPO, "--config", str(CONFIGS / "strategies" / "ddp.yaml"),
              "--model.model_name_or_path", str(tiny_lm_dir), "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path), *extra],
    )  # fmt: skip


def test_ddp_yaml_on_cpu_with_one_device_says_it_runs_one_process(tiny_lm_dir, tmp_path):
    cli = _cli(tiny_lm_dir, tmp_path, "--trainer.accelerator", "cpu")
    with pytest.warns(UserWarning) as caught:
        cli.warn_single_process()
    assert [str(w.message) for w in caught] == [
        "strategy DDPStrategy runs one process here (cpu, devices=1, num_nodes=1): nothing runs in parallel; "
        "pass --trainer.devices N for N processes (on CPU: gloo, N processes on this machine)"
    ]


def test_ddp_yaml_with_two_cpu_devices_is_quiet(tiny_lm_dir, tmp_path, recwarn):
    cli = _cli(tiny_lm_dir, tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", "2")
    cli.warn_single_process()
    assert cli.trainer.world_size == 2
    assert not [w for w in recwarn if "runs one process" in str(w.message)]
    torch.distributed.is_initialized() and torch.distributed.destroy_process_group()
