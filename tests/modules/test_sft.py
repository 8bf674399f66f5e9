"""The SFT module on the tiny offline model: data shapes, packing, NEFTune, metrics, the CLI.

Equivalence checks run forward passes only; the CLI runs are two or three optimizer steps on a
few rows of the toy task.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cli_helpers import capture_cli, read_metrics
from datasets import Dataset
from transformers import AutoModelForCausalLM

import lit_pref.cli as cli_module
from lit_pref import tasks
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.data.packing import PackingCollator, first_fit_decreasing
from lit_pref.modules.sft import SFT, NEFTuneNoise
from lit_pref.ops import block_causal_mask

CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "good day"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "warm joy"},
]
MIXED_ROWS = [*tasks.sft_rows(10, seed=3), {"prompt": "Write a happy line about sea:", "completion": " good"}]


# --------------------------------------------------------------------------- helpers


def fit(model: str | Path, root: Path, *extra: str, steps: int = 2, samples: int = 8, batch: int = 4):
    args = [
        "fit",
        "--model=lit_pref.modules.SFT",
        f"--model.model_name_or_path={model}",
        "--model.optimizer=torch.optim.AdamW",
        "--model.optimizer.lr=1e-2",
        "--model.optimizer.weight_decay=0",
        "--data.dataset=lit_pref.tasks:mood_sft",
        f"--data.max_train_samples={samples}",
        "--data.max_val_samples=4",
        f"--data.batch_size={batch}",
        "--data.max_length=64",
        f"--trainer.max_steps={steps}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={root}",
        f"--trainer.default_root_dir={root}",
        "--seed_everything=0",
    ]
    return run_cli([*args, *extra])


def run_cli(args: list[str]):
    with capture_cli() as runs:
        cli_module.main(args)
    return runs[-1]


def sft_module(model_dir: Path, **kwargs) -> SFT:
    module = SFT(model_name_or_path=str(model_dir), dtype="float32", **kwargs)
    module.configure_model()
    return module.eval()


def batch_of(module: SFT, rows: list[dict], packing: bool, max_length: int = 64, **kwargs) -> dict:
    dm = PreferenceDataModule(
        Dataset.from_list(rows), target="sft", batch_size=len(rows), val_split=None, packing=packing,
        max_length=max_length, **kwargs,
    )  # fmt: skip
    dm._tokenizer = module.tokenizer
    dm.setup("fit")
    return next(iter(dm.sequential_dataloader("train")))


# ------------------------------------------------------------------------ data shapes
@pytest.mark.parametrize(
    ("rows", "only_completion_tokens"),
    [
        pytest.param([{"text": "the day is warm and good"}] * 2, 10, id="text"),  # 9 tokens + EOS
        pytest.param(tasks.sft_rows(2), 7, id="prompt_completion"),
        pytest.param(tasks.sft_rows(2, conversational=True), None, id="conversational"),
        pytest.param([{"messages": CONVERSATION}] * 2, None, id="messages"),
        pytest.param(tasks.preference_rows(2), 7, id="paired_chosen_side"),
    ],
)
def test_every_sft_shape_trains_on_completion_tokens_unless_told_otherwise(
    tiny_lm_dir, rows, only_completion_tokens
):
    module = sft_module(tiny_lm_dir)
    decode = module.tokenizer.decode
    batch = batch_of(module, rows, packing=False)
    whole = batch_of(module, rows, packing=False, completion_only_loss=False)
    counted = batch["completion_mask"][0].bool()
    trained_text = decode(batch["completion_input_ids"][0][counted])
    if only_completion_tokens is not None:
        assert int(counted.sum()) == only_completion_tokens
    if "messages" in rows[0]:
        # Assistant turns only: both answers, neither user turn.
        assert "good day" in trained_text and "warm joy" in trained_text and "more" not in trained_text
    if "chosen" in rows[0]:
        assert trained_text.startswith(rows[0]["chosen"])
    # completion_only_loss: false trains on every token after the first.
    assert batch["prompt_input_ids"].shape[1] >= 1 and whole["prompt_input_ids"].shape[1] == 1
    full_length = batch["prompt_attention_mask"][0].sum() + batch["completion_attention_mask"][0].sum()
    assert int(whole["completion_mask"][0].sum()) == int(full_length) - 1
    with torch.no_grad():
        loss, metrics = module.shared_step(batch)
    assert math.isfinite(float(loss)) and metrics["loss"].numel() == int(batch["completion_mask"].sum())


# ---------------------------------------------------------------------------- packing
def test_first_fit_decreasing():
    bins = first_fit_decreasing([5, 3, 7, 2, 4], capacity=10)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 7, 2, 4][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 21 tokens need at least three rows of 10
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([11], capacity=10)


def test_packing_collator_layout():
    rows = [
        {"prompt_input_ids": [1, 2], "completion_input_ids": [3, 4], "completion_mask": [1, 1], "index": 0},
        {
            "prompt_input_ids": [5],
            "completion_input_ids": [6, 7, 8],
            "completion_mask": [0, 1, 1],
            "index": 1,
        },
        {
            "prompt_input_ids": [9, 10, 11],
            "completion_input_ids": [12, 13, 14, 15],
            "completion_mask": [1] * 4,
            "index": 2,
        },
    ]
    batch = PackingCollator(pad_token_id=0, max_length=8)(rows)
    # 4 + 4 + 7 tokens in rows of 8: the 7-token example alone, the two 4-token ones together.
    assert batch["packed_input_ids"].tolist() == [[9, 10, 11, 12, 13, 14, 15, 0], [1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["packed_sequence_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 0, -1], [0, 0, 0, 0, 1, 1, 1, 1]]
    assert batch["packed_branch_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 1, 1, 0, 1, 1, 1]]
    # Flat packed positions (row · 8 + column) predicting each completion token, in row order:
    # the first from the prompt's last token, each next one from the token before it.
    assert batch["packed_source"].tolist() == [[9, 10, 0, 0], [12, 13, 14, 0], [2, 3, 4, 5]]
    # The padded columns the losses read stay, in the rows' order.
    assert batch["completion_mask"].tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["index"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="max_length"):
        PackingCollator(pad_token_id=0, max_length=0)


def test_block_causal_mask():
    ids = torch.tensor([[0, 0, 1, 1, -1]])
    allowed = block_causal_mask(ids)[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    additive = block_causal_mask(ids, torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected) and additive.min() == torch.finfo(torch.float32).min
    # A prompt (branch 0) with two completions: each completion sees the prompt and itself only.
    tree = block_causal_mask(torch.tensor([[0, 0, 0, 0, 0]]), branch_ids=torch.tensor([[0, 1, 1, 2, 2]]))[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(tree, expected)


@pytest.mark.parametrize(
    ("attn", "mode"),
    [("sdpa", "spans"), ("sdpa", "mask"), ("sdpa", "position_ids"), ("eager", "mask"), ("eager", "position_ids")],
)
def test_packed_loss_equals_unpacked_loss(tiny_lm_dir, attn, mode):
    module = sft_module(tiny_lm_dir, attn_implementation=attn, packed_attention=mode)
    unpacked, packed = batch_of(module, MIXED_ROWS, packing=False), batch_of(module, MIXED_ROWS, packing=True)
    assert packed["packed_input_ids"].shape[0] < len(MIXED_ROWS)  # several examples share a row
    assert int(packed["packed_sequence_ids"].ge(0).sum()) < packed["prompt_input_ids"].numel() + packed["completion_input_ids"].numel()
    with torch.no_grad():
        loss_unpacked, m_unpacked = module.shared_step(unpacked)
        loss_packed, m_packed = module.shared_step(packed)
    assert abs(float(loss_packed) - float(loss_unpacked)) < 1e-5
    assert m_packed["loss"].numel() == int(unpacked["completion_mask"].sum())
    torch.testing.assert_close(m_packed["loss"], m_unpacked["loss"], rtol=0, atol=1e-5)
    assert float(m_packed["token_accuracy"].mean()) == float(m_unpacked["token_accuracy"].mean())


@pytest.mark.parametrize("mode", ["spans", "mask"])
def test_packed_rows_taken_as_one_example_would_differ(tiny_lm_dir, mode):
    """The equivalence above can fail: letting packed examples see each other changes the loss."""
    module = sft_module(tiny_lm_dir, packed_attention=mode)
    packed = batch_of(module, MIXED_ROWS, packing=True)
    with torch.no_grad():
        loss_packed, _ = module.shared_step(packed)
        one_prompt = torch.where(packed["packed_sequence_ids"] >= 0, 0, -1)
        leaky = dict(packed, packed_sequence_ids=one_prompt, packed_branch_ids=one_prompt)
        leaky_loss, _ = module.shared_step(leaky)
    assert abs(float(leaky_loss) - float(loss_packed)) > 1e-4


def test_packing_needs_max_length_and_completions(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        PreferenceDataModule(packing=True, max_length=None)
    dm = PreferenceDataModule(
        Dataset.from_list(tasks.preference_rows(2)), target="prompt_only", packing=True, val_split=None
    )
    dm._tokenizer = tokenizer
    dm.setup("fit")
    with pytest.raises(ValueError, match="not to prompt-only data"):
        dm.train_dataloader()


# ----------------------------------------------------------------- accuracy, NEFTune
def test_token_accuracy_matches_full_logits(tiny_lm_dir):
    module = sft_module(tiny_lm_dir)
    batch = batch_of(module, MIXED_ROWS[:4], packing=False)
    with torch.no_grad():
        _, metrics = module.shared_step(batch)
        ids = torch.cat([batch["prompt_input_ids"], batch["completion_input_ids"]], 1)
        mask = torch.cat([batch["prompt_attention_mask"], batch["completion_attention_mask"]], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = module.policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        prompt_len = batch["prompt_input_ids"].shape[1]
        predicted = logits[:, prompt_len - 1 : -1].argmax(-1)
    counted = batch["completion_mask"].bool()
    expected = (predicted[counted] == batch["completion_input_ids"][counted]).float()
    assert torch.equal(metrics["token_accuracy"], expected)
    nll = torch.nn.functional.cross_entropy(
        logits[:, prompt_len - 1 : -1][counted].float(), batch["completion_input_ids"][counted]
    )
    assert abs(float(metrics["loss"].mean()) - float(nll)) < 1e-5


def test_neftune_noise_in_training_only_and_bounded():
    hook = NEFTuneNoise(alpha=5.0)
    embedding = torch.nn.Embedding(10, 16)
    handle = embedding.register_forward_hook(hook)
    ids = torch.randint(0, 10, (3, 4))
    clean = embedding.weight[ids]
    noisy = embedding(ids)
    bound = 5.0 / math.sqrt(4 * 16)
    difference = (noisy - clean).abs()
    assert difference.max() <= bound + 1e-6 and difference.max() > bound / 2
    embedding.eval()
    assert torch.equal(embedding(ids), clean)
    handle.remove()


def test_neftune_changes_the_training_loss_only(tiny_lm_dir):
    plain, noisy = sft_module(tiny_lm_dir), sft_module(tiny_lm_dir, neftune_noise_alpha=15.0)
    batch = batch_of(plain, MIXED_ROWS[:4], packing=False)
    with torch.no_grad():
        assert float(noisy.shared_step(batch)[0]) == float(plain.shared_step(batch)[0])  # eval: no noise
        noisy.train()
        assert float(noisy.shared_step(batch)[0]) != float(plain.shared_step(batch)[0])
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        SFT(model_name_or_path=str(tiny_lm_dir), neftune_noise_alpha=-1.0)


# ------------------------------------------------------------------------------- CLI
def test_cli_sft_with_packing_and_neftune(tiny_lm_dir, tmp_path):
    output = tmp_path / "model"
    cli = fit(
        tiny_lm_dir, tmp_path, "--data.packing=true", "--model.neftune_noise_alpha=5",
        f"--model.output_dir={output}", steps=3,
    )  # fmt: skip
    module = cli.model
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_lm_dir).named_parameters())
    moved = {n for n, p in module.policy.named_parameters() if not torch.equal(p.detach(), start[n].detach())}
    assert moved >= {n for n in start if "embed_tokens" not in n}  # (unused token embeddings stay)
    rows = [r for r in read_metrics(cli) if "train/loss" in r]
    assert len(rows) == 3
    for row in rows:
        assert math.isfinite(row["train/loss"]) and 0 <= row["train/token_accuracy"] <= 1
    seen = [row["train/tokens_seen"] for row in rows]
    assert seen == sorted(seen) and seen[0] > 0  # cumulative
    # 3 steps × 4 examples of 7 completion tokens each (six words + EOS).
    assert seen[-1] == 3 * 4 * 7
    saved = AutoModelForCausalLM.from_pretrained(output)
    for name, param in saved.named_parameters():
        torch.testing.assert_close(param, dict(module.policy.named_parameters())[name].detach())


def test_cli_sft_with_lora_trains_the_adapter_only(tiny_lm_dir, tmp_path):
    cli = fit(
        tiny_lm_dir, tmp_path, "--model.peft={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}",
        f"--model.output_dir={tmp_path / 'merged'}",
    )  # fmt: skip
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_lm_dir).named_parameters())
    for name, param in cli.model.policy.named_parameters():
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_B" in name:
            assert param.abs().sum() > 0, name  # lora_B starts at zero: it moved
        elif "lora_" not in name:
            assert torch.equal(param.detach(), start[base_name].detach()), name
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").named_parameters())
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"]
    )


def test_shipped_sft_config_runs(tiny_lm_dir, tmp_path):
    config = Path(__file__).resolve().parents[2] / "configs" / "sft.yaml"
    cli = run_cli([
        "fit", f"--config={config}", f"--model.model_name_or_path={tiny_lm_dir}",
        f"--model.output_dir={tmp_path / 'out'}", "--trainer.max_steps=1", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", "--data.max_train_samples=4", "--data.batch_size=4",
        "--trainer.limit_val_batches=0",
    ])  # fmt: skip
    assert isinstance(cli.model, SFT) and (tmp_path / "out" / "config.json").is_file()
