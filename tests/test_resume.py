"""A resumed run is the same run: stopped inside an epoch and resumed, every module logs the same
losses and ends with the same weights as a straight run (the loader's position, every random
state and the optimizer are restored)."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from rl_helpers import length_reward

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.data.sampling import ResumableSampler
from lit_pref.modules import BCO, CPO, DPO, GRPO, KTO, ORPO, PPO, RFT, SFT, OnlineDPO, RewardModel

ADAMW = partial(torch.optim.AdamW, lr=5e-3)
# Rows and batch size: 3 batches per epoch, so a stop after 2 steps is inside the first epoch
# and the resumed run crosses into the second (a new permutation).
ROWS, BATCH = 6, 2


def offline(module_cls, **kwargs):
    return lambda model: module_cls(model_name_or_path=model, optimizer=ADAMW, **kwargs)


def online(module_cls, **kwargs):
    # Sampling at temperature 1 draws from the random stream every step: a resume that did not
    # restore it would sample different completions.
    return lambda model: module_cls(
        model_name_or_path=model, rewards=length_reward, max_new_tokens=4, optimizer=ADAMW, **kwargs
    )


MODULES = {
    "dpo": (offline(DPO), "lit_pref.tasks:mood_preferences"),
    "kto": (offline(KTO), "lit_pref.tasks:mood_preferences"),
    "bco": (offline(BCO), "lit_pref.tasks:mood_preferences"),
    "sft": (offline(SFT), "lit_pref.tasks:mood_sft"),
    "reward": (offline(RewardModel), "lit_pref.tasks:mood_preferences"),
    "cpo": (offline(CPO), "lit_pref.tasks:mood_preferences"),
    "orpo": (offline(ORPO), "lit_pref.tasks:mood_preferences"),
    "grpo": (online(GRPO, num_generations=2), "lit_pref.tasks:mood_prompts"),
    "ppo": (online(PPO, num_ppo_epochs=1), "lit_pref.tasks:mood_prompts"),
    "online_dpo": (online(OnlineDPO, num_generations=2), "lit_pref.tasks:mood_prompts"),
    "rft": (online(RFT, num_generations=2), "lit_pref.tasks:mood_prompts"),
}


def run(model_dir: Path, name: str, root: Path, max_steps: int, ckpt_path: Path | None = None, dropout: bool = False):
    """Fit module ``name`` to ``max_steps`` (from ``ckpt_path`` if given) with a checkpoint at every
    step; returns the module and its logged ``train/loss`` per step."""
    make_module, dataset = MODULES[name]
    L.seed_everything(0)
    module = make_module(str(model_dir))
    if dropout:
        module.zero_dropout = False
    data = PreferenceDataModule(dataset, batch_size=BATCH, max_train_samples=ROWS, val_split=None)
    logger = CSVLogger(root, name="log")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        losses = {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}
    return module, losses


def assert_same_run(straight, resumed, straight_losses, resumed_losses, steps):
    assert sorted(resumed_losses) == steps
    for step in steps:
        assert resumed_losses[step] == pytest.approx(straight_losses[step], abs=1e-6), step
    resumed_params = dict(resumed.named_parameters())
    for name, param in straight.named_parameters():
        torch.testing.assert_close(resumed_params[name], param, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(MODULES))
def test_resume_inside_an_epoch_repeats_the_straight_run(name, tiny_lm_dir, tmp_path):
    straight, straight_losses = run(tiny_lm_dir, name, tmp_path / "straight", max_steps=4)
    run(tiny_lm_dir, name, tmp_path / "first", max_steps=2)
    resumed, resumed_losses = run(
        tiny_lm_dir, name, tmp_path / "second", max_steps=4, ckpt_path=tmp_path / "first" / "ckpt" / "epoch=0-step=2.ckpt"
    )
    assert_same_run(straight, resumed, straight_losses, resumed_losses, [2, 3])
    # Not a vacuous comparison: the steps did move the weights and the losses.
    assert len(set(straight_losses.values())) == 4


def test_resume_restores_the_random_stream_dropout_draws_from(tiny_lm_dir, tmp_path):
    """With dropout on, every step draws masks: only a restored random state repeats them."""
    straight, straight_losses = run(tiny_lm_dir, "dpo", tmp_path / "straight", max_steps=4, dropout=True)
    run(tiny_lm_dir, "dpo", tmp_path / "first", max_steps=2, dropout=True)
    resumed, resumed_losses = run(
        tiny_lm_dir, "dpo", tmp_path / "second", max_steps=4, dropout=True,
        ckpt_path=tmp_path / "first" / "ckpt" / "epoch=0-step=2.ckpt",
    )
    assert_same_run(straight, resumed, straight_losses, resumed_losses, [2, 3])


# ------------------------------------------------------------------ the sampler on its own
def test_sampler_resumes_at_the_saved_batch_and_counts_its_own_epochs():
    rows = list(range(10))
    straight = ResumableSampler(rows, batch_size=3, seed=5)
    epochs = [list(straight)]
    straight.batches_trained = 4
    epochs.append(list(straight))
    assert sorted(epochs[0]) == rows and epochs[0] != epochs[1]  # a new permutation per epoch

    first = ResumableSampler(rows, batch_size=3, seed=5)
    iter(first)
    first.batches_trained = 2
    resumed = ResumableSampler(rows, batch_size=3, seed=5)
    resumed.set_epoch(7)  # what the trainer numbers the epoch does not matter
    resumed.load_state_dict(first.state_dict())
    iter(resumed)  # a pass that trains on nothing (the trainer found the epoch done) ...
    assert list(resumed) == epochs[0][6:]  # ... is made again, not skipped
    resumed.batches_trained = 2
    assert list(resumed) == epochs[1]


def test_sampler_saved_at_the_end_of_an_epoch_resumes_with_the_next():
    rows = list(range(8))
    straight = ResumableSampler(rows, batch_size=4, seed=1)
    iter(straight)
    straight.batches_trained = 2
    second_epoch = list(straight)
    first = ResumableSampler(rows, batch_size=4, seed=1)
    iter(first)
    first.batches_trained = 2
    resumed = ResumableSampler(rows, batch_size=4, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert list(resumed) == second_epoch


def test_sampler_shards_agree_across_ranks():
    rows = list(range(12))
    shards = [list(ResumableSampler(rows, batch_size=2, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == rows


def test_sampler_restarts_the_epoch_with_a_warning_when_the_ranks_changed():
    rows = list(range(12))
    saved = ResumableSampler(rows, batch_size=2, seed=3, num_replicas=2, rank=0)
    iter(saved)
    saved.batches_trained = 1
    resumed = ResumableSampler(rows, batch_size=2, seed=3)
    with pytest.warns(UserWarning, match="restarts epoch 0 from its first batch"):
        resumed.load_state_dict(saved.state_dict())
    assert sorted(resumed) == rows
