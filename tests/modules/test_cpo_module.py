"""The CPO module (and SimPO as its simpo loss type): defaults, no reference, the loss against
cpo_loss, and short CLI runs that learn."""

from __future__ import annotations

from statistics import mean

import pytest
import torch
from cli_helpers import run_config
from transformers import AutoModelForCausalLM

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.losses.cpo import CPOLossConfig, cpo_loss
from lit_pref.modules import CPO

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def batch(tiny_lm_dir) -> dict:
    dm = PreferenceDataModule(tokenizer_name_or_path=str(tiny_lm_dir), target="paired", max_train_samples=4)
    dm.setup("fit")
    return next(iter(dm.sequential_dataloader("train")))


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("kwargs", "beta", "alpha", "normalised"),
    [
        ({}, 0.1, 1.0, False),
        ({"loss_type": "simpo"}, 2.0, 0.0, True),
        ({"loss_type": "simpo", "beta": 5.0, "cpo_alpha": 0.5}, 5.0, 0.5, True),
        ({"loss_type": "ipo"}, 0.1, 1.0, True),
        ({"loss_type": "hinge", "beta": 0.3, "length_normalize": True}, 0.3, 1.0, True),
        ({"loss_type": "alphapo", "alpha": 0.2}, 2.0, 0.0, True),
    ],
)
def test_defaults_are_resolved_per_loss_type(kwargs, beta, alpha, normalised, tiny_lm_dir):
    module = CPO(model_name_or_path=str(tiny_lm_dir), **kwargs)
    assert (module.loss_config.beta, module.loss_config.cpo_alpha) == (beta, alpha)
    assert module.length_normalize is normalised
    assert module.loss_config.simpo_gamma == 1.0
    assert module.loss_config.alpha == kwargs.get("alpha", 0.0)
    assert module.loss_config.loss_type == (
        "simpo" if kwargs.get("loss_type") == "alphapo" else kwargs.get("loss_type", "sigmoid")
    )


def test_invalid_settings_raise(tiny_lm_dir):
    with pytest.raises(ValueError, match="length-normalised"):
        CPO(model_name_or_path=str(tiny_lm_dir), loss_type="simpo", length_normalize=False)
    with pytest.raises(ValueError, match="loss_type"):
        CPO(model_name_or_path=str(tiny_lm_dir), loss_type="robust")
    with pytest.raises(ValueError, match="label_smoothing"):
        CPO(model_name_or_path=str(tiny_lm_dir), loss_type="hinge", label_smoothing=0.1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_no_reference_and_the_step_is_cpo_loss(loss_type, tiny_lm_dir, batch):
    """No reference network: the module's parameters are exactly the policy's; its loss is
    cpo_loss of the policy's own (summed, or mean for simpo / ipo) log-probs plus α·NLL."""
    module = CPO(model_name_or_path=str(tiny_lm_dir), loss_type=loss_type)
    module.configure_model()
    assert getattr(module, "reference", None) is None
    n_policy = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_lm_dir).parameters())
    assert sum(p.numel() for p in module.parameters()) == n_policy
    loss, metrics = module.shared_step(batch)
    with torch.no_grad():
        chosen, rejected = module.logps(module.policy, batch, share_prompt=False).pairs()
    logps = (chosen.mean, rejected.mean) if loss_type in ("simpo", "ipo") else (chosen.sum, rejected.sum)
    expected = cpo_loss(*logps, module.loss_config, chosen_nll=-chosen.mean)
    torch.testing.assert_close(loss, expected.losses.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["rewards/chosen"], expected.chosen_rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["nll"], -chosen.mean, atol=1e-5, rtol=1e-5)
    if loss_type == "simpo":
        assert module.loss_config == CPOLossConfig.for_simpo()
    loss.backward()
    assert all(p.grad is not None for p in module.policy.parameters())


@pytest.mark.parametrize(
    ("config", "extra"),
    [("cpo.yaml", ["--model.beta=1.0"]), ("simpo.yaml", [])],
    ids=["cpo", "simpo"],
)
def test_config_learns_through_the_cli(config, extra, in_project, tiny_lm_dir):
    """The shipped config, shortened: the loss falls and held-out rewards/accuracies rises;
    every weight moved and no reference network exists."""
    quick = [
        "--trainer.max_steps=32",
        "--trainer.val_check_interval=1.0",  # end of each epoch
        "--data.max_train_samples=512",
        "--data.batch_size=32",
        "--model.optimizer.lr=3e-3",
        *extra,
    ]
    _, before = run_config("validate", config, *quick)
    cli, rows = run_config("fit", config, *quick)
    acc_before = next(r["val/rewards/accuracies"] for r in before if "val/rewards/accuracies" in r)
    acc_after = [r["val/rewards/accuracies"] for r in rows if "val/rewards/accuracies" in r][-1]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    print(
        f"{config}: train loss {train[0]:.4f} → {mean(train[-5:]):.4f}; "
        f"val accuracy {acc_before:.4f} → {acc_after:.4f}"
    )
    assert mean(train[-5:]) < 0.8 * train[0]
    assert acc_after >= acc_before + 0.2
    module = cli.model
    assert getattr(module, "reference", None) is None
    initial = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).state_dict()
    assert all(not torch.equal(p, initial[n]) for n, p in module.policy.named_parameters())
    exported = AutoModelForCausalLM.from_pretrained(
        in_project / "outputs" / config.removesuffix(".yaml") / "model"
    )
    for name, param in module.policy.named_parameters():
        assert torch.equal(exported.state_dict()[name], param), name
