"""GRPO throughput with the vLLM rollout engine against the built-in one, in one process.

The model and settings are ``benchmarks/grpo_rollout.py``'s (the shipped prompts, a randomly
initialised Qwen2-style model, fp32, prompts × completions per step, completion length, β, lr),
so its figures compare with that script's; the two engines run one after the other, the built-in
one first. Generated tokens are counted by the reward function, as there. Run it in the venv
that has vLLM (``make test-vllm`` builds ``.venv-vllm``)::

    .venv-vllm/bin/python benchmarks/vllm_rollout.py [--steps 6] [--warmup 2] [--threads 2]

Reports, per engine, generated tokens per second of whole training steps and of the rollout phase
alone (sampling plus the no-grad scoring pass), the median step time, and for vLLM its start-up
and per-step weight-sync seconds. The warm-up steps (vLLM's start-up among them) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def run(args: argparse.Namespace, model: Path, engine_name: str) -> dict:
    from functools import partial

    import lightning as L
    import torch
    from grpo_rollout import TokenCounter, summarise

    from lit_pref.data import PreferenceDataModule
    from lit_pref.engines import GenerateEngine, RolloutEngine
    from lit_pref.modules import GRPO

    torch.manual_seed(0)
    counter = TokenCounter()
    if engine_name == "vllm":
        from lit_pref.engines.vllm import VLLMEngine

        engine: RolloutEngine = VLLMEngine(max_model_len=args.max_model_len, enforce_eager=args.enforce_eager)
    else:
        engine = GenerateEngine(args.prompts * args.num_generations)
    module = GRPO(
        model_name_or_path=str(model),
        rewards=[counter],
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        beta=args.beta,
        rollout_batch_size=args.prompts * args.num_generations,
        rollout_engine=engine,
        dtype="float32",
        optimizer=partial(torch.optim.AdamW, lr=args.lr),
    )
    rollout_times: list[float] = []
    engine_timings: list[dict[str, float]] = []
    sample, prepare, metrics = module.sample, module.prepare, module.rollout_engine.metrics

    def timed_sample(batch, num_generations=None):
        start = time.perf_counter()
        rollout = sample(batch, num_generations)
        rollout_times.append(time.perf_counter() - start)
        return rollout

    def timed_prepare(rollout):
        start = time.perf_counter()
        tensors = prepare(rollout)
        rollout_times[-1] += time.perf_counter() - start
        return tensors

    def recorded_metrics():
        engine_timings.append(metrics())
        return engine_timings[-1]

    module.sample, module.prepare = timed_sample, timed_prepare
    module.rollout_engine.metrics = recorded_metrics

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, PreferenceDataModule("lit_pref.tasks:mood_prompts", batch_size=args.prompts, val_split=None))
    w = args.warmup
    result = summarise(timer.times[w:], [n for _, n in counter.calls][w:], rollout_times[w:])
    if engine_name == "vllm":
        timed = engine_timings[w:]
        result["startup_s"] = engine_timings[0].get("startup_s")
        result["sync_s_per_step"] = sum(t.get("sync_s", 0.0) for t in timed) / max(1, len(timed))
        result["generate_s_per_step"] = sum(t.get("generate_s", 0.0) for t in timed) / max(1, len(timed))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per engine")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (vLLM starts in the first)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="completion length limit")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (vLLM's CPU attention needs head_dim >= 32)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (training and vLLM)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without compilation")
    args = parser.parse_args()
    # Before torch / vLLM load: vLLM in this process (its weights come from the policy in memory),
    # and the thread count both sides use (vLLM otherwise lowers torch's to 1 for serving).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from grpo_rollout import build

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build(model, args.hidden, args.layers)
        results = {name: run(args, model, name) for name in ("generate", "vllm")}
    print(json.dumps(results, indent=2))
    ratio = results["vllm"]["tokens_per_s"] / results["generate"]["tokens_per_s"]
    rollout = results["vllm"]["rollout_tokens_per_s"] / results["generate"]["rollout_tokens_per_s"]
    print(f"vLLM / built-in: whole step {ratio:.2f}x, rollout phase {rollout:.2f}x generated tokens/s")


if __name__ == "__main__":
    main()
