"""GRPO rollout throughput: lit_pref vs TRL's GRPOTrainer, side by side, same model and settings.

Both sides train GRPO on the shipped prompts (``lit_pref.tasks:mood_prompts``) with the same
randomly initialised Qwen2-style model (the task tokenizer; hidden size and depth set below), the
same number of prompts per step, completions per prompt, completion length limit, sampling
temperature, β and learning rate, fp32, gradient checkpointing off on both sides unless asked
for (TRL turns it on by default). Generated tokens are counted where both trainers hand
them over: the reward function receives each completion's token ids. Each side runs in its own
process. Run by hand (TRL is an optional extra: ``pip install -e .[bench]``)::

    python benchmarks/grpo_rollout.py [--steps 6] [--warmup 2] [--threads 2] [--repeats 1] [--device cpu]

Reports, per side, generated tokens per second of whole training steps (rollout + rewards +
update) and, for lit_pref, of the rollout phase alone (sampling plus the no-grad reference
scoring), with the median step time. If TRL is not installed its column says so and lit_pref is
still measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("lit_pref", "trl")


def build(directory: Path, hidden: int, layers: int) -> None:
    from lit_pref import tasks
    from lit_pref.tiny import save_tiny_model

    save_tiny_model(directory, tasks.corpus(), hidden_size=hidden, num_layers=layers)


class TokenCounter:
    """A reward function that scores nothing useful but records how many tokens were generated."""

    __name__ = "token_counter"

    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []

    def __call__(self, prompts, completions, completion_ids=None, **_):
        self.calls.append((time.perf_counter(), sum(len(ids) for ids in completion_ids)))
        return [float(len(ids)) / 100 for ids in completion_ids]


def summarise(step_times: list[float], tokens: list[int], rollout_times: list[float] | None = None) -> dict:
    seconds = sum(step_times)
    out = {
        "steps": len(step_times),
        "median_step_s": statistics.median(step_times),
        "generated_tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / seconds,
    }
    if rollout_times:
        out["rollout_tokens_per_s"] = sum(tokens) / sum(rollout_times)
    return out


def run_lit_pref(args: argparse.Namespace) -> dict:
    from functools import partial

    import lightning as L
    import torch

    from lit_pref.data import PreferenceDataModule
    from lit_pref.modules import GRPO

    counter = TokenCounter()
    module = GRPO(
        model_name_or_path=args.model,
        rewards=[counter],
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        beta=args.beta,
        rollout_batch_size=args.prompts * args.num_generations,
        dtype="float32",
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=partial(torch.optim.AdamW, lr=args.lr),
    )
    rollout_times: list[float] = []
    collect = module.collect_rollout

    def timed_collect(batch):
        start = time.perf_counter()
        rollout = collect(batch)
        rollout_times.append(time.perf_counter() - start)
        return rollout

    module.collect_rollout = timed_collect

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    data = PreferenceDataModule("lit_pref.tasks:mood_prompts", batch_size=args.prompts, val_split=None)
    trainer.fit(module, data)
    tokens = [n for _, n in counter.calls]
    w = args.warmup
    return summarise(timer.times[w:], tokens[w:], rollout_times[w:])


def run_trl(args: argparse.Namespace) -> dict:
    try:
        import trl
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as error:
        return {"unavailable": f"TRL is not installed ({error}); `pip install -e .[bench]` to compare"}
    import torch

    from lit_pref import tasks

    counter = TokenCounter()

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args_, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.prompts * args.num_generations,
            num_generations=args.num_generations,
            max_completion_length=args.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            beta=args.beta,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            max_steps=args.warmup + args.steps,
            logging_steps=10_000,
            save_strategy="no",
            report_to="none",
            use_cpu=args.device == "cpu",
            bf16=False,
            fp16=False,
            gradient_checkpointing=args.gradient_checkpointing,  # TRL's default is on; lit_pref's off
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        timer = Timer()
        trainer = GRPOTrainer(
            model=args.model,
            reward_funcs=[counter],
            args=config,
            train_dataset=tasks.mood_prompts()["train"],
            callbacks=[timer],
        )
        trainer.train()
    tokens = [n for _, n in counter.calls]
    w = args.warmup
    result = summarise(timer.times[w:], tokens[w:])
    result["version"] = trl.__version__
    return result


def child(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    result = run_lit_pref(args) if args.run == "lit_pref" else run_trl(args)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="completion length limit")
    parser.add_argument(
        "--beta", type=float, default=0.04, help="KL coefficient (a reference model is scored)"
    )
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (both sides)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternating runs per side; the fastest is kept"
    )
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--run", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build(model, args.hidden, args.layers)
        results: dict[str, dict] = {}
        # Sides alternate, and the fastest repeat of each is kept: on a shared machine that is the
        # measurement least disturbed by other load.
        for _ in range(args.repeats):
            for side in SIDES:
                argv = [sys.executable, __file__, *sys.argv[1:], "--model", str(model), "--run", side]
                proc = subprocess.run(argv, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    result = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
                else:
                    result = json.loads(line.removeprefix("RESULT "))
                best = results.get(side, {})
                if result.get("tokens_per_s", -1) > best.get("tokens_per_s", -1) or not best:
                    results[side] = result
                if "unavailable" in result:
                    results[side] = result

    print(
        f"GRPO rollout throughput — random Qwen2 (hidden {args.hidden}, {args.layers} layers, task tokenizer), "
        f"{args.prompts} prompts × {args.num_generations} completions ≤ {args.max_new_tokens} tokens per step, "
        f"β={args.beta}, fp32, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.device}"
        + (f" ({args.threads} threads)" if args.device == "cpu" else "")
        + f"; {args.steps} timed steps after {args.warmup} warm-up"
    )
    rows = [
        ("generated tokens / s (whole step)", "tokens_per_s", "{:.0f}"),
        ("generated tokens / s (rollout only)", "rollout_tokens_per_s", "{:.0f}"),
        ("median step time (s)", "median_step_s", "{:.3f}"),
        ("generated tokens (timed steps)", "generated_tokens", "{:d}"),
    ]
    names = {
        "lit_pref": "lit_pref GRPO",
        "trl": "TRL GRPOTrainer"
        + (f" {results['trl']['version']}" if "version" in results.get("trl", {}) else ""),
    }
    print(f"{'':38s}" + "".join(f"{names[s]:>26s}" for s in SIDES))
    for label, key, fmt in rows:
        cells = []
        for side in SIDES:
            value = results[side].get(key)
            cells.append(fmt.format(value) if value is not None else "—")
        print(f"{label:38s}" + "".join(f"{c:>26s}" for c in cells))
    for side in SIDES:
        for problem in ("unavailable", "error"):
            if problem in results[side]:
                print(f"{names[side]}: {problem}: {results[side][problem]}")
    if all("tokens_per_s" in results[s] for s in SIDES):
        ratio = results["lit_pref"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
        print(f"lit_pref / TRL, whole-step generated tokens per second: {ratio:.2f}×")


if __name__ == "__main__":
    main()
