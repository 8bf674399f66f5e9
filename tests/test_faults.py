"""Faults lose nothing and say so: divergence stops the run, signals leave a resumable checkpoint
and a non-zero exit, ``--ckpt_path last`` resumes this run's checkpoint or fails in one line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from cli_helpers import CONFIGS
from lightning.pytorch.callbacks import ModelCheckpoint

import lit_pref.cli as cli_module
from lit_pref.callbacks.faults import StopOnDivergence, TrainingDiverged
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules import DPO
from lit_pref.resume import CHECKPOINT_KEY, find_last_checkpoint

TESTS = Path(__file__).parent


# ------------------------------------------------------------------ divergence
def test_a_learning_rate_that_blows_up_stops_before_a_non_finite_step(tiny_lm_dir, tmp_path):
    """SGD at lr 1e6 makes the loss NaN within a few steps: the run raises, every checkpoint holds
    finite weights (the bad step was never applied), and nothing is exported."""
    module = DPO(
        model_name_or_path=str(tiny_lm_dir), optimizer=partial(torch.optim.SGD, lr=1e6), output_dir=str(tmp_path / "export")
    )
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(
        max_steps=20, accelerator="cpu", logger=False, callbacks=[checkpoints], enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    data = PreferenceDataModule("lit_pref.tasks:mood_preferences", batch_size=2, max_train_samples=16, val_split=None)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: the (loss is nan|gradients are not finite)"):
        trainer.fit(module, data)
    assert 0 < trainer.global_step < 20
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == trainer.global_step
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())
    assert not (tmp_path / "export").exists()


def test_divergence_through_the_cli_is_one_line_and_exit_3(in_project, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main([
            "fit", f"--config={CONFIGS / 'dpo.yaml'}", "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=1e6",
            "--trainer.gradient_clip_val=null", "--trainer.max_steps=20", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", "--data.batch_size=2", "--data.max_train_samples=16",
        ])  # fmt: skip
    assert exit_info.value.code == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lit-pref: error:")]
    assert len(errors) == 1 and "training diverged at step" in errors[0]
    assert not (in_project / "outputs" / "dpo" / "model").exists()


def stub_step(parameters=()):
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace())
    return trainer, SimpleNamespace(parameters=lambda: iter(parameters))


def test_a_loss_spike_over_its_running_median_is_a_divergence():
    guard = StopOnDivergence(loss_spike_factor=100, window=4)
    trainer, module = stub_step()
    for loss in (0.7, 0.69, 0.68, 0.7):
        assert guard.problem(trainer, module, loss) is None
        guard.recent.append(loss)
    assert guard.problem(trainer, module, 60.0) is None  # under 100 × the median 0.695
    assert "jumped to 1.4e+06" in guard.problem(trainer, module, 1.4e6)
    assert StopOnDivergence().problem(trainer, module, 1.4e6) is None  # off by default: only non-finite stops


def test_non_finite_gradients_are_a_divergence():
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.tensor([0.0, float("inf"), 1.0])
    trainer, module = stub_step([weight])
    assert StopOnDivergence().problem(trainer, module, 0.5) == "the gradients are not finite"
    weight.grad = torch.ones(3)
    assert StopOnDivergence().problem(trainer, module, 0.5) is None


def test_export_refuses_non_finite_weights(tiny_lm_dir, tmp_path):
    module = DPO(model_name_or_path=str(tiny_lm_dir))
    module.configure_model()
    with torch.no_grad():
        next(module.policy.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="not exporting the policy: 1 tensor"):
        module.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ------------------------------------------------------- signals, in a real process
def cli_run(root: Path, model: Path, *extra: str, steps: int = 5) -> subprocess.CompletedProcess:
    """``lit-pref fit`` with configs/dpo.yaml in a subprocess: 6 rows in batches of 2 (3 per epoch),
    a checkpoint after every step, the CSV log in ``root``."""
    args = [
        sys.executable, "-m", "lit_pref.cli", "fit", f"--config={CONFIGS / 'dpo.yaml'}",
        f"--model.model_name_or_path={model}", f"--model.output_dir={root / 'export'}",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={root / 'log'}", f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=1", "--data.batch_size=2", "--data.max_train_samples=6", *extra,
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(TESTS), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LIT_PREF_DEBUG", None)
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def logged_losses(root: Path) -> dict[int, float]:
    """``train/loss`` per step of the run's one CSV log (a resumed run continues the killed run's)."""
    (path,) = (root / "log").rglob("metrics.csv")
    with path.open() as f:
        rows = [(int(row["step"]), float(row["train/loss"])) for row in csv.DictReader(f) if row.get("train/loss")]
    steps = [step for step, _ in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return dict(rows)


@pytest.fixture(scope="module")
def straight_run(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    done = cli_run(root, tiny_lm_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return logged_losses(root), torch.load(root / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize(
    ("signal_name", "status", "saved_step"),
    [("SIGTERM", 143, 3), ("SIGINT", 130, 3), ("SIGKILL", -9, 2)],
)
def test_a_signal_then_ckpt_path_last_is_the_straight_run(signal_name, status, saved_step, straight_run, tiny_lm_dir, tmp_path):
    """The signal arrives as step 3 starts. SIGTERM and a first Ctrl-C finish that step, save it,
    say how to resume and exit non-zero; SIGKILL leaves the checkpoint of step 2. Resumed with
    ``--ckpt_path last``, the run logs the straight run's losses into the same log, each step once,
    and ends with the straight run's weights."""
    signal_at = [
        "--trainer.callbacks+=fault_helpers.SignalAt",
        "--trainer.callbacks.step=2",
        f"--trainer.callbacks.signal_name={signal_name}",
    ]
    stopped = cli_run(tmp_path, tiny_lm_dir, *signal_at)
    assert stopped.returncode == status, stopped.stderr[-3000:]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == saved_step
    if signal_name != "SIGKILL":
        assert f"stopped by {signal_name} after step {saved_step}" in stopped.stderr
        assert f"--ckpt_path {tmp_path / 'ckpt' / 'last.ckpt'}" in stopped.stderr
        assert not (tmp_path / "export").exists()  # a stopped run exports nothing
    resumed = cli_run(tmp_path, tiny_lm_dir, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight_losses, straight_weights = straight_run
    losses = logged_losses(tmp_path)
    assert sorted(losses) == sorted(straight_losses) == [0, 1, 2, 3, 4]
    for step, loss in straight_losses.items():
        assert losses[step] == pytest.approx(loss, abs=1e-6), step
    weights = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- --ckpt_path last
def test_ckpt_path_last_with_nothing_to_resume_is_an_error(in_project, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["fit", f"--config={CONFIGS / 'dpo.yaml'}", "--ckpt_path=last", "--trainer.max_steps=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    where = in_project / "outputs" / "dpo" / "checkpoints"
    assert err == (
        f"lit-pref: error: --ckpt_path last: there is no checkpoint to resume (looked in {where}); "
        "leave --ckpt_path out to start a fresh run"
    )


def test_ckpt_path_last_never_resumes_another_runs_checkpoint(in_project, capsys):
    """A run with another learning rate wrote the directory's only checkpoint: refused, named."""
    common = [f"--config={CONFIGS / 'dpo.yaml'}", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
              "--trainer.enable_progress_bar=false", "--data.max_train_samples=8"]  # fmt: skip
    cli_module.main(["fit", *common, "--model.optimizer.lr=1e-3"])
    assert (in_project / "outputs" / "dpo" / "checkpoints" / "last.ckpt").is_file()
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["fit", *common, "--model.optimizer.lr=2e-3", "--ckpt_path=last"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(last.ckpt) were saved by other runs" in err


def test_find_last_checkpoint_takes_the_newest_of_this_run(tmp_path):
    for name, identity, mtime in (("last.ckpt", "mine", 100), ("last-v1.ckpt", "other", 300), ("last-v2.ckpt", "mine", 200)):
        torch.save({CHECKPOINT_KEY: {"run_identity": identity}}, tmp_path / name)
        os.utime(tmp_path / name, (mtime, mtime))
    assert find_last_checkpoint([tmp_path], "mine") == tmp_path / "last-v2.ckpt"
    assert find_last_checkpoint([tmp_path], "other") == tmp_path / "last-v1.ckpt"
    with pytest.raises(FileNotFoundError, match="saved by other runs"):
        find_last_checkpoint([tmp_path], "a third run")


def test_fit_runs_outside_the_main_thread(tiny_lm_dir, tmp_path):
    """Signal handlers can only be set in the main thread: elsewhere the run trains without them."""
    import threading

    result: dict[str, object] = {}

    def fit() -> None:
        try:
            module = DPO(model_name_or_path=str(tiny_lm_dir), optimizer=partial(torch.optim.AdamW, lr=1e-3))
            trainer = L.Trainer(
                max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
            )  # fmt: skip
            data = PreferenceDataModule("lit_pref.tasks:mood_preferences", batch_size=2, max_train_samples=4, val_split=None)
            trainer.fit(module, data)
            result["steps"] = trainer.global_step
        except Exception as error:  # reported to the test thread
            result["error"] = error

    thread = threading.Thread(target=fit)
    thread.start()
    thread.join()
    assert result == {"steps": 2}
