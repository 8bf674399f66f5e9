"""Extending lit_pref from user code: the README's examples, tested by ``tests/test_extension.py``.

Nothing here is part of the package. It stands for a user's own module (``my_project.py``) that
is importable (on ``sys.path`` / ``PYTHONPATH``) and is named from YAML or the command line:

* a DPO subclass with an extra loss term: ``--model extension_example.DPOWithChosenFloor``;
* a reward function for GRPO / PPO: ``--model.rewards extension_example:mood_word_reward``;
* a Lightning callback: ``--trainer.callbacks+=extension_example.MoodProbe``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from lit_pref import DPO
from lit_pref.evaluation import generate
from lit_pref.tasks import MOODS, make_prompt, score
from lit_pref.types import PairedBatch


# --------------------------------------------------------------------------- a new loss term
class DPOWithChosenFloor(DPO):
    """DPO plus a hinge that keeps the chosen completion at least as likely as under the reference.

    ``loss = dpo + λ · max(0, log π_ref(y_w|x) − log π_θ(y_w|x))``. Plain DPO can lower the
    likelihood of both completions as long as the rejected one falls faster; the hinge (an additive
    form of the DPO-Positive penalty of Pal et al. 2024, arXiv:2402.13228, which puts it inside
    the sigmoid) charges for the chosen one falling below the reference.

    Only ``shared_step`` is overridden: the reference choice, precomputed reference log-probs,
    metrics, LoRA and export all come from :class:`~lit_pref.modules.DPO`. This example keeps to
    the plain settings (no WPO weighting, no LD-DPO).

    Args:
        floor_weight: λ, the weight of the hinge.
        **kwargs: :class:`~lit_pref.modules.DPO` arguments.
    """

    def __init__(self, floor_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if floor_weight < 0:
            raise ValueError(f"floor_weight must be >= 0, got {floor_weight}")
        if self.reference.kind == "none":
            raise ValueError(
                "DPOWithChosenFloor compares with the reference; reference_free is not available"
            )
        self.floor_weight = floor_weight

    def shared_step(self, batch: PairedBatch, split: str) -> tuple[Tensor, dict[str, Tensor]]:
        step = self.dpo_step(batch, split)  # policy and reference log-probs, the DPO loss, its metrics
        assert step.ref_chosen is not None
        floor = (step.ref_chosen.detach() - step.chosen_logps).clamp(min=0)
        losses = step.losses + self.floor_weight * floor
        metrics = step.metrics | {"loss": losses, "dpo_loss": step.losses.detach(), "chosen_floor": floor.detach()}
        return losses.mean(), metrics


# --------------------------------------------------------------------------- a reward function
def mood_word_reward(
    prompts: list[str], completions: list[str], mood: list[str], **kwargs: Any
) -> list[float]:
    """+1 for each word of the requested mood, −1 for each of the opposite one, over 6 words.

    ``mood`` is a column of the prompt dataset (``lit_pref.tasks:mood_prompts``): every column
    besides ``prompt`` reaches reward functions as a keyword argument, one entry per completion.
    ``**kwargs`` takes the rest (``completion_ids``, other columns).
    """
    rewards = []
    for completion, wanted in zip(completions, mood, strict=True):
        aligned, opposite = MOODS[wanted]
        words = [w.strip(".,:;!?").lower() for w in completion.split()]
        rewards.append((sum(w in aligned for w in words) - sum(w in opposite for w in words)) / 6)
    return rewards


# --------------------------------------------------------------------------- a callback
class MoodProbe(Callback):
    """Every ``every_n_steps`` optimizer steps, sample the policy on fixed prompts and score the samples.

    Logs ``probe/score`` (the task's ground-truth score, mean over the prompts) through the
    module's loggers and appends the samples to a JSON-lines file. Works with every lit_pref
    module: it only reads ``pl_module.policy`` and ``pl_module.tokenizer``.

    Args:
        every_n_steps: optimizer steps between probes.
        prompts: the prompts sampled (default: one happy and one sad prompt).
        path: the JSON-lines file (default: ``probe.jsonl`` in the run's log directory).
    """

    def __init__(
        self, every_n_steps: int = 10, prompts: list[str] | None = None, path: str | None = None
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.prompts = prompts or [make_prompt("happy", "sea"), make_prompt("sad", "winter")]
        self.path = path
        self.probes = 0
        self._last_step = -1

    def _file(self, trainer: Trainer) -> Path:
        if self.path is not None:
            return Path(self.path)
        return Path(trainer.log_dir or trainer.default_root_dir) / "probe.jsonl"

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return  # not an optimizer step boundary, or not a probe step
        self._last_step = step
        policy = pl_module.policy
        was_training = policy.training
        completions = generate(policy, pl_module.tokenizer, self.prompts, seed=step)
        policy.train(was_training)
        scores = [score(p, c) for p, c in zip(self.prompts, completions, strict=True)]
        pl_module.log("probe/score", sum(scores) / len(scores), on_step=True, on_epoch=False, batch_size=1)
        self.probes += 1
        if trainer.is_global_zero:
            file = self._file(trainer)
            file.parent.mkdir(parents=True, exist_ok=True)
            with file.open("a") as handle:
                for prompt, completion, value in zip(self.prompts, completions, scores, strict=True):
                    row = {"step": step, "prompt": prompt, "completion": completion, "score": value}
                    handle.write(json.dumps(row) + "\n")
