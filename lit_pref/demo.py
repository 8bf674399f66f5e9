"""``make demo``: SFT → DPO on the shipped mood task with a tiny model built locally.

Prints a held-out preference accuracy and the ground-truth score of sampled completions for the
untrained model, after SFT and after DPO, and leaves each stage's model in Hugging Face format.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import lightning as L
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_pref import tasks
from lit_pref.data import PreferenceDataModule
from lit_pref.evaluation import mean_score, preference_accuracy
from lit_pref.modules import DPO, SFT
from lit_pref.tiny import save_tiny_model


def _train(module: L.LightningModule, data: PreferenceDataModule, max_steps: int, root: Path) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=L.pytorch.loggers.CSVLogger(root, name="logs"),
        enable_checkpointing=False,
        enable_model_summary=False,
        val_check_interval=None,
        check_val_every_n_epoch=1000,
        log_every_n_steps=10,
    )
    trainer.fit(module, datamodule=data)


def _report(stage: str, directory: Path, pairs: list[dict], prompts: list[str]) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    result = {
        "preference_accuracy": preference_accuracy(model, tokenizer, pairs),
        "score": mean_score(model, tokenizer, prompts, tasks.score),
    }
    print(
        f"{stage:>8} | held-out preference accuracy {result['preference_accuracy']:.3f} | "
        f"ground-truth score of samples {result['score']:+.3f}",
        flush=True,
    )
    return result


def run_demo(
    output_dir: str | Path = "outputs/demo",
    sft_steps: int = 150,
    dpo_steps: int = 200,
    n_eval: int = 128,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Run SFT then DPO; return the held-out figures of each stage."""
    L.seed_everything(seed, verbose=False)
    root = Path(output_dir)
    base = save_tiny_model(root / "base", tasks.corpus(), seed=seed)
    held_out = tasks.preference_rows(n_eval, seed=10_000)
    prompts = [row["prompt"] for row in held_out]
    results = {"base": _report("base", base, held_out, prompts)}

    sft = SFT(model_name_or_path=str(base), output_dir=str(root / "sft"), optimizer=_adamw(3e-3))
    _train(sft, PreferenceDataModule("lit_pref.tasks:mood_sft", batch_size=16), sft_steps, root)
    results["sft"] = _report("sft", root / "sft", held_out, prompts)

    dpo = DPO(model_name_or_path=str(root / "sft"), beta=0.2, output_dir=str(root / "dpo"), optimizer=_adamw(2e-3))
    _train(dpo, PreferenceDataModule("lit_pref.tasks:mood_preferences", batch_size=16), dpo_steps, root)
    results["dpo"] = _report("dpo", root / "dpo", held_out, prompts)
    print(f"trained policy (Hugging Face format): {root / 'dpo'}")
    return results


def _adamw(lr: float):
    import torch

    return lambda params: torch.optim.AdamW(params, lr=lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--dpo-steps", type=int, default=200)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    run_demo(args.output_dir, args.sft_steps, args.dpo_steps)


if __name__ == "__main__":
    main()
