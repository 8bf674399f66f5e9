"""Shared pieces of the PPO and GRPO module tests: trainers, data, a mood-aware SFT start."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch

from lit_pref import tasks
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.data.tokenize import encode_prompt
from lit_pref.engines import GenerateEngine, GenerationSettings
from lit_pref.modules import SFT
from lit_pref.ops import completion_logps
from lit_pref.rollout import generate_rollout


def length_reward(prompts, completions, **_):
    """A reward the random tiny model's completions already vary in (they use no mood words)."""
    return [len(c) / 10 for c in completions]


def make_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**(defaults | kwargs))


def prompts_data(batch_size: int = 4) -> PreferenceDataModule:
    return PreferenceDataModule("lit_pref.tasks:mood_prompts", batch_size=batch_size, max_val_samples=8)


def mood_sft_model(base_dir: Path, cache: Path, steps: int = 100) -> Path:
    """A tiny model briefly SFT-trained on the task's well-scored demonstrations (cached per session).

    The randomly initialised model ignores the requested mood, and the task's raw supervised rows
    are only mildly mood-aligned, so SFT on them teaches no mood conditioning in a short run; RL
    then has no mood-dependent behaviour to reinforce. SFT on the rows that score > 0.3 does.
    """
    if (cache / "config.json").is_file():
        return cache
    L.seed_everything(0)
    data = tasks.mood_sft(n=1024).filter(lambda row: tasks.score(row["prompt"], row["completion"]) > 0.3)
    module = SFT(
        model_name_or_path=str(base_dir), optimizer=partial(torch.optim.AdamW, lr=3e-3), output_dir=str(cache)
    )
    make_trainer(cache.parent, max_steps=steps).fit(
        module, PreferenceDataModule(data, batch_size=16, val_split=None)
    )
    return cache


def held_out_prompts(tokenizer) -> dict:
    """The task's 32 held-out prompts as a left-padded prompt batch."""
    prompts = [row["prompt"] for row in tasks.mood_prompts()["test"]]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    return {
        "prompt_input_ids": torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded]),
        "prompt_attention_mask": torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded]),
        "prompt": prompts,
    }


@torch.no_grad()
def sampled_kl(policy, start, rollout) -> float:
    """k1 estimate of KL(π ‖ π_start) per completion: the mean of log π(y|x) − log π_start(y|x)
    over ``rollout``'s completions (sampled from π)."""
    batch = rollout.batch()
    return float((completion_logps(policy, **batch).sum - completion_logps(start, **batch).sum).mean())


@torch.no_grad()
def mean_reward(policy, tokenizer, num_generations: int = 4, seed: int = 1234) -> float:
    """Mean task reward of sampled completions on the 32 held-out prompts (fixed sampling seed)."""
    batch = held_out_prompts(tokenizer)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    rollout = generate_rollout(
        GenerateEngine(), policy, batch, GenerationSettings(max_new_tokens=10), tokenizer, num_generations
    )
    torch.random.set_rng_state(state)
    rewards = tasks.mood_reward(rollout.completion_prompts(), rollout.completions)
    return sum(rewards) / len(rewards)


class StepsPerBatch(L.Callback):
    """Optimizer steps taken by each training batch (one rollout each)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step - self._start)
