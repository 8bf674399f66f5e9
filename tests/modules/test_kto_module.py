"""The KTO module: mismatched KL pairs in the data, z0, the reference choices, precomputed
reference values, the weight-ratio warning, and a short CLI run that learns."""

from __future__ import annotations

import warnings
from pathlib import Path
from statistics import mean

import pytest
import torch
from cli_helpers import run_config
from lightning import Trainer

import lit_pref.modules.kto as kto_module
from lit_pref.data.collate import Collator
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.data.mismatch import mismatched_rows
from lit_pref.losses.kto import KTOLossConfig, kto_kl_estimate, kto_loss
from lit_pref.modules import KTO

# --------------------------------------------------------------------------- helpers


def unpaired_dm(model_dir: Path, samples: int = 8, batch: int = 4) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        tokenizer_name_or_path=str(model_dir), target="unpaired", max_train_samples=samples, max_val_samples=4,
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


def first_batch(dm: PreferenceDataModule) -> dict:
    return next(iter(dm.sequential_dataloader("train")))


# ------------------------------------------------------------------------------ data
def test_mismatched_rows_skip_the_same_prompt():
    a, b, c = [1], [2], [3]
    # paired → unpaired puts a prompt's two completions side by side: skip to the next prompt.
    assert mismatched_rows([a, a, b, b, c, c]) == [2, 2, 4, 4, 0, 0]
    assert mismatched_rows([a, b, c]) == [1, 2, 0]
    # wrap-around lands on the same prompt: go on to the next different one.
    assert mismatched_rows([a, b, a]) == [1, 2, 1]
    # a single prompt: nothing to skip to, the next row is used.
    assert mismatched_rows([a, a, a]) == [1, 2, 0]


def test_unpaired_split_has_kl_completions_and_they_collate(dm):
    train = dm.splits["train"]
    prompts, completions = train["prompt_input_ids"], train["completion_input_ids"]
    kl = train["kl_completion_input_ids"]
    n = len(train)
    for i, j in enumerate(mismatched_rows(list(prompts))):
        assert kl[i] == completions[j] and prompts[i] != prompts[j]
    assert n == 16 and sum(kl[i] == completions[(i + 1) % n] for i in range(n)) < n  # not a plain shift
    batch = Collator(pad_token_id=-1)([train[i] for i in range(3)])
    lengths = [len(kl[i]) for i in range(3)]
    assert batch["kl_completion_input_ids"].shape == (3, max(lengths))
    assert batch["kl_completion_attention_mask"].sum(-1).tolist() == lengths
    for row, length in enumerate(lengths):  # right-padded
        assert batch["kl_completion_input_ids"][row, :length].tolist() == kl[row]
        assert (batch["kl_completion_input_ids"][row, length:] == -1).all()


def test_kl_column_only_for_unpaired(tiny_lm_dir):
    paired = PreferenceDataModule(
        tokenizer_name_or_path=str(tiny_lm_dir), target="paired", max_train_samples=4
    )
    paired.setup("fit")
    assert "kl_completion_input_ids" not in paired.splits["train"].column_names


# ------------------------------------------------------------------------ the module
@pytest.mark.parametrize("reference", ["copy", "model", "adapter_disabled"])
def test_untrained_loss_is_half_and_z0_zero_for_every_reference(reference, tiny_lm_dir, dm):
    """Policy == reference ⇒ every log-ratio is 0 ⇒ z0 = 0 and each row's loss is λ·σ(0) = λ/2."""
    kwargs = {"ref_model_name_or_path": str(tiny_lm_dir)} if reference == "model" else {}
    if reference == "adapter_disabled":
        kwargs["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    module = KTO(model_name_or_path=str(tiny_lm_dir), reference=reference, **kwargs)
    module.configure_model()
    assert module.reference.kind == reference
    assert (module.reference.network is None) == (reference == "adapter_disabled")
    loss, metrics = module.shared_step(first_batch(dm), "train")
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    assert metrics["kl"].item() == 0.0
    assert metrics["rewards/chosen"].abs().max() < 1e-5 and metrics["rewards/rejected"].abs().max() < 1e-5
    loss.backward()
    grads = [p.grad for p in module.policy.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_step_matches_the_loss_function_off_the_reference(tiny_lm_dir, dm):
    """With policy and reference apart, the module's loss and z0 are kto_loss and
    kto_kl_estimate of independently computed log-probs (KL pass: the same prompts with the
    mismatched completions)."""
    module = KTO(model_name_or_path=str(tiny_lm_dir), beta=0.5, desirable_weight=1.2)
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.reference.network.parameters():  # noise lowers the reference's log-probs: z0 > 0
            p.add_(0.05 * torch.randn_like(p))
    batch = first_batch(dm)
    loss, metrics = module.shared_step(batch, "train")
    kl = kto_module.kl_batch(batch)
    with torch.no_grad():
        policy, ref = module.logps(module.policy, batch).sum, module.logps(module.reference.network, batch).sum
        z0 = kto_kl_estimate(module.logps(module.policy, kl).sum, module.logps(module.reference.network, kl).sum)
    expected = kto_loss(policy, ref, batch["label"], z0, KTOLossConfig(beta=0.5, desirable_weight=1.2))
    assert z0 > 0
    torch.testing.assert_close(metrics["kl"], z0)
    torch.testing.assert_close(loss, expected.losses.mean())
    torch.testing.assert_close(metrics["rewards/chosen"], expected.chosen_rewards)
    torch.testing.assert_close(metrics["logps/rejected"], policy[~batch["label"]])


def test_z0_is_reduced_across_ranks_before_clamping(tiny_lm_dir, dm, monkeypatch):
    """The module hands [sum, count] to the all-reduce: a second rank's KL pairs shift z0."""
    module = KTO(model_name_or_path=str(tiny_lm_dir))
    module.configure_model()
    seen = []

    def fake_all_reduce(totals):  # another rank holding 4 KL pairs with log-ratio sum 6
        seen.append(totals.clone())
        return totals + torch.tensor([6.0, 4.0])

    monkeypatch.setattr(kto_module, "all_reduce_sum", fake_all_reduce)
    batch = first_batch(dm)
    _, metrics = module.shared_step(batch, "train")
    n = batch["label"].numel()
    assert seen[0].tolist() == [0.0, float(n)]
    assert metrics["kl"].item() == pytest.approx(6.0 / (n + 4))
    monkeypatch.setattr(kto_module, "all_reduce_sum", lambda totals: totals + torch.tensor([-6.0, 4.0]))
    assert module.shared_step(batch, "train")[1]["kl"].item() == 0.0  # clamped after the reduction


def test_needs_kl_columns_and_a_reference(tiny_lm_dir, dm):
    module = KTO(model_name_or_path=str(tiny_lm_dir))
    module.configure_model()
    batch = {k: v for k, v in first_batch(dm).items() if not k.startswith("kl_")}
    with pytest.raises(ValueError, match="kl_completion_input_ids"):
        module.shared_step(batch, "train")
    with pytest.raises(ValueError, match="reference"):
        KTO(model_name_or_path=str(tiny_lm_dir), reference_free=True)
    with pytest.raises(ValueError, match="loss_type"):
        KTO(model_name_or_path=str(tiny_lm_dir), loss_type="sigmoid")
    with pytest.raises(ValueError, match="desirable_weight"):
        KTO(model_name_or_path=str(tiny_lm_dir), desirable_weight=0.0)


def test_apo_zero_unpaired_ignores_z0(tiny_lm_dir, dm):
    module = KTO(model_name_or_path=str(tiny_lm_dir), loss_type="apo_zero_unpaired")
    module.configure_model()
    with torch.no_grad():
        module.policy.lm_head.weight.mul_(1.5)
    batch = first_batch(dm)
    loss, metrics = module.shared_step(batch, "train")
    with torch.no_grad():
        r = module.logps(module.policy, batch).sum - module.logps(module.reference.network, batch).sum
    expected = torch.where(batch["label"], torch.sigmoid(-0.1 * r), torch.sigmoid(0.1 * r)).mean()
    torch.testing.assert_close(loss, expected)
    assert metrics["kl"].item() > 0  # still estimated and logged


def test_precomputed_reference_values_equal_on_the_fly(tiny_lm_dir, tmp_path):
    """One fit with ``precompute_ref_logps``: the cached [N, 2] table equals the reference's
    values computed batch by batch, the network is freed, and the weight-ratio warning fires
    exactly once with the counts."""
    dm = unpaired_dm(tiny_lm_dir, samples=12, batch=4)
    module = KTO(
        model_name_or_path=str(tiny_lm_dir), precompute_ref_logps=True, ref_cache_dir=str(tmp_path), desirable_weight=2.0
    )  # fmt: skip
    trainer = Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, dm)
    ratio = [w for w in caught if "λ_D·n_D/(λ_U·n_U)" in str(w.message)]
    assert len(ratio) == 1 and "n_desirable=12, n_undesirable=12" in str(ratio[0].message)
    assert module.reference.network is None
    table = module.ref_logp_table.tables["train"][1]
    assert table.shape == (24, 2)
    on_the_fly = KTO(model_name_or_path=str(tiny_lm_dir))
    on_the_fly.configure_model()
    for batch in dm.sequential_dataloader("train"):
        torch.testing.assert_close(
            table[batch["index"]], on_the_fly.reference_values(batch), atol=1e-5, rtol=0
        )
    # a shuffled training batch reads the same values from the table
    batch = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(
        module.reference_values_for(batch, "train"), on_the_fly.reference_values(batch), atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------------- CLI + config
def test_kto_config_learns_through_the_cli(in_project):
    """``configs/kto.yaml`` as shipped, shortened: the held-out loss falls, the held-out reward
    margin (mean desirable − mean undesirable implicit reward) rises from its untrained value 0,
    and the policy prefers the desirable completion of more held-out pairs than it did."""
    quick = [
        "--trainer.max_steps=32",
        "--trainer.val_check_interval=1.0",  # end of each epoch
        "--data.max_train_samples=512",
        "--data.batch_size=32",
    ]
    _, before = run_config("validate", "kto.yaml", *quick)
    cli, rows = run_config("fit", "kto.yaml", *quick)
    val_before = next(r for r in before if "val/rewards/margins" in r)
    val_after = [r for r in rows if "val/rewards/margins" in r][-1]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    acc_before, acc_after = heldout_pair_accuracy(cli.model, cli.datamodule)
    print(
        f"KTO: train loss {train[0]:.4f} → {mean(train[-5:]):.4f}; val loss {val_before['val/loss']:.4f} → "
        f"{val_after['val/loss']:.4f}; val margin {val_before['val/rewards/margins']:.4f} → "
        f"{val_after['val/rewards/margins']:.4f}; held-out pair accuracy {acc_before:.4f} → {acc_after:.4f}"
    )
    assert val_before["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert val_before["val/loss"] == pytest.approx(0.5, abs=1e-6)
    assert val_after["val/rewards/margins"] > 0.05
    assert val_after["val/loss"] < 0.5 - 0.005
    assert acc_after > acc_before + 0.1
    module = cli.model
    moved = [
        not torch.equal(p, q)
        for p, q in zip(module.policy.parameters(), module.reference.network.parameters(), strict=True)
    ]
    assert all(moved) and all(not p.requires_grad for p in module.reference.network.parameters())
    assert (in_project / "outputs" / "kto" / "model" / "config.json").is_file()
