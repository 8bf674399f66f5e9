"""TR-DPO's ``RefModelSync``: the reference becomes exactly α·policy + (1 − α)·reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import capture_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

import lit_pref.cli as cli_module
from lit_pref.callbacks import RefModelSync
from lit_pref.modules.dpo import DPO


def fit_with_sync(model: str | Path, root: Path, sync_steps: int, alpha: float, *extra: str):
    args = [
        "fit",
        "--model=lit_pref.modules.DPO",
        f"--model.model_name_or_path={model}",
        "--model.optimizer=torch.optim.AdamW",
        "--model.optimizer.lr=1e-2",
        "--data.max_train_samples=8",
        "--data.batch_size=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=false",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={root}",
        "--seed_everything=0",
        "--trainer.callbacks+=lit_pref.callbacks.RefModelSync",
        f"--trainer.callbacks.sync_steps={sync_steps}",
        f"--trainer.callbacks.mixup_alpha={alpha}",
        *extra,
    ]
    with capture_cli() as runs:
        cli_module.main(args)
    return runs[-1]


@pytest.fixture
def sync_spy(monkeypatch) -> list[dict]:
    """Record, at every sync, the weights just before it and check the result against them."""
    records: list[dict] = []
    original = RefModelSync.sync

    def sync(self, pl_module):
        pairs = self.parameter_pairs(pl_module)
        before = {name: (p.detach().clone(), r.detach().clone()) for name, p, r in pairs}
        original(self, pl_module)
        after = {name: (p.detach().clone(), r.detach().clone()) for name, p, r in self.parameter_pairs(pl_module)}
        records.append({"step": pl_module.trainer.global_step, "before": before, "after": after, "alpha": self.mixup_alpha})

    monkeypatch.setattr(RefModelSync, "sync", sync)
    return records


def assert_exact_mixtures(records: list[dict]) -> None:
    for record in records:
        alpha = record["alpha"]
        moved = 0
        for name, (policy, ref) in record["before"].items():
            new_policy, new_ref = record["after"][name]
            # α = 1/2 makes both products exact, so the expected value is bitwise reproducible.
            assert torch.equal(new_ref, alpha * policy + (1 - alpha) * ref), name
            assert torch.equal(new_policy, policy), name  # the policy is untouched
            moved += not torch.equal(new_ref, ref)
        assert moved > 0


@pytest.fixture(scope="module")
def adapter_dir(tiny_lm_dir, tmp_path_factory) -> Path:
    """An "SFT" LoRA adapter (random, non-zero lora_B) on the tiny model, with its tokenizer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    directory = tmp_path_factory.mktemp("sft_adapter")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(directory)
    return directory


def test_sync_separate_reference_every_optimizer_step(tiny_lm_dir, tmp_path, sync_spy):
    """Frozen copy as reference; 2 optimizer steps of 2 accumulated micro-batches each; syncing
    every step happens twice (optimizer steps, not micro-batches), each an exact mixture."""
    cli = fit_with_sync(tiny_lm_dir, tmp_path, 1, 0.5, "--trainer.max_steps=2", "--trainer.accumulate_grad_batches=2")
    assert cli.model.reference.kind == "copy"
    assert [r["step"] for r in sync_spy] == [1, 2]
    assert len(sync_spy[0]["before"]) == len(list(cli.model.policy.parameters()))
    assert_exact_mixtures(sync_spy)
    assert all(not p.requires_grad for p in cli.model.reference.network.parameters())


def test_sync_reference_adapter(adapter_dir, tmp_path, sync_spy):
    """Starting from an SFT adapter: the trained ``default`` adapter is mixed into the frozen
    reference adapter every 2 steps; the base weights never change."""
    cli = fit_with_sync(adapter_dir, tmp_path, 2, 0.5, "--trainer.max_steps=4")
    module = cli.model
    assert module.reference.kind == "adapter"
    assert [r["step"] for r in sync_spy] == [2, 4]
    names = list(sync_spy[0]["before"])
    assert names and all(".reference." in n for n in names)
    assert_exact_mixtures(sync_spy)
    base = AutoModelForCausalLM.from_pretrained(module.policy.peft_config["default"].base_model_name_or_path)
    base_params = dict(base.named_parameters())
    for name, param in module.policy.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base_params[key]), name
        elif ".reference." in name:
            assert not param.requires_grad, name


def test_hard_sync_copies_the_policy(tiny_lm_dir):
    module = DPO(model_name_or_path=str(tiny_lm_dir))
    module.configure_model()
    with torch.no_grad():
        for param in module.policy.parameters():
            param.add_(torch.randn_like(param))
    RefModelSync(sync_steps=1, mixup_alpha=1.0).sync(module)
    reference = dict(module.reference.network.named_parameters())
    for name, param in module.policy.named_parameters():
        assert torch.equal(reference[name], param), name
        assert reference[name].data_ptr() != param.data_ptr()


def test_soft_sync_matches_the_formula_for_any_alpha(tiny_lm_dir):
    module = DPO(model_name_or_path=str(tiny_lm_dir))
    module.configure_model()
    with torch.no_grad():
        for param in module.policy.parameters():
            param.add_(torch.randn_like(param))
    policy = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    before = {n: p.detach().clone() for n, p in module.reference.network.named_parameters()}
    RefModelSync(sync_steps=1, mixup_alpha=0.6).sync(module)
    for name, param in module.reference.network.named_parameters():
        torch.testing.assert_close(param, 0.6 * policy[name] + 0.4 * before[name], atol=1e-6, rtol=0)


def test_unsyncable_references_are_refused(tiny_lm_dir):
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    cases = {
        "adapter_disabled": DPO(model_name_or_path=str(tiny_lm_dir), peft=lora),
        "precomputed": DPO(model_name_or_path=str(tiny_lm_dir), precompute_ref_logps=True),
        "reference-free": DPO(model_name_or_path=str(tiny_lm_dir), reference_free=True),
    }
    for match, module in cases.items():
        with pytest.raises(ValueError, match=match):
            RefModelSync(sync_steps=1, mixup_alpha=0.5).setup(None, module, "fit")


def test_refusal_through_the_cli(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-pref"])
    args = [
        "fit",
        "--model=lit_pref.modules.DPO",
        f"--model.model_name_or_path={tiny_lm_dir}",
        "--model.peft={r: 4, target_modules: [q_proj, v_proj]}",
        "--trainer.max_steps=1",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.max_train_samples=4",
        "--trainer.callbacks+=lit_pref.callbacks.RefModelSync",
    ]
    with pytest.raises(SystemExit):
        cli_module.main(args)
    assert "cannot update an adapter_disabled reference" in capsys.readouterr().err


@pytest.mark.parametrize(("steps", "alpha"), [(0, 0.5), (1, 0.0), (1, 1.5)])
def test_bad_arguments(steps, alpha):
    with pytest.raises(ValueError):
        RefModelSync(sync_steps=steps, mixup_alpha=alpha)
