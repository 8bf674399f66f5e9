"""The RewardModel module on tiny offline models, mostly through the real CLI.

Smoke runs are one to three optimizer steps on a few rows; the one learning run (held-out
accuracy on the toy task) is 80 steps of 32 pairs, about ten seconds on two CPU cores.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path
from unittest import mock

import pytest
import torch
from cli_helpers import CONFIGS, capture_cli, read_metrics
from datasets import Dataset
from transformers import AutoModelForCausalLM

import lit_pref.cli as cli_module
from lit_pref import tasks
from lit_pref.callbacks import RewardPredictionTable
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.losses.reward import reward_loss
from lit_pref.modules.reward import RewardModel
from lit_pref.scoring import VALUE_HEAD_FILE, RewardScorer, reward_network_parts, sequence_rewards
from lit_pref.tiny import save_tiny_model

REWARD_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/mean",
    "rewards/std",
)
LORA = "--model.peft={r: 4, lora_alpha: 8, target_modules: all-linear}"


# --------------------------------------------------------------------------- helpers


def run_cli(args: list[str]):
    with capture_cli() as runs:
        cli_module.main(args)
    return runs[-1]


def fit(
    model: str | Path,
    root: Path,
    *extra: str,
    steps: int = 2,
    samples: int = 8,
    batch: int = 4,
    lr: float = 1e-2,
    val: bool = False,
):
    """``lit-pref fit`` with RewardModel; returns the LightningCLI object."""
    args = [
        "fit",
        "--model=lit_pref.modules.RewardModel",
        f"--model.model_name_or_path={model}",
        "--model.optimizer=torch.optim.AdamW",
        f"--model.optimizer.lr={lr}",
        "--model.optimizer.weight_decay=0",
        f"--data.max_train_samples={samples}",
        "--data.max_val_samples=8",
        f"--data.batch_size={batch}",
        f"--trainer.max_steps={steps}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={root}",
        f"--trainer.default_root_dir={root}",
        "--seed_everything=0",
    ]
    if not val:
        args.append("--trainer.limit_val_batches=0")
    return run_cli([*args, *extra])


def paired_batch(tokenizer_dir: Path, rows: list[dict], **kwargs) -> dict:
    dm = PreferenceDataModule(
        Dataset.from_list(rows), tokenizer_name_or_path=str(tokenizer_dir), target="paired", val_split=None,
        batch_size=len(rows), **kwargs,
    )  # fmt: skip
    dm.setup("fit")
    return next(iter(dm.sequential_dataloader("train")))


def reward_module(model_dir: Path, **kwargs) -> RewardModel:
    module = RewardModel(model_name_or_path=str(model_dir), dtype="float32", **kwargs)
    module.configure_model()
    return module.eval()


def hh_rows(n: int, seed: int = 0) -> list[dict]:
    """Anthropic HH-style rows: the prompt lives inside ``chosen``/``rejected`` as raw dialogue."""
    rng = random.Random(seed)
    rows = []
    for prompt in tasks.prompt_rows(n, seed=seed):
        mood = prompt["mood"]
        good, bad = tasks.MOODS[mood]
        history = f"\n\nHuman: {prompt['prompt']}\n\nAssistant:"
        rows.append(
            {
                "chosen": history + " " + " ".join(rng.choices(good, k=4)),
                "rejected": history + " " + " ".join(rng.choices(bad, k=4)),
            }
        )
    return rows


# -------------------------------------------------------------------- the reward read
@pytest.fixture(scope="module")
def pad_eos_lm_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("pad_eos_lm"), tasks.corpus(), pad_equals_eos=True)


@pytest.mark.parametrize("head", ["classifier", "value_head"])
@pytest.mark.parametrize("pad_eos", [False, True], ids=["pad", "pad_is_eos"])
def test_reward_is_read_at_the_last_real_token_whatever_the_padding(
    head, pad_eos, tiny_lm_dir, pad_eos_lm_dir, tmp_path
):
    """The batched pair layout (left-padded prompt + right-padded completion) gives each row the
    reward it gets alone, unpadded — with pad == EOS too, where ``ids != pad`` would be wrong."""
    model_dir = pad_eos_lm_dir if pad_eos else tiny_lm_dir
    module = reward_module(model_dir, head=head)
    rows = [*tasks.preference_rows(3, seed=4), {"prompt": "Write a sad line about the long road:", "chosen": " dark",
                                                 "rejected": " grim pain gloom dark cold cold bad"}]  # fmt: skip
    batch = paired_batch(model_dir, rows)
    assert batch["prompt_attention_mask"].eq(0).any() and batch["completion_attention_mask"].eq(0).any()
    if pad_eos:
        assert module.tokenizer.pad_token_id == module.tokenizer.eos_token_id
    parts = reward_network_parts(module.policy, module.value_head)
    with torch.no_grad():
        chosen, rejected = module.pair_rewards(batch)
        alone = []
        for j in range(2 * len(rows)):
            prompt = batch["prompt_input_ids"][j // 2][batch["prompt_attention_mask"][j // 2].bool()]
            completion = batch["completion_input_ids"][j][batch["completion_attention_mask"][j].bool()]
            ids = torch.cat([prompt, completion])[None]
            alone.append(sequence_rewards(*parts, ids, torch.ones_like(ids)))
    torch.testing.assert_close(
        torch.stack([chosen, rejected], -1).flatten(), torch.cat(alone), atol=1e-5, rtol=0
    )


def test_chosen_and_rejected_share_one_forward(tiny_lm_dir):
    module = reward_module(tiny_lm_dir)
    batch = paired_batch(tiny_lm_dir, tasks.preference_rows(4))
    calls = []
    handle = module.policy.model.register_forward_hook(lambda mod, args, kwargs_out: calls.append(1))
    with torch.no_grad():
        chosen, rejected = module.pair_rewards(batch)
    handle.remove()
    assert len(calls) == 1 and chosen.shape == rejected.shape == (4,)


def test_margin_column_and_centering_reach_the_loss(tiny_lm_dir):
    rows = [dict(r, margin=m) for r, m in zip(tasks.preference_rows(4), [0.0, 1.0, 2.0, 0.5], strict=True)]
    batch = paired_batch(tiny_lm_dir, rows)
    assert batch["margin"].tolist() == [0.0, 1.0, 2.0, 0.5]
    module = reward_module(tiny_lm_dir, center_rewards_coefficient=0.1)
    with torch.no_grad():
        _, metrics = module.shared_step(batch)
        chosen, rejected = module.pair_rewards(batch)
    expected = reward_loss(chosen, rejected, batch["margin"], 0.1).losses
    torch.testing.assert_close(metrics["loss"], expected)
    assert not torch.allclose(expected, reward_loss(chosen, rejected).losses)
    std = torch.cat([chosen, rejected]).std(unbiased=False)
    module.val_metrics.update(metrics)
    values = module.val_metrics.compute()
    assert abs(float(values["val/rewards/std"]) - float(std)) < 1e-5
    assert abs(float(values["val/rewards/mean"]) - float(torch.cat([chosen, rejected]).mean())) < 1e-5


def test_invalid_settings_are_rejected(tiny_lm_dir):
    with pytest.raises(ValueError, match="head"):
        RewardModel(model_name_or_path=str(tiny_lm_dir), head="linear")
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        RewardModel(model_name_or_path=str(tiny_lm_dir), center_rewards_coefficient=-0.1)
    with pytest.raises(ValueError, match="SEQ_CLS"):
        RewardModel(model_name_or_path=str(tiny_lm_dir), peft={"r": 4, "task_type": "CAUSAL_LM"})


# ------------------------------------------------------------------------------- CLI
def test_cli_classifier_trains_logs_and_saves(tiny_lm_dir, tmp_path):
    output = tmp_path / "rm"
    cli = fit(
        tiny_lm_dir, tmp_path, f"--model.output_dir={output}", "--trainer.callbacks+=RewardPredictionTable",
        "--trainer.callbacks.num_rows=3", "--trainer.val_check_interval=2", val=True,
    )  # fmt: skip
    module = cli.model
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_lm_dir).named_parameters())
    for name, param in module.policy.model.named_parameters():
        assert not torch.equal(param.detach(), start[f"model.{name}"]), name
    rows = read_metrics(cli)
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/loss" in r]
    assert len(train) == 2 and len(val) == 1
    for name in REWARD_METRICS:
        assert math.isfinite(train[-1][f"train/{name}"]) and math.isfinite(val[-1][f"val/{name}"])
    assert 0 <= val[-1]["val/rewards/accuracies"] <= 1 and val[-1]["val/rewards/std"] > 0
    # The prediction table: three pairs as CSV in the run directory.
    with (Path(cli.trainer.log_dir) / "reward_predictions.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {r["step"] for r in table} == {"2"}
    assert table[0]["prompt"].startswith("Write a") and table[0]["correct"] in ("True", "False")
    # Saved as a one-output classifier that scores like the trained module.
    scorer = RewardScorer.from_pretrained(output)
    batch = paired_batch(tiny_lm_dir, tasks.preference_rows(2, seed=9))
    with torch.no_grad():
        chosen, _ = module.eval().pair_rewards(batch)
    texts = tasks.preference_rows(2, seed=9)
    torch.testing.assert_close(
        torch.tensor(scorer.score([r["prompt"] for r in texts], [r["chosen"] for r in texts])),
        chosen,
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize(
    ("head", "merge"),
    [("classifier", True), ("classifier", False), ("value_head", False)],
    ids=["classifier-merged", "classifier-adapter", "value_head-adapter"],
)
def test_cli_lora_trains_adapter_and_head(tiny_lm_dir, tmp_path, head, merge):
    output = tmp_path / "rm"
    cli = fit(
        tiny_lm_dir,
        tmp_path,
        LORA,
        f"--model.head={head}",
        f"--model.output_dir={output}",
        f"--model.merge_lora={merge}",
    )
    policy = cli.model.policy
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    if head == "classifier":
        # SEQ_CLS: the score layer is trained in full next to the adapter (modules_to_save).
        assert policy.peft_config["default"].task_type == "SEQ_CLS"
        assert any("score.modules_to_save" in n for n in trainable)
        assert all("lora_" in n or "score.modules_to_save" in n for n in trainable)
    else:
        assert all("lora_" in n for n in trainable) and cli.model.value_head.weight.requires_grad
        assert (output / VALUE_HEAD_FILE).is_file()
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_lm_dir).named_parameters())
    base = policy.get_base_model()
    assert torch.equal(
        base.model.layers[0].mlp.up_proj.base_layer.weight, start["model.layers.0.mlp.up_proj.weight"]
    )
    assert base.model.layers[0].mlp.up_proj.lora_B["default"].weight.abs().sum() > 0
    assert (output / ("config.json" if merge else "adapter_config.json")).is_file()
    scorer = RewardScorer.from_pretrained(output)
    rows = tasks.preference_rows(3, seed=9)
    batch = paired_batch(tiny_lm_dir, rows)
    with torch.no_grad():
        chosen, rejected = cli.model.eval().pair_rewards(batch)
    scored = scorer.score(
        [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    )
    torch.testing.assert_close(torch.tensor(scored), torch.cat([chosen, rejected]), atol=1e-5, rtol=0)


def test_cli_value_head_saves_value_head_next_to_the_model(tiny_lm_dir, tmp_path):
    output = tmp_path / "rm"
    cli = fit(tiny_lm_dir, tmp_path, "--model.head=value_head", f"--model.output_dir={output}")
    module = cli.model
    assert (output / VALUE_HEAD_FILE).is_file() and (output / "config.json").is_file()
    assert module.value_head.weight.requires_grad
    assert not torch.equal(
        module.policy.model.layers[0].self_attn.q_proj.weight,
        dict(AutoModelForCausalLM.from_pretrained(tiny_lm_dir).named_parameters())[
            "model.layers.0.self_attn.q_proj.weight"
        ],
    )
    scorer = RewardScorer.from_pretrained(output)
    assert scorer.value_head is not None
    torch.testing.assert_close(scorer.value_head.weight, module.value_head.weight.detach())
    # Continuing from the saved directory picks the trained value head up again.
    again = reward_module(output, head="value_head")
    torch.testing.assert_close(again.value_head.weight, module.value_head.weight.detach())


def test_hh_raw_format_trains_without_reformatting(tiny_lm_dir, tmp_path):
    data = tmp_path / "hh.jsonl"
    Dataset.from_list(hh_rows(32)).to_json(data)
    cli = fit(
        tiny_lm_dir, tmp_path, f"--data.dataset={data}", "--data.val_split=null", samples=32, batch=8, steps=3
    )
    batch = next(iter(cli.datamodule.sequential_dataloader("train")))
    decode = cli.model.tokenizer.decode
    prompt = decode(
        batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0].bool()], skip_special_tokens=True
    )
    chosen = decode(
        batch["completion_input_ids"][0][batch["completion_attention_mask"][0].bool()],
        skip_special_tokens=True,
    )
    assert prompt.startswith("\n\nHuman: Write a") and prompt.endswith("\n\nAssistant:")
    assert "Human" not in chosen and len(chosen.split()) == 4
    assert all(math.isfinite(r["train/loss"]) for r in read_metrics(cli) if "train/loss" in r)


def test_reward_model_learns_the_toy_task(tiny_lm_dir, tmp_path):
    """80 steps of 32 pairs: held-out pairwise accuracy (64 pairs, scored from the saved model)
    far above chance. Measured 0.92 with this seed (0.97 / 0.98 with seeds 1 / 2, 0.81 after 40
    steps, 1.0 with the value head); the untrained model scores 0.58."""
    output = tmp_path / "rm"
    cli = fit(
        tiny_lm_dir, tmp_path, "--data.dataset=lit_pref.tasks:mood_preferences", f"--model.output_dir={output}",
        "--data.max_val_samples=64", samples=512, batch=32, steps=80, lr=5e-4,
    )  # fmt: skip
    assert cli.trainer.global_step == 80
    held_out = tasks.mood_preferences()["test"]
    scorer = RewardScorer.from_pretrained(output, batch_size=64)
    chosen = scorer.score(held_out["prompt"], held_out["chosen"])
    rejected = scorer.score(held_out["prompt"], held_out["rejected"])
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    assert accuracy >= 0.8, accuracy


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["reward.yaml", "reward_lora.yaml"])
def test_shipped_reward_configs_run(name, tiny_lm_dir, tmp_path):
    cli = run_cli([
        "fit", f"--config={CONFIGS / name}", f"--model.model_name_or_path={tiny_lm_dir}",
        f"--model.output_dir={tmp_path / 'out'}", "--trainer.max_steps=1", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0", "--data.max_train_samples=4",
        "--data.batch_size=4",
    ])  # fmt: skip
    assert isinstance(cli.model, RewardModel)
    assert (tmp_path / "out" / "config.json").is_file()


# -------------------------------------------------------------------------- callback
class TableLogger:
    """A logger stand-in with the W&B-style ``log_table``."""

    def __init__(self) -> None:
        self.tables: list = []

    def log_table(self, key, columns=None, data=None, step=None):
        self.tables.append((key, columns, data, step))


class TextLogger:
    """A logger stand-in like TensorBoard's: an ``experiment`` with ``add_text``."""

    def __init__(self) -> None:
        self.experiment = mock.Mock()


def test_prediction_table_goes_to_table_and_text_loggers_and_csv(tiny_lm_dir, tmp_path):
    module = reward_module(tiny_lm_dir)
    batch = paired_batch(tiny_lm_dir, tasks.preference_rows(5, seed=2))
    table_logger, text_logger = TableLogger(), TextLogger()
    trainer = mock.Mock(
        sanity_checking=False, log_dir=str(tmp_path), default_root_dir=str(tmp_path), global_step=7, current_epoch=0,
        loggers=[table_logger, text_logger],
    )  # fmt: skip
    callback = RewardPredictionTable(num_rows=4, max_chars=20)
    callback.on_validation_epoch_start(trainer, module)
    with torch.no_grad():
        outputs = module.validation_step(batch, 0)
    callback.on_validation_batch_end(trainer, module, outputs, batch, 0)
    callback.on_validation_batch_end(trainer, module, None, batch, 1)  # already full: ignored
    callback.on_validation_epoch_end(trainer, module)
    key, columns, data, step = table_logger.tables[0]
    assert key == "val/reward_predictions" and step == 7 and len(data) == 4
    assert columns[:3] == ["step", "epoch", "prompt"] and all(len(row[2]) <= 20 for row in data)
    chosen = outputs["chosen_rewards"][:4].tolist()
    assert [row[columns.index("chosen_reward")] for row in data] == [round(c, 4) for c in chosen]
    text_logger.experiment.add_text.assert_called_once()
    assert "| step | epoch | prompt |" in text_logger.experiment.add_text.call_args.args[1]
    with (tmp_path / "reward_predictions.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    # Without a validation_step output it scores the batch itself.
    callback.on_validation_epoch_start(trainer, module)
    callback.on_validation_batch_end(trainer, module, None, batch, 0)
    assert [row["chosen_reward"] for row in callback.rows] == [round(c, 4) for c in chosen]
