"""QLoRA: the policy's base loaded in 4 or 8 bits by bitsandbytes (its CPU backend here), a LoRA
adapter trained on top; the base stays frozen and quantized, the reference is the adapter-disabled
base (one quantized copy), and the export merges into a full-precision copy of the base."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_helpers import run_config
from lightning.pytorch.callbacks import ModelCheckpoint
from rl_helpers import length_reward
from transformers import AutoModelForCausalLM

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.models import is_quantized, quantized_layers
from lit_pref.modules import DPO, GRPO, KTO, SFT, RewardModel

bnb = pytest.importorskip("bitsandbytes")

NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
ADAMW = partial(torch.optim.AdamW, lr=1e-2)

MODULES = {
    "dpo": (DPO, {}, "lit_pref.tasks:mood_preferences"),
    "kto": (KTO, {}, "lit_pref.tasks:mood_preferences"),
    "sft": (SFT, {}, "lit_pref.tasks:mood_sft"),
    "grpo": (GRPO, {"rewards": length_reward, "num_generations": 2, "max_new_tokens": 4}, "lit_pref.tasks:mood_prompts"),
}


@pytest.fixture(autouse=True)
def quiet_bitsandbytes():
    # Without the optional `kernels` package the CPU backend says once that it takes a slower path;
    # 8-bit matmuls say on every call that fp32 inputs are cast to fp16.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
        yield


def quantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The packed weights of every bitsandbytes layer, copied."""
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def fit(module, dataset: str, root: Path, steps: int = 2, ckpt_path: str | None = None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, PreferenceDataModule(dataset, batch_size=2, max_train_samples=4, val_split=None), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_trains_the_adapter_and_leaves_the_4bit_base_frozen(name, tiny_lm_dir, tmp_path):
    module_cls, kwargs, dataset = MODULES[name]
    module = module_cls(model_name_or_path=str(tiny_lm_dir), peft=LORA, quantization=NF4, optimizer=ADAMW, **kwargs)
    module.configure_model()
    policy = module.policy
    assert is_quantized(policy)
    base_before, adapter_before = quantized_weights(policy), adapter_weights(policy)
    # Every linear layer of the decoder is quantized (the LM head stays in full precision).
    assert len(base_before) == 7 * policy.config.num_hidden_layers
    assert all(w.dtype == torch.uint8 for w in base_before.values())
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    if name in ("dpo", "kto", "grpo"):
        assert module.reference.kind == "adapter_disabled"

    fit(module, dataset, tmp_path)

    base_after, adapter_after = quantized_weights(policy), adapter_weights(policy)
    assert base_after.keys() == base_before.keys()
    for key, before in base_before.items():
        assert base_after[key].dtype == torch.uint8
        assert torch.equal(base_after[key], before), f"the quantized base moved: {key}"
    moved = [k for k in adapter_before if not torch.equal(adapter_before[k], adapter_after[k])]
    assert len(moved) >= len(adapter_before) // 2, f"only {len(moved)} of {len(adapter_before)} adapter tensors moved"


def test_8bit_policy_trains(tiny_lm_dir, tmp_path):
    module = SFT(model_name_or_path=str(tiny_lm_dir), peft=LORA, quantization={"load_in_8bit": True}, optimizer=ADAMW)
    module.configure_model()
    layers = [m for m in module.policy.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert layers and all(layer.weight.dtype == torch.int8 for layer in layers)
    before = adapter_weights(module.policy)
    fit(module, "lit_pref.tasks:mood_sft", tmp_path)
    after = adapter_weights(module.policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_export_merges_into_a_full_precision_base(tiny_lm_dir, tmp_path):
    module = SFT(
        model_name_or_path=str(tiny_lm_dir), peft=LORA, quantization=NF4, optimizer=ADAMW, output_dir=str(tmp_path / "out")
    )
    fit(module, "lit_pref.tasks:mood_sft", tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert not is_quantized(exported)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in exported.modules())
    # Each merged weight is the full-precision base weight plus the trained adapter's B·A·scale.
    lora = module.policy.base_model.model.model.layers[0].self_attn.q_proj
    delta = (lora.lora_B["default"].weight @ lora.lora_A["default"].weight) * lora.scaling["default"]
    assert delta.abs().max() > 1e-4  # the adapter did move
    merged = exported.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged, base.model.layers[0].self_attn.q_proj.weight + delta, rtol=0, atol=1e-6)


def test_export_without_merge_saves_the_adapter_alone(tiny_lm_dir, tmp_path):
    module = SFT(
        model_name_or_path=str(tiny_lm_dir),
        peft=LORA,
        quantization=NF4,
        optimizer=ADAMW,
        output_dir=str(tmp_path / "out"),
        merge_lora=False,
    )
    fit(module, "lit_pref.tasks:mood_sft", tmp_path)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert "model.safetensors" not in files


@pytest.mark.parametrize("quantization", [NF4, {"load_in_8bit": True}], ids=["4bit", "8bit"])
def test_resume_restores_the_adapter_on_the_quantized_base(quantization, tiny_lm_dir, tmp_path):
    def module():
        return DPO(model_name_or_path=str(tiny_lm_dir), peft=LORA, quantization=quantization, optimizer=ADAMW)

    L.seed_everything(0)
    straight = module()
    fit(straight, "lit_pref.tasks:mood_preferences", tmp_path / "a", steps=2)
    L.seed_everything(0)
    first = module()
    fit(first, "lit_pref.tasks:mood_preferences", tmp_path / "b", steps=1)
    L.seed_everything(0)
    resumed = module()
    fit(resumed, "lit_pref.tasks:mood_preferences", tmp_path / "b", steps=2, ckpt_path=str(tmp_path / "b" / "ckpt" / "epoch=0-step=1.ckpt"))
    saved = torch.load(tmp_path / "b" / "ckpt" / "epoch=0-step=1.ckpt", weights_only=False)["state_dict"]
    base_keys = [f"{name}.weight" for name in quantized_layers(resumed)]
    assert base_keys and not any(key.startswith(tuple(base_keys)) for key in saved), "the checkpoint holds the base"
    assert any("lora_" in key for key in saved)
    expected, got = adapter_weights(straight.policy), adapter_weights(resumed.policy)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    assert quantized_weights(resumed.policy).keys() == quantized_weights(straight.policy).keys()


def test_bad_settings_are_refused_before_loading(tiny_lm_dir):
    with pytest.raises(ValueError, match="set peft"):
        DPO(model_name_or_path=str(tiny_lm_dir), quantization=NF4)
    with pytest.raises(ValueError, match="exactly one of load_in_4bit"):
        DPO(model_name_or_path=str(tiny_lm_dir), peft=LORA, quantization={"bnb_4bit_quant_type": "nf4"}).configure_model()
    with pytest.raises(ValueError, match="unknown BitsAndBytesConfig field"):
        DPO(model_name_or_path=str(tiny_lm_dir), peft=LORA, quantization={"load_in_4bit": True, "bits": 4}).configure_model()
    with pytest.raises(ValueError, match="not for reward models"):
        RewardModel(model_name_or_path=str(tiny_lm_dir), peft=LORA, quantization=NF4)


def test_the_shipped_qlora_config_trains_through_the_cli(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli, rows = run_config(
        "fit",
        "dpo_qlora.yaml",
        f"--model.model_name_or_path={tiny_lm_dir}",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--data.batch_size=2",
        "--data.max_val_samples=2",
    )
    assert is_quantized(cli.model.policy)
    assert [row["step"] for row in rows if "train/loss" in row] == [0, 1, 2]
    assert (tmp_path / "outputs" / "dpo_qlora" / "model" / "model.safetensors").is_file()
