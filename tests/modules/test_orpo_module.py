"""The ORPO module: no reference, the loss against orpo_loss, its metrics, and a short CLI run
that learns."""

from __future__ import annotations

from statistics import mean

import pytest
import torch
from cli_helpers import run_config
from transformers import AutoModelForCausalLM

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.losses.orpo import orpo_loss
from lit_pref.modules import ORPO

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def batch(tiny_lm_dir) -> dict:
    dm = PreferenceDataModule(tokenizer_name_or_path=str(tiny_lm_dir), target="paired", max_train_samples=4)
    dm.setup("fit")
    return next(iter(dm.sequential_dataloader("train")))


# ---------------------------------------------------------------------------- tests
def test_no_reference_and_the_step_is_orpo_loss(tiny_lm_dir, batch):
    """No reference network; the loss is the chosen mean-token NLL + λ·(−log σ(log odds ratio))."""
    module = ORPO(model_name_or_path=str(tiny_lm_dir), beta=0.5)
    module.configure_model()
    assert getattr(module, "reference", None) is None
    n_policy = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_lm_dir).parameters())
    assert sum(p.numel() for p in module.parameters()) == n_policy
    loss, metrics = module.shared_step(batch)
    with torch.no_grad():
        chosen, rejected = module.logps(module.policy, batch, share_prompt=False).pairs()
    expected = orpo_loss(chosen.mean, rejected.mean, -chosen.mean, 0.5)
    torch.testing.assert_close(loss, expected.losses.mean(), atol=1e-5, rtol=1e-5)
    for name, value in [
        ("nll", -chosen.mean),
        ("log_odds_ratio", expected.log_odds_ratio),
        ("log_odds_chosen", expected.log_odds_chosen),
        ("rewards/chosen", 0.5 * chosen.mean),
        ("rewards/rejected", 0.5 * rejected.mean),
        ("logps/chosen", chosen.sum),
    ]:
        torch.testing.assert_close(metrics[name], value, atol=1e-5, rtol=1e-5, msg=name)
    assert {"rewards/accuracies", "rewards/margins", "or_loss", "loss"} <= set(metrics)
    loss.backward()
    assert all(p.grad is not None for p in module.policy.parameters())


def test_beta_zero_is_sft_and_negative_beta_raises(tiny_lm_dir, batch):
    module = ORPO(model_name_or_path=str(tiny_lm_dir), beta=0.0)
    module.configure_model()
    loss, metrics = module.shared_step(batch)
    torch.testing.assert_close(loss, metrics["nll"].mean())
    with pytest.raises(ValueError, match="λ"):
        ORPO(model_name_or_path=str(tiny_lm_dir), beta=-0.1)


def test_orpo_config_learns_through_the_cli(in_project, tiny_lm_dir):
    """``configs/orpo.yaml``, shortened: the loss (and its NLL) falls, held-out
    rewards/accuracies rises, every weight moved, no reference network exists."""
    quick = [
        "--trainer.max_steps=48",
        "--trainer.val_check_interval=1.0",  # end of each epoch
        "--data.max_train_samples=512",
        "--data.batch_size=32",
        "--model.optimizer.lr=3e-3",
        "--model.beta=3.0",  # λ: the random tiny model needs the odds term weighted up
    ]
    _, before = run_config("validate", "orpo.yaml", *quick)
    cli, rows = run_config("fit", "orpo.yaml", *quick)
    val_before = next(r for r in before if "val/rewards/accuracies" in r)
    val_after = [r for r in rows if "val/rewards/accuracies" in r][-1]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    print(
        f"ORPO: train loss {train[0]:.4f} → {mean(train[-5:]):.4f}; val nll {val_before['val/nll']:.4f} → "
        f"{val_after['val/nll']:.4f}; val accuracy {val_before['val/rewards/accuracies']:.4f} → "
        f"{val_after['val/rewards/accuracies']:.4f}"
    )
    assert mean(train[-5:]) < 0.8 * train[0]
    assert val_after["val/nll"] < val_before["val/nll"]
    assert val_after["val/rewards/accuracies"] >= val_before["val/rewards/accuracies"] + 0.2
    module = cli.model
    assert getattr(module, "reference", None) is None
    initial = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).state_dict()
    assert all(not torch.equal(p, initial[n]) for n, p in module.policy.named_parameters())
