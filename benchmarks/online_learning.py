"""Does each online algorithm learn? Held-out mood-task reward before → after, and KL to the start.

Every algorithm starts from the same tiny model SFT-trained on well-scored demonstrations (as the
PPO / GRPO tests do) and gets the shipped GRPO configuration's budget: 40 batches of 8 prompts
(rollouts; GSPO's 4 mini-batches and CISPO's 2 iterations take more optimizer steps each), the
settings and learning rate of its shipped config, 12 new tokens. Before and after, 4 samples
for each of the 32 held-out prompts are scored (fixed sampling seed); the KL is the mean over
those samples of log π(y|x) − log π_start(y|x) (a sampled estimate of KL(π‖π_start), per
completion). Run by hand::

    python benchmarks/online_learning.py [--rollouts 40] [--only grpo online_dpo]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rl_helpers import held_out_prompts, make_trainer, mood_sft_model, sampled_kl

from lit_pref import tasks
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.engines import GenerateEngine, GenerationSettings
from lit_pref.rollout import generate_rollout
from lit_pref.tiny import save_tiny_model

REWARD = "lit_pref.tasks:mood_reward"
# name → (module class path, arguments as in its shipped config beyond the shared ones; lr is the
# optimizer's, steps_per_rollout the optimizer steps one batch of prompts takes)
ALGORITHMS: dict[str, tuple[str, dict[str, Any]]] = {
    "grpo": ("lit_pref.modules.GRPO", {"num_generations": 8, "lr": 2e-3}),
    "gspo": ("lit_pref.modules.GRPO", {
        "num_generations": 8, "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4,
        "beta": 0.0, "num_mini_batches": 4, "lr": 2e-3, "steps_per_rollout": 4,
    }),
    "cispo": ("lit_pref.modules.GRPO", {
        "num_generations": 8, "loss_type": "cispo", "epsilon_high": 5.0, "beta": 0.0, "num_iterations": 2,
        "lr": 2e-3, "steps_per_rollout": 2,
    }),
    "reinforce_pp": ("lit_pref.modules.GRPO", {
        "num_generations": 4, "advantage_estimator": "reinforce_plus_plus", "scale_rewards": "none",
        "kl_in_reward": True, "loss_type": "dapo", "beta": 0.01, "lr": 2e-3,
    }),
    "online_dpo": ("lit_pref.modules.OnlineDPO", {"num_generations": 4, "lr": 3e-4}),
    "rft": ("lit_pref.modules.RFT", {"num_generations": 8, "lr": 2e-3}),
}  # fmt: skip


@torch.no_grad()
def evaluate(policy: Any, start: Any, tokenizer: Any, seed: int = 1234) -> tuple[float, float]:
    """(mean reward, mean sequence KL to ``start``) of 4 samples per held-out prompt."""
    batch = held_out_prompts(tokenizer)
    torch.manual_seed(seed)
    rollout = generate_rollout(GenerateEngine(), policy, batch, GenerationSettings(max_new_tokens=12), tokenizer, 4)
    rewards = tasks.mood_reward(rollout.completion_prompts(), rollout.completions)
    return sum(rewards) / len(rewards), sampled_kl(policy, start, rollout)


def run(name: str, sft: Path, rollouts: int, root: Path) -> dict[str, float]:
    import importlib

    class_path, settings = ALGORITHMS[name]
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    settings = dict(settings)
    lr = settings.pop("lr")
    steps = rollouts * settings.pop("steps_per_rollout", 1)
    L.seed_everything(0)
    module = cls(
        model_name_or_path=str(sft), rewards=[REWARD], max_new_tokens=12,
        optimizer=partial(torch.optim.AdamW, lr=lr), **settings,
    )  # fmt: skip
    module.configure_model()
    start = module.load_network(str(sft)).eval()
    before, _ = evaluate(module.policy, start, module.tokenizer)
    began = time.perf_counter()
    data = PreferenceDataModule("lit_pref.tasks:mood_prompts", batch_size=8, val_split=None)
    make_trainer(root / name, max_steps=steps).fit(module, data)
    seconds = time.perf_counter() - began
    after, kl = evaluate(module.policy.eval(), start, module.tokenizer)
    return {"before": before, "after": after, "kl": kl, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=40, help="batches of 8 prompts each algorithm trains on")
    parser.add_argument("--only", nargs="*", choices=sorted(ALGORITHMS), default=sorted(ALGORITHMS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base = save_tiny_model(root / "tiny", tasks.corpus())
        sft = mood_sft_model(base, root / "sft")
        print(f"| algorithm | held-out reward before → after | KL to the start | time ({args.rollouts} rollouts) |")
        print("|---|---|---|---|")
        for name in args.only:
            r = run(name, sft, args.rollouts, root)
            print(f"| {name} | {r['before']:.3f} → {r['after']:.3f} | {r['kl']:.3f} | {r['seconds']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
