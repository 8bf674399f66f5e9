"""Online DPO: pair selection, the judge, the loss on the selected pairs, the shipped config, learning."""

from __future__ import annotations

import csv
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from cli_helpers import run_config
from rl_helpers import length_reward, make_trainer, mean_reward, prompts_data

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules import OnlineDPO
from lit_pref.modules.online_dpo import best_and_worst, pair_rollout
from lit_pref.rollout import Rollout


def test_best_and_worst_per_group_with_ties():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 0.0, 1.0])
    chosen, rejected, decided = best_and_worst(scores, 4)
    # group 0: best 0.9 first at row 1, worst 0.1 at row 0; group 1 all tied; group 2: the first
    # 1.0 (row 8) and the last 0.0 (row 10)
    assert chosen.tolist() == [1, 4, 8] and rejected.tolist() == [0, 7, 10]
    assert decided.tolist() == [True, False, True]
    assert all(c != r for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True))


def test_pair_rollout_puts_each_prompts_chosen_then_rejected():
    rollout = Rollout(
        prompt_input_ids=torch.ones(2, 3, dtype=torch.long),
        prompt_attention_mask=torch.ones(2, 3, dtype=torch.long),
        completion_input_ids=torch.arange(6)[:, None].repeat(1, 2),
        completion_attention_mask=torch.ones(6, 2, dtype=torch.long),
        ended=torch.tensor([True, False, True, True, False, False]),
        num_generations=3,
        prompts=["a", "b"],
        completions=["a0", "a1", "a2", "b0", "b1", "b2"],
    )
    pairs = pair_rollout(rollout, torch.tensor([2, 3]), torch.tensor([0, 5]))
    assert pairs.num_generations == 2 and pairs.completions == ["a2", "a0", "b0", "b2"]
    assert pairs.completion_input_ids[:, 0].tolist() == [2, 0, 3, 5]
    assert pairs.ended.tolist() == [True, True, True, False]


def longer_wins(prompts, pairs):
    """A pairwise judge: the longer completion is better (0: the first, 1: the second)."""
    return [0 if len(a) >= len(b) else 1 for a, b in pairs]


def test_configuration_is_validated(tiny_lm_dir):
    model = str(tiny_lm_dir)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        OnlineDPO(model_name_or_path=model, rewards=length_reward, num_generations=1)
    with pytest.raises(ValueError, match="set num_generations: 2, not 4"):
        OnlineDPO(model_name_or_path=model, rewards=length_reward, judge=longer_wins, num_generations=4)
    with pytest.raises(ValueError, match="OnlineDPO needs rewards"):  # also with a judge: they are logged
        OnlineDPO(model_name_or_path=model, judge=longer_wins)
    with pytest.raises(ValueError, match="unknown loss_type"):
        OnlineDPO(model_name_or_path=model, rewards=length_reward, loss_type="bogus")


class RecordPairs(OnlineDPO):
    """Online DPO that keeps what it selected and the first loss it computed."""

    def prepare(self, rollout):
        tensors = super().prepare(rollout)
        self.selected = (rollout, tensors)
        return tensors

    def rollout_loss(self, rollout, tensors, num_items):
        loss, metrics = super().rollout_loss(rollout, tensors, num_items)
        self.losses = [*getattr(self, "losses", []), float(loss)]
        return loss, metrics


def test_the_judge_picks_the_pair_and_the_first_loss_is_ln2(tiny_lm_dir, tmp_path):
    """At the first step the policy is its reference copy: every decided pair's sigmoid loss is
    ln 2; the chosen completion of each pair is the one the judge preferred."""
    module = RecordPairs(
        model_name_or_path=str(tiny_lm_dir), rewards=length_reward, judge=longer_wins, max_new_tokens=6,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )  # fmt: skip
    make_trainer(tmp_path, max_steps=1).fit(module, prompts_data())
    rollout, tensors = module.selected
    for group in range(rollout.num_prompts):
        a, b = rollout.completions[2 * group], rollout.completions[2 * group + 1]
        role = tensors.role[2 * group : 2 * group + 2].tolist()
        assert role == ([1, -1] if len(a) >= len(b) else [-1, 1])
    assert module.losses[0] == pytest.approx(math.log(2), abs=1e-6)


def test_a_judge_returning_bad_verdicts_is_an_error(tiny_lm_dir, tmp_path):
    module = OnlineDPO(
        model_name_or_path=str(tiny_lm_dir), rewards=length_reward, judge=lambda p, pairs: [2] * len(pairs), max_new_tokens=4
    )
    with pytest.raises(ValueError, match="the judge must return 0 or 1 for each of the 4 pairs"):
        make_trainer(tmp_path, max_steps=1).fit(module, prompts_data())


def test_reward_ties_are_left_out_of_the_loss(tiny_lm_dir, tmp_path):
    """A constant reward decides nothing: a warning, loss 0, and no weight moves."""
    module = RecordPairs(
        model_name_or_path=str(tiny_lm_dir), rewards=lambda prompts, completions, **_: [1.0] * len(completions),
        max_new_tokens=4, optimizer=partial(torch.optim.SGD, lr=1.0),
    )  # fmt: skip
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    with pytest.warns(UserWarning, match="4 of 4 prompts got the same reward"):
        make_trainer(tmp_path, max_steps=1).fit(module, prompts_data())
    assert module.losses == [0.0]
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_parameters())


def test_shipped_config_runs_offline(in_project):
    cli, rows = run_config(
        "fit", "online_dpo.yaml", "--trainer.max_steps=2", "--trainer.val_check_interval=1",
        "--trainer.limit_val_batches=1", "--data.max_val_samples=4",
    )  # fmt: skip
    run = in_project / "outputs" / "online_dpo"
    assert (run / "model" / "config.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    keys = set().union(*rows)
    assert {"train/loss", "train/score", "train/win_rate", "train/rewards/margins", "val/score"} <= keys
    samples = Path(cli.trainer.logger.log_dir) / "samples.csv"
    assert len(list(csv.DictReader(samples.open(encoding="utf-8")))) == 8


def test_online_dpo_raises_the_task_reward(sft_dir, tmp_path):
    """The shipped configuration's budget (40 steps of 8 prompts, 4 samples each) from the SFT start."""
    module = OnlineDPO(
        model_name_or_path=str(sft_dir), rewards="lit_pref.tasks:mood_reward", num_generations=4,
        max_new_tokens=12, optimizer=partial(torch.optim.AdamW, lr=3e-4),
    )  # fmt: skip
    module.configure_model()
    before = mean_reward(module.policy, module.tokenizer)
    data = PreferenceDataModule("lit_pref.tasks:mood_prompts", batch_size=8, val_split=None)
    make_trainer(tmp_path, max_steps=40).fit(module, data)
    after = mean_reward(module.policy, module.tokenizer)
    print(f"Online DPO: held-out mean reward {before:.3f} → {after:.3f}")
    assert after > before + 0.15
