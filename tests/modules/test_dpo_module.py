"""The DPO module on tiny offline models, mostly through the real CLI (``lit_pref.cli.main``).

Every run is one to four optimizer steps on 4-8 rows of the toy task, so the whole file takes
well under a minute on two CPU cores. Expensive setups (the precomputed-reference runs, the
resume runs) are module-scoped fixtures shared by several assertions.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from cli_helpers import CONFIGS, capture_cli, read_metrics
from transformers import AutoModelForCausalLM, AutoTokenizer

import lit_pref.cli as cli_module
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.losses.dpo import DPO_LOSS_TYPES
from lit_pref.modules.dpo import DPO
from lit_pref.modules.reference import OfflineReferenceModule
from lit_pref.ops import completion_logps

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


# --------------------------------------------------------------------------- helpers


def fit(
    model: str | Path,
    root: Path,
    *extra: str,
    steps: int = 1,
    batch: int = 4,
    samples: int = 4,
    val: bool = False,
    csv_log: bool = False,
):
    """``lit-pref fit`` with DPO on the toy task; returns the LightningCLI object."""
    args = [
        "fit",
        "--model=lit_pref.modules.DPO",
        f"--model.model_name_or_path={model}",
        f"--data.max_train_samples={samples}",
        "--data.max_val_samples=4",
        f"--data.batch_size={batch}",
        f"--trainer.max_steps={steps}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={root}",
        "--seed_everything=0",
    ]
    if not val:
        args.append("--trainer.limit_val_batches=0")
    if csv_log:
        args += ["--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root}"]
    else:
        args.append("--trainer.logger=false")
    if not any(a.startswith("--trainer.callbacks") for a in extra):
        args.append("--trainer.enable_checkpointing=false")
    with capture_cli() as runs:
        cli_module.main([*args, *extra])
    return runs[-1]


def train_rows(rows: list[dict[str, float]]) -> dict[int, dict[str, float]]:
    return {int(r["step"]): r for r in rows if "train/loss" in r}


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def datamodule(model_dir: Path, samples: int = 8, val: int = 4, batch: int = 4) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        tokenizer_name_or_path=str(model_dir), target="paired", max_train_samples=samples, max_val_samples=val,
        batch_size=batch,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def first_batch(dm: PreferenceDataModule) -> dict:
    return next(iter(dm.sequential_dataloader("train")))


def batch_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return completion_logps(
            model.eval(),
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            batch["completion_input_ids"],
            batch["completion_attention_mask"],
            batch.get("completion_mask"),
        ).token_logps


@pytest.fixture(scope="module")
def initial(tiny_lm_dir) -> dict[str, torch.Tensor]:
    return state(AutoModelForCausalLM.from_pretrained(tiny_lm_dir))


@pytest.fixture(scope="module")
def dm(tiny_lm_dir) -> PreferenceDataModule:
    return datamodule(tiny_lm_dir)


@pytest.fixture(scope="module")
def adapter_dir(tiny_lm_dir, tmp_path_factory) -> Path:
    """An "SFT" LoRA adapter (random, non-zero lora_B) on the tiny model, with its tokenizer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.3)
    model = get_peft_model(base, config)
    directory = tmp_path_factory.mktemp("sft_adapter")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(directory)
    return directory


# --------------------------------------------------------------- one step per loss
LOSS_CASES = [pytest.param([name], id=name) for name in DPO_LOSS_TYPES] + [
    pytest.param(["sigmoid", "bco_pair", "sft"], id="mpo")
]


@pytest.mark.parametrize("loss_types", LOSS_CASES)
def test_one_step_per_loss_type(loss_types, tiny_lm_dir, initial, tmp_path, monkeypatch):
    """Each loss trains through the CLI: trainable weights move, the reference does not, and the
    training step never calls ``.item()`` (no host sync in the hot path)."""
    inside = {"step": False}
    original_step, original_item = DPO.training_step, torch.Tensor.item

    def training_step(self, *args, **kwargs):
        inside["step"] = True
        try:
            return original_step(self, *args, **kwargs)
        finally:
            inside["step"] = False

    def item(self):
        assert not inside["step"], ".item() called inside training_step"
        return original_item(self)

    monkeypatch.setattr(DPO, "training_step", training_step)
    monkeypatch.setattr(torch.Tensor, "item", item)
    extra = [f"--model.loss_type={loss_types}"]
    if len(loss_types) > 1:
        extra.append("--model.loss_weights=[0.8, 0.2, 1.0]")
    cli = fit(tiny_lm_dir, tmp_path, *extra)
    module = cli.model
    assert module.reference.kind == "copy"
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    moved = [n for n, p in module.policy.named_parameters() if not torch.equal(p, initial[n])]
    assert len(moved) == len(initial)  # AdamW moves every weight with a gradient: all of them here
    for name, param in module.reference.network.named_parameters():
        assert torch.equal(param, initial[name]), name
        assert not param.requires_grad


# ------------------------------------------------------- precomputed reference values
@pytest.fixture(scope="module")
def precompute_runs(tiny_lm_dir, tmp_path_factory):
    """Three 2-step runs: reference on the fly; precomputed (fills the cache); precomputed again.

    One batch per epoch, so both steps see the same rows however each run's RNG was consumed.
    """
    root = tmp_path_factory.mktemp("precompute")
    cache = root / "cache"
    common = ["--model.optimizer=torch.optim.AdamW", "--model.optimizer.lr=1e-3"]
    kw = {"steps": 2, "samples": 4, "val": True, "csv_log": True}
    live = fit(tiny_lm_dir, root / "live", *common, **kw)
    pre = ["--model.precompute_ref_logps=true", f"--model.ref_cache_dir={cache}"]
    first = fit(tiny_lm_dir, root / "first", *common, *pre, **kw)
    calls = []
    original = OfflineReferenceModule.score_reference_table

    def spy(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    with mock.patch.object(OfflineReferenceModule, "score_reference_table", spy):
        second = fit(tiny_lm_dir, root / "second", *common, *pre, **kw)
    return {"live": live, "first": first, "second": second, "cache": cache, "recomputed": calls}


def test_metrics_logged_for_train_and_val(precompute_runs):
    rows = read_metrics(precompute_runs["live"])
    logged = set().union(*rows)
    for split in ("train", "val"):
        for name in (*METRICS, "loss"):
            assert f"{split}/{name}" in logged
    assert sorted(train_rows(rows)) == [0, 1]  # once per optimizer step


def test_precomputed_reference_equals_on_the_fly(precompute_runs):
    live, first = precompute_runs["live"], precompute_runs["first"]
    assert first.model.reference.network is None  # released once the tables exist
    # The table against the live run's reference network, row by row.
    dm = live.datamodule
    for split in ("train", "val"):
        table = first.model.ref_logp_table.tables[split][1]
        for batch in dm.sequential_dataloader(split):
            expected = live.model.reference_values(batch)
            torch.testing.assert_close(table[batch["index"]], expected, atol=1e-5, rtol=0)
    # And the whole trajectory: same losses and metrics at every step and in validation.
    live_rows, first_rows = read_metrics(live), read_metrics(first)
    assert len(live_rows) == len(first_rows)
    for a, b in zip(live_rows, first_rows, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key


def test_precomputed_reference_is_reused_from_cache(precompute_runs):
    assert len(list(precompute_runs["cache"].glob("ref_logps-*.pt"))) == 2  # train and val
    assert precompute_runs["recomputed"] == []
    second, first = precompute_runs["second"], precompute_runs["first"]
    for split in ("train", "val"):
        assert torch.equal(second.model.ref_logp_table.tables[split][1], first.model.ref_logp_table.tables[split][1])
    for a, b in zip(read_metrics(first), read_metrics(second), strict=True):
        assert b == pytest.approx(a, abs=1e-5)


def test_precomputed_reference_on_new_data_raises(precompute_runs, tiny_lm_dir):
    cli = precompute_runs["first"]
    new_data = PreferenceDataModule(tokenizer_name_or_path=str(tiny_lm_dir), max_train_samples=8, max_val_samples=6)
    with pytest.raises(RuntimeError, match="reference network was released"):
        cli.trainer.validate(cli.model, datamodule=new_data)


# --------------------------------------------------------------- equivalences
def test_gradient_accumulation_matches_full_batch(tiny_lm_dir, tmp_path):
    """2 micro-batches of 2 with accumulation ≡ one batch of 4: the same SGD update, and the
    logged metrics are means over the whole accumulation window."""
    sgd = ["--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=10.0"]
    full = fit(tiny_lm_dir, tmp_path / "full", *sgd, batch=4, samples=4)
    accumulated = fit(tiny_lm_dir, tmp_path / "acc", *sgd, "--trainer.accumulate_grad_batches=2", batch=2, samples=4)
    assert accumulated.trainer.global_step == full.trainer.global_step == 1
    before = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).state_dict()
    moved = 0.0
    for name, param in full.model.policy.named_parameters():
        other = dict(accumulated.model.policy.named_parameters())[name]
        torch.testing.assert_close(other, param, atol=1e-6, rtol=0)
        moved = max(moved, float((param.detach() - before[name]).abs().max()))
    assert moved > 1e-3  # the update is far larger than the tolerance
    for key, value in full.trainer.callback_metrics.items():
        if key.startswith("train/"):
            assert float(accumulated.trainer.callback_metrics[key]) == pytest.approx(float(value), abs=1e-5), key


def test_resume_continues_the_same_trajectory(tiny_lm_dir, tmp_path):
    """4 steps straight ≡ 2 steps, checkpoint, resume to 4 (per-step losses and final weights).

    One batch per epoch, so the checkpoint falls on an epoch boundary and every step sees the
    same rows whatever the shuffling; AdamW's state must be restored for step 3 to match.
    """
    adam = ["--model.optimizer=torch.optim.AdamW", "--model.optimizer.lr=1e-2"]
    ckpt = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        straight = fit(tiny_lm_dir, tmp_path / "straight", *adam, "--model.alarm_after_steps=2", steps=4, csv_log=True)
    # A run that learns raises no stuck-loss alarm at the checked step.
    assert not [w for w in caught if "untrained value" in str(w.message)]
    fit(tiny_lm_dir, tmp_path / "part1", *adam, *ckpt, steps=2, csv_log=True)
    resumed = fit(tiny_lm_dir, tmp_path / "part2", *adam, f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}", steps=4, csv_log=True)
    full, tail = train_rows(read_metrics(straight)), train_rows(read_metrics(resumed))
    assert sorted(full) == [0, 1, 2, 3] and sorted(tail) == [2, 3]
    assert full[3]["train/loss"] < full[0]["train/loss"] - 1e-3  # it does learn
    for step in (2, 3):
        for key in ("train/loss", "train/rewards/margins", "train/logps/chosen"):
            assert tail[step][key] == pytest.approx(full[step][key], abs=1e-5), (step, key)
    resumed_params = dict(resumed.model.policy.named_parameters())
    for name, param in straight.model.policy.named_parameters():
        torch.testing.assert_close(resumed_params[name], param, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ alarms
def test_loss_stuck_at_ln2_warns(tiny_lm_dir, tmp_path):
    sgd0 = ["--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.0", "--model.alarm_after_steps=2"]
    with pytest.warns(UserWarning, match=r"still 0\.693147"):
        fit(tiny_lm_dir, tmp_path, *sgd0, steps=2, batch=2)


# --------------------------------------------------------------- the reference
def test_adapter_directory_reference_is_the_sft_model(adapter_dir, tiny_lm_dir, dm):
    """Starting from an SFT adapter, the reference is that adapter model, not the base."""
    from peft import PeftModel

    module = DPO(model_name_or_path=str(adapter_dir))
    assert module.reference.kind == "adapter"
    module.configure_model()
    batch = first_batch(dm)
    reference = module.reference_logps(batch).token_logps
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    torch.testing.assert_close(reference, batch_logps(sft, batch), atol=1e-5, rtol=0)
    assert (reference - batch_logps(base, batch)).abs().max() > 1e-2
    # The policy starts as the same SFT model, its adapter trainable; the reference adapter is frozen.
    policy = module.logps(module.policy.eval(), batch).token_logps.detach()
    torch.testing.assert_close(policy, reference, atol=1e-5, rtol=0)
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    # Dropout of both adapters (saved as 0.3) is off: train-mode passes are deterministic.
    module.policy.train()
    assert all(m.p == 0 for n, m in module.policy.named_modules() if isinstance(m, torch.nn.Dropout))
    torch.testing.assert_close(module.reference_logps(batch).token_logps, reference, atol=0, rtol=0)


def test_precomputed_adapter_reference(adapter_dir, tmp_path):
    """Precomputed from an SFT adapter: the table holds the SFT model's values, and the reference
    adapter is dropped once it has been scored (only the trained adapter stays)."""
    cli = fit(adapter_dir, tmp_path, "--model.precompute_ref_logps=true", f"--model.ref_cache_dir={tmp_path / 'c'}")
    module = cli.model
    assert module.reference.kind == "adapter" and module.ref_logp_table.reference_released
    assert list(module.policy.peft_config) == ["default"]
    live = DPO(model_name_or_path=str(adapter_dir))
    live.configure_model()
    for batch in cli.datamodule.sequential_dataloader("train"):
        expected = live.reference_values(batch)
        torch.testing.assert_close(module.ref_logp_table.tables["train"][1][batch["index"]], expected, atol=1e-5, rtol=0)


def test_adapter_disabled_needs_a_fresh_adapter(adapter_dir, tiny_lm_dir):
    with pytest.raises(ValueError, match="use reference='adapter'"):
        DPO(model_name_or_path=str(adapter_dir), reference="adapter_disabled")
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        DPO(model_name_or_path=str(tiny_lm_dir), reference="adapter_disabled")


def test_dropout_is_disabled_in_policy_and_reference(tiny_lm_dir, dm):
    batch = first_batch(dm)

    def train_mode_passes(model):
        model.train()
        with torch.no_grad():
            return [
                completion_logps(
                    model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                    batch["completion_input_ids"], batch["completion_attention_mask"],
                ).token_logps
                for _ in range(2)
            ]  # fmt: skip

    def noisy_model():
        return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, attention_dropout=0.5)

    # Control: the model really is noisy in train mode when dropout is left on.
    kept = DPO(model_name_or_path=noisy_model(), tokenizer_name_or_path=str(tiny_lm_dir), disable_dropout=False)
    kept.configure_model()
    a, b = train_mode_passes(kept.policy)
    assert not torch.equal(a, b)

    full = DPO(model_name_or_path=noisy_model(), tokenizer_name_or_path=str(tiny_lm_dir))
    full.configure_model()
    for model in (full.policy, full.reference.network):
        a, b = train_mode_passes(model)
        assert torch.equal(a, b)

    lora = {"r": 4, "lora_dropout": 0.5, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    peft = DPO(model_name_or_path=noisy_model(), tokenizer_name_or_path=str(tiny_lm_dir), peft=lora)
    peft.configure_model()
    a, b = train_mode_passes(peft.policy)
    assert torch.equal(a, b)


def test_loading_options_and_model_objects(tiny_lm_dir):
    module = DPO(model_name_or_path=str(tiny_lm_dir), dtype="bfloat16", attn_implementation="eager")
    module.configure_model()
    for model in (module.policy, module.reference.network):
        assert next(model.parameters()).dtype == torch.bfloat16
        assert model.config._attn_implementation == "eager"
    obj = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    module = DPO(model_name_or_path=obj, tokenizer_name_or_path=str(tiny_lm_dir))
    module.configure_model()
    assert module.policy is obj and module.reference.network is not obj
    for (name, p), (_, r) in zip(module.policy.named_parameters(), module.reference.network.named_parameters(), strict=True):
        assert torch.equal(p, r) and p.data_ptr() != r.data_ptr(), name
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        DPO(model_name_or_path=obj)


def test_reference_choice_is_checked(tiny_lm_dir):
    with pytest.raises(ValueError, match="needs ref_model_name_or_path"):
        DPO(model_name_or_path=str(tiny_lm_dir), reference="model")
    with pytest.raises(ValueError, match="use reference='model'"):
        DPO(model_name_or_path=str(tiny_lm_dir), reference="copy", ref_model_name_or_path=str(tiny_lm_dir))
    with pytest.raises(ValueError, match="reference_free"):
        DPO(model_name_or_path=str(tiny_lm_dir), reference="none")
    with pytest.raises(ValueError, match="loss_type"):
        DPO(model_name_or_path=str(tiny_lm_dir), loss_type="nope")
    assert DPO(model_name_or_path=str(tiny_lm_dir), reference_free=True).reference.kind == "none"
    assert DPO(model_name_or_path=str(tiny_lm_dir), ref_model_name_or_path=str(tiny_lm_dir)).reference.kind == "model"
    assert DPO(model_name_or_path=str(tiny_lm_dir), loss_type="ipo").stuck_loss == pytest.approx(25.0)


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_lm_dir, dm):
    batch = first_batch(dm)
    results = []
    for checkpointing in (False, True):
        module = DPO(model_name_or_path=str(tiny_lm_dir), gradient_checkpointing=checkpointing)
        module.configure_model()
        assert module.policy.is_activation_checkpointing == checkpointing
        module.policy.train()
        loss, _ = module.shared_step(batch, "train")
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.policy.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------- configs


QUICK = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=1",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.max_train_samples=8",
    "--data.max_val_samples=4",
    "--data.batch_size=4",
]


@pytest.mark.parametrize("name", ["dpo.yaml", "dpo_lora.yaml"])
def test_config_parses(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-pref"])
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "lit_pref.modules.DPO" in capsys.readouterr().out


def test_dpo_config_runs_as_shipped_and_exports(in_project, dm):
    with capture_cli() as runs:
        cli_module.main(["fit", "--config", str(CONFIGS / "dpo.yaml"), *QUICK])
    module = runs[-1].model
    out = in_project / "outputs" / "dpo" / "model"
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, param in module.policy.named_parameters():
        assert torch.equal(exported[name], param), name
    assert AutoTokenizer.from_pretrained(out).get_vocab() == module.tokenizer.get_vocab()
    assert (in_project / "outputs" / "dpo" / "checkpoints" / "last.ckpt").is_file()


def test_lora_config_trains_only_the_adapter_and_exports_merged(in_project, tiny_lm_dir, initial, dm):
    lora = "--model.peft={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}"
    with capture_cli() as runs:
        cli_module.main(["fit", "--config", str(CONFIGS / "dpo_lora.yaml"), *QUICK, lora])
    module = runs[-1].model
    assert module.reference.kind == "adapter_disabled" and module.reference.network is None
    trained = 0
    for name, param in module.policy.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            trained += "lora_B" in name and bool(param.abs().max() > 0)  # B starts at 0
        else:
            base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert not param.requires_grad and torch.equal(param, initial[base_name]), name
    assert trained == 2 * 2  # q_proj and v_proj in both layers
    batch = first_batch(dm)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    reference = module.reference_logps(batch).token_logps
    torch.testing.assert_close(reference, batch_logps(base, batch), atol=1e-5, rtol=0)
    policy = batch_logps(module.policy, batch)
    assert (policy - reference).abs().max() > 1e-4  # the adapter learned something
    merged = AutoModelForCausalLM.from_pretrained(in_project / "outputs" / "dpo_lora" / "model")
    assert not any("lora" in n for n in merged.state_dict())
    torch.testing.assert_close(batch_logps(merged, batch), policy, atol=1e-5, rtol=0)
