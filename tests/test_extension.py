"""Extending lit_pref from user code, as the README documents it (``tests/extension_example.py``).

* the public API (``lit_pref.__all__``) resolves, and ``import lit_pref`` stays cheap;
* a DPO subclass adds a loss term by overriding ``shared_step`` and runs through the CLI;
* a reward function named by import path drives GRPO through the CLI, with a dataset column;
* a user callback is added on the command line with ``--trainer.callbacks+=``.

Every run is one or two optimizer steps of the tiny model on a handful of rows.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lit_pref
from lit_pref.cli import main
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules import DPO
from lit_pref.rewards import RewardSet
from lit_pref.tasks import mood_reward

HERE = Path(__file__).resolve().parent


@pytest.fixture
def user_code(monkeypatch):
    """Make ``extension_example`` importable, as a user's own module on ``PYTHONPATH`` would be."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setattr(sys, "argv", ["lit-pref"])
    monkeypatch.setenv("LIT_PREF_DEBUG", "1")  # a failure shows its traceback
    import extension_example

    return extension_example


def read_metrics(root: Path) -> list[dict[str, str]]:
    (path,) = root.rglob("metrics.csv")
    with path.open() as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(row[name]) for row in rows if row.get(name)]


def quiet_run(root: Path, steps: int) -> list[str]:
    return [
        "--seed_everything=0",
        f"--trainer.max_steps={steps}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}",
        f"--trainer.default_root_dir={root}",
    ]


# --------------------------------------------------------------------------- public API
def test_public_api_resolves_and_matches_the_export_table():
    assert set(lit_pref.__all__) == {*lit_pref._EXPORTS, "__version__"}
    for name in lit_pref.__all__:
        assert getattr(lit_pref, name) is not None, name
    assert lit_pref.DPO is DPO
    assert issubclass(lit_pref.DPO, lit_pref.ReferenceModule)
    assert issubclass(lit_pref.ReferenceModule, lit_pref.AlignmentModule)
    assert set(dir(lit_pref)) >= set(lit_pref.__all__)
    with pytest.raises(AttributeError, match="no attribute 'NotThere'"):
        _ = lit_pref.NotThere


def test_import_lit_pref_is_light():
    """``import lit_pref`` (and the cheap submodules) load none of torch, Lightning, Transformers."""
    code = (
        "import sys, lit_pref\n"
        "heavy = [m for m in ('lightning', 'transformers', 'datasets', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- a DPO subclass
def test_subclass_adds_its_loss_term_to_dpo(user_code, tiny_lm_dir):
    """``loss = dpo + λ·max(0, ref_chosen − policy_chosen)`` on a real batch, term by term."""
    torch.manual_seed(0)
    plain = DPO(model_name_or_path=str(tiny_lm_dir))
    floored = user_code.DPOWithChosenFloor(model_name_or_path=str(tiny_lm_dir), floor_weight=3.0)
    for module in (plain, floored):
        module.configure_model()
    # Move the policies away from their references, identically, so the hinge is active on some rows.
    with torch.no_grad():
        noise = {n: 0.01 * torch.randn_like(p) for n, p in plain.policy.named_parameters()}
        for module in (plain, floored):
            for name, param in module.policy.named_parameters():
                param.add_(noise[name])
    data = PreferenceDataModule(
        "lit_pref.tasks:mood_preferences", tokenizer_name_or_path=str(tiny_lm_dir), target="paired",
        batch_size=8, max_train_samples=8, val_split=None,
    )  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    plain_loss, plain_metrics = plain.shared_step(batch, "train")
    loss, metrics = floored.shared_step(batch, "train")
    policy = plain.logps(plain.policy, batch).pairs()[0].sum
    reference = plain.reference_values(batch)[:, 0]
    hinge = (reference - policy).clamp(min=0)
    assert 0 < int((hinge > 0).sum()) < 8  # the hinge is active on some rows, not all
    torch.testing.assert_close(metrics["dpo_loss"], plain_metrics["loss"])
    torch.testing.assert_close(metrics["chosen_floor"], hinge.detach())
    torch.testing.assert_close(loss, plain_loss + 3.0 * hinge.mean())
    # The term has a gradient: it pushes the chosen log-prob up where it fell below the reference.
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in floored.policy.parameters())


def test_subclass_validates_its_arguments(user_code, tiny_lm_dir):
    with pytest.raises(ValueError, match="floor_weight must be >= 0"):
        user_code.DPOWithChosenFloor(model_name_or_path=str(tiny_lm_dir), floor_weight=-1.0)
    with pytest.raises(ValueError, match="reference_free is not available"):
        user_code.DPOWithChosenFloor(model_name_or_path=str(tiny_lm_dir), reference_free=True)


def test_subclass_and_callback_through_the_cli(user_code, tiny_lm_dir, tmp_path):
    """``--model`` names the user's subclass; ``--trainer.callbacks+=`` appends the user's callback."""
    main([
        "fit",
        "--model=extension_example.DPOWithChosenFloor",
        f"--model.model_name_or_path={tiny_lm_dir}",
        "--model.floor_weight=0.5",
        "--model.beta=0.2",
        "--data.max_train_samples=8",
        "--data.batch_size=4",
        "--trainer.callbacks+=extension_example.MoodProbe",
        "--trainer.callbacks.every_n_steps=1",
        *quiet_run(tmp_path, steps=2),
    ])  # fmt: skip
    rows = read_metrics(tmp_path)
    assert len(column(rows, "train/chosen_floor")) == 2
    assert all(v >= 0 for v in column(rows, "train/chosen_floor"))
    assert all(math.isfinite(v) for v in column(rows, "train/loss"))
    assert len(column(rows, "probe/score")) == 2
    (probe_file,) = tmp_path.rglob("probe.jsonl")
    probes = [json.loads(line) for line in probe_file.read_text().splitlines()]
    assert [p["step"] for p in probes] == [1, 1, 2, 2]  # two prompts per probe
    assert all(-1 <= p["score"] <= 1 for p in probes)


def test_subclass_arguments_are_documented_in_the_cli_help(user_code, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "extension_example.DPOWithChosenFloor"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.floor_weight FLOOR_WEIGHT" in out and "the weight of the hinge" in out
    assert "--model.beta BETA" in out  # DPO's own arguments come through **kwargs


# --------------------------------------------------------------------------- a reward function
def test_reward_function_by_import_path_reads_dataset_columns(user_code):
    rewards = RewardSet("extension_example:mood_word_reward")
    prompts = ["Write a happy line about sea:", "Write a sad line about rain:"]
    completions = ["good warm day", "good warm day"]
    total, _ = rewards.score(prompts, completions, {"mood": ["happy", "sad"]})
    assert total.tolist() == pytest.approx([2 / 6, -2 / 6])
    assert total.tolist() == pytest.approx(mood_reward(prompts, completions))


def test_grpo_with_a_user_reward_function_through_the_cli(user_code, tiny_lm_dir, tmp_path):
    """Two sources (the user's function and the shipped one) so each one's reward is logged by name."""
    main([
        "fit",
        "--model=lit_pref.modules.GRPO",
        f"--model.model_name_or_path={tiny_lm_dir}",
        "--model.rewards=[extension_example:mood_word_reward, lit_pref.tasks:mood_reward]",
        "--model.reward_weights=[1.0, 0.5]",
        "--model.num_generations=2",
        "--model.max_new_tokens=4",
        "--model.rollout_batch_size=8",
        "--data.dataset=lit_pref.tasks:mood_prompts",
        "--data.max_train_samples=4",
        "--data.batch_size=2",
        *quiet_run(tmp_path, steps=1),
    ])  # fmt: skip
    rows = read_metrics(tmp_path)
    (user,) = column(rows, "train/rewards/mood_word_reward")
    (shipped,) = column(rows, "train/rewards/mood_reward")
    (total,) = column(rows, "train/score")
    assert -1 <= user <= 1 and -1 <= shipped <= 1
    assert total == pytest.approx(user + 0.5 * shipped, abs=1e-5)  # both sources, weighted
