"""The BCO module: the loss against bco_loss, the reward shift δ (running mean, all-reduced,
checkpointed and resumed), and a short CLI run that learns."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean

import pytest
import torch
from cli_helpers import run_config
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lit_pref.modules.bco as bco_module
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.losses.kto import bco_loss
from lit_pref.modules import BCO

# --------------------------------------------------------------------------- helpers


def unpaired_dm(model_dir: Path, samples: int = 8, batch: int = 4) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        tokenizer_name_or_path=str(model_dir), target="unpaired", max_train_samples=samples, max_val_samples=2,
        batch_size=batch,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def heldout_pair_accuracy(module, dm: PreferenceDataModule) -> tuple[float, float]:
    """Preference accuracy of the log-probs on the held-out pairs, under the reference (the
    untrained policy) and under the trained policy: the fraction of pairs whose desirable
    completion (unpaired row 2i) is more likely than its undesirable one (row 2i + 1)."""
    policy, reference, labels = [], [], []
    with torch.no_grad():
        for batch in dm.sequential_dataloader("val"):
            policy.append(module.logps(module.policy, batch).sum)
            reference.append(module.logps(module.reference.network, batch).sum)
            labels.append(batch["label"])
    labels = torch.cat(labels)
    assert labels[0::2].all() and not labels[1::2].any()

    def accuracy(logps: list[torch.Tensor]) -> float:
        values = torch.cat(logps)
        return (values[0::2] > values[1::2]).float().mean().item()

    return accuracy(reference), accuracy(policy)


@pytest.fixture(scope="module")
def dm(tiny_lm_dir) -> PreferenceDataModule:
    return unpaired_dm(tiny_lm_dir)


def batches(dm: PreferenceDataModule) -> list[dict]:
    return list(dm.sequential_dataloader("train"))


def moved_module(model_dir: Path, beta: float = 0.5) -> BCO:
    """A BCO module whose reference is noised, so rewards are non-zero from the start."""
    module = BCO(model_name_or_path=str(model_dir), beta=beta)
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.reference.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def rewards_of(module: BCO, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        policy = module.logps(module.policy, batch).sum
        return module.beta * (policy - module.logps(module.reference.network, batch).sum)


# ---------------------------------------------------------------------------- tests
def test_untrained_loss_is_ln2_and_delta_starts_at_zero(tiny_lm_dir, dm):
    module = BCO(model_name_or_path=str(tiny_lm_dir))
    module.configure_model()
    batch = batches(dm)[0]
    rewards = rewards_of(module, batch)
    loss, metrics = module.shared_step(batch, "train")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert rewards.abs().max() < 1e-5 and metrics["delta"].item() == 0.0
    assert module.stuck_loss == pytest.approx(math.log(2))


def test_delta_is_the_running_mean_of_past_rewards(tiny_lm_dir, dm):
    """Step t's loss is bco_loss with δ = the mean of every reward of steps < t; δ then takes
    in step t's rewards. Validation reads δ and leaves it alone."""
    module = moved_module(tiny_lm_dir)
    first, second = batches(dm)[:2]
    r1, r2 = rewards_of(module, first), rewards_of(module, second)
    loss1 = module.training_step(first, 0)
    expected1 = bco_loss(
        r1 / module.beta, torch.zeros_like(r1), first["label"], torch.tensor(0.0), module.beta
    )
    torch.testing.assert_close(loss1, expected1.losses.mean())
    assert module.reward_shift.count == r1.numel()
    assert module.reward_shift.value.item() == pytest.approx(r1.mean().item(), abs=1e-6)
    delta1 = module.reward_shift.value
    loss2 = module.training_step(second, 1)
    expected2 = bco_loss(r2 / module.beta, torch.zeros_like(r2), second["label"], delta1, module.beta)
    torch.testing.assert_close(loss2, expected2.losses.mean())
    assert module.reward_shift.value.item() == pytest.approx(torch.cat([r1, r2]).mean().item(), abs=1e-6)
    assert delta1.item() != 0 and not torch.equal(loss2, expected2.losses.mean() * 0)
    count = module.reward_shift.count
    module.validation_step(first, 0)
    assert module.reward_shift.count == count
    # the shift matters: the same batch with δ = 0 gives another loss
    unshifted = bco_loss(
        r2 / module.beta, torch.zeros_like(r2), second["label"], torch.tensor(0.0), module.beta
    )
    assert not torch.allclose(unshifted.losses.mean(), expected2.losses.mean())


def test_delta_is_reduced_across_ranks(tiny_lm_dir, dm, monkeypatch):
    """δ takes the all-reduced [sum, count]: another rank's 8 rewards summing to 4 shift it."""
    module = moved_module(tiny_lm_dir)
    seen = []

    def fake_all_reduce(totals):
        seen.append(totals.clone())
        return totals + torch.tensor([4.0, 8.0])

    monkeypatch.setattr(bco_module, "all_reduce_sum", fake_all_reduce)
    batch = batches(dm)[0]
    rewards = rewards_of(module, batch)
    module.training_step(batch, 0)
    torch.testing.assert_close(seen[0], torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()))]))
    assert module.reward_shift.count == rewards.numel() + 8
    assert module.reward_shift.value.item() == pytest.approx(
        (rewards.sum().item() + 4) / (rewards.numel() + 8)
    )


def test_delta_is_checkpointed_and_resumed(tiny_lm_dir, tmp_path):
    """Two steps write δ into the checkpoint; a run resumed from it continues the same mean."""
    dm = unpaired_dm(tiny_lm_dir, samples=8, batch=4)

    def trainer(steps: int) -> Trainer:
        return Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        )  # fmt: skip

    first = BCO(model_name_or_path=str(tiny_lm_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer(2).fit(first, dm)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)[bco_module.CHECKPOINT_KEY]
    assert saved == first.reward_shift.state_dict() and saved["count"] == 2 * 4
    assert saved["total"] != 0.0  # the second step's rewards are no longer 0

    resumed = BCO(model_name_or_path=str(tiny_lm_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer(3).fit(resumed, dm, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.reward_shift.count == 3 * 4
    straight = BCO(model_name_or_path=str(tiny_lm_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    straight.reward_shift.load_state_dict(saved)
    assert resumed.reward_shift.value != straight.reward_shift.value  # the third step added to it
    assert straight.reward_shift.count == 8


def test_beta_and_reference_are_checked(tiny_lm_dir):
    with pytest.raises(ValueError, match="beta"):
        BCO(model_name_or_path=str(tiny_lm_dir), beta=0.0)
    with pytest.raises(ValueError, match="reference"):
        BCO(model_name_or_path=str(tiny_lm_dir), reference_free=True)


def test_bco_config_learns_through_the_cli(in_project):
    """``configs/bco.yaml`` as shipped, shortened: the loss falls, the held-out reward
    margin rises from its untrained value 0, and the policy prefers the desirable completion of
    more held-out pairs than it did."""
    quick = [
        "--trainer.max_steps=32",
        "--trainer.val_check_interval=1.0",  # end of each epoch
        "--data.max_train_samples=512",
        "--data.batch_size=32",
    ]
    _, before = run_config("validate", "bco.yaml", *quick)
    cli, rows = run_config("fit", "bco.yaml", *quick)
    val_before = next(r for r in before if "val/rewards/margins" in r)
    val_after = [r for r in rows if "val/rewards/margins" in r][-1]
    train = [r for r in rows if "train/loss" in r]
    loss_first, loss_last = train[0]["train/loss"], mean(r["train/loss"] for r in train[-5:])
    acc_before, acc_after = heldout_pair_accuracy(cli.model, cli.datamodule)
    print(
        f"BCO: train loss {loss_first:.4f} → {loss_last:.4f}; val loss {val_before['val/loss']:.4f} → "
        f"{val_after['val/loss']:.4f}; val margin {val_before['val/rewards/margins']:.4f} → "
        f"{val_after['val/rewards/margins']:.4f}; held-out pair accuracy {acc_before:.4f} → {acc_after:.4f}; "
        f"δ {train[-1]['train/delta']:.4f}"
    )
    assert val_before["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert loss_first == pytest.approx(math.log(2), abs=1e-5)
    assert loss_last < loss_first - 0.05
    assert val_after["val/rewards/margins"] > 0.2
    assert val_after["val/loss"] < val_before["val/loss"]
    assert acc_after > acc_before + 0.1
    module = cli.model
    assert module.reward_shift.count == 32 * 32
    moved = [
        not torch.equal(p, q)
        for p, q in zip(module.policy.parameters(), module.reference.network.parameters(), strict=True)
    ]
    assert all(moved)
