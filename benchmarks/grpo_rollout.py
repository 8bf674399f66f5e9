"""GRPO rollout throughput: lit_pref vs TRL's GRPOTrainer, side by side, same model and settings.

Both sides train GRPO on the shipped prompts (``lit_pref.tasks:mood_prompts``) with the same
randomly initialised Qwen2-style model (the task tokenizer; hidden size and depth set below), the
same number of prompts per step, completions per prompt, completion length limit, sampling
temperature, β and learning rate, fp32, gradient checkpointing off on both sides unless asked
for (TRL turns it on by default). Generated tokens are counted where both trainers hand
them over: the reward function receives each completion's token ids. Run by hand (TRL is an
optional extra: ``pip install -e .[bench]``)::

    python benchmarks/grpo_rollout.py [--pairs 3] [--steps 6] [--warmup 2] [--threads 2] [--device cpu]
    python benchmarks/grpo_rollout.py --engine vllm        # lit_pref with the vLLM engine (its venv)
    .venv-vllm/bin/python benchmarks/grpo_rollout.py --mode engines   # the vLLM engine vs the built-in one
    python benchmarks/grpo_rollout.py --mode prefill [--prompt-length 512] [--ks 1 4 8]
    python benchmarks/grpo_rollout.py --keep-freed-memory   # glibc keeping freed memory (both sides)

The sides alternate in pairs (lit_pref, TRL, lit_pref, TRL …), each run in a fresh process
(``benchmarks/pairs.py``), so load that drifts on a shared machine lands on both sides of each
pair's ratio. Reports each pair's whole-step generated tokens per second (rollout + rewards +
update) and their ratio, the median of the pair ratios with min and max (and a warning when they
spread too far to trust), and the median per side of the rollout phase alone (sampling plus the
no-grad reference scoring) and of the step time.

``--mode prefill`` measures the built-in engine alone on prompts of ``--prompt-length`` tokens:
for each k in ``--ks``, generated tokens per second with each prompt prefilled once and its KV
cache shared by its k completions, against prefilling every completion's copy (and against
``transformers``' ``generate``, the engine lit_pref used before), in pairs the same way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pairs

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
        rollout_engine=args.engine,
        dtype="float32",
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=partial(torch.optim.AdamW, lr=args.lr),
    )
    rollout_times: list[float] = []
    prompt_tokens: list[int] = []
    sample, prepare = module.sample, module.prepare

    def timed_sample(batch, num_generations=None):
        prompt_tokens.append(int(batch["prompt_attention_mask"].sum()))
        start = time.perf_counter()
        rollout = sample(batch, num_generations)
        rollout_times.append(time.perf_counter() - start)
        return rollout

    def timed_prepare(rollout):
        start = time.perf_counter()
        tensors = prepare(rollout)
        rollout_times[-1] += time.perf_counter() - start
        return tensors

    module.sample, module.prepare = timed_sample, timed_prepare

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
    result = summarise(timer.times[w:], tokens[w:], rollout_times[w:])
    result["median_step_gflop"] = statistics.median(
        step_matmul_flops(module.policy, p, g) / 1e9 for p, g in zip(prompt_tokens[w:], tokens[w:], strict=False)
    )
    return result


def step_matmul_flops(policy, prompt_tokens: int, generated_tokens: int) -> float:
    """Matmul FLOPs of one lit_pref GRPO step (one iteration per rollout, a reference scored):
    each prompt token through the decoder 5× (prefill, reference, policy forward, 2× backward;
    each prompt once for its k completions), each generated token through decoder and LM head
    5× (its decode step, reference, forward, backward). Attention scores are left out (< 2 % at
    these lengths), so this is a lower bound on the work of any implementation of the step.
    """
    import torch

    head = policy.get_output_embeddings()
    decoder = sum(m.weight.numel() for m in policy.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    return 5 * 2 * (prompt_tokens * decoder + generated_tokens * (decoder + head.weight.numel()))


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


def prompt_of_length(tokenizer, length: int, index: int) -> list[int]:
    """``length`` tokens of the task corpus, starting at a different place for each ``index``."""
    from lit_pref import tasks

    corpus = tokenizer(" ".join(tasks.corpus()), add_special_tokens=False).input_ids
    corpus = corpus * (1 + (length + 31 * index) // len(corpus))
    return corpus[31 * index : 31 * index + length]


def run_prefill(args: argparse.Namespace) -> dict:
    """Generated tokens per second of the built-in engine (or ``generate``) on long prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_pref.engines import GenerateEngine, GenerationSettings
    from lit_pref.engines.base import cut_after_eos, eos_token_ids

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    width = args.prompt_length
    ids = torch.tensor(
        [prompt_of_length(tokenizer, width, i) for i in range(args.prompts)], device=args.device
    )
    mask = torch.ones_like(ids)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    k = args.num_generations

    def hf_generate() -> int:
        eos = eos_token_ids(model, tokenizer)
        config = settings.generation_config(eos, tokenizer.pad_token_id, k)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return int(cut_after_eos(out[:, width:], eos, tokenizer.pad_token_id)[1].sum())

    def engine() -> int:
        samples = GenerateEngine(share_prompt=args.run == "shared").sample(
            model, ids, mask, k, settings, tokenizer
        )
        return int(samples.completion_attention_mask.sum())

    sample = hf_generate if args.run == "generate" else engine
    times, tokens = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        n = sample()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(n)
    return {"tokens_per_s": sum(tokens) / sum(times), "median_call_s": statistics.median(times)}


PREFILL_RUNS = {"shared": "lit_pref engine, shared prefill", "unshared": "lit_pref engine, prefill per completion",
                "generate": "transformers generate"}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.run in PREFILL_RUNS:
        result = run_prefill(args)
    else:
        result = run_lit_pref(args) if args.run == "lit_pref" else run_trl(args)
    pairs.emit(result)


def child_argv(model: Path, run: str, *extra: str) -> list[str]:
    return [sys.executable, __file__, *sys.argv[1:], *extra, "--model", str(model), "--run", run]


def compare_with_trl(args: argparse.Namespace, model: Path) -> None:
    engine = "" if args.engine == "generate" else f", {args.engine} engine"
    names = (f"lit_pref GRPO{engine}", "TRL GRPOTrainer")
    comparison = pairs.run_pairs(
        child_argv(model, "lit_pref"),
        child_argv(model, "trl"),
        "tokens_per_s",
        args.pairs,
        names,
        args.max_spread,
    )
    version = next((r["version"] for r in comparison.runs_b if "version" in r), None)
    print(
        f"\nGRPO rollout throughput — random Qwen2 (hidden {args.hidden}, {args.layers} layers, task tokenizer), "
        f"{args.prompts} prompts × {args.num_generations} completions ≤ {args.max_new_tokens} tokens per step, "
        f"β={args.beta}, fp32, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.device}"
        + (f" ({args.threads} threads)" if args.device == "cpu" else "")
        + f"; {args.steps} timed steps after {args.warmup} warm-up per run; TRL {version or '—'}"
    )
    rows = [
        ("generated tokens / s (whole step)", "tokens_per_s", "{:.0f}"),
        ("generated tokens / s (rollout only)", "rollout_tokens_per_s", "{:.0f}"),
        ("median step time (s)", "median_step_s", "{:.3f}"),
    ]
    print(f"{'median over runs':38s}" + "".join(f"{n:>30s}" for n in names))
    for label, key, fmt in rows:
        cells = [comparison.median_of(side, key) for side in (0, 1)]
        print(f"{label:38s}" + "".join(f"{fmt.format(c) if c is not None else '—':>30s}" for c in cells))
    print(comparison.report("{:.0f}"))
    gflop, trl_step = comparison.median_of(0, "median_step_gflop"), comparison.median_of(1, "median_step_s")
    ours = comparison.median_of(0, "median_step_s")
    if args.device == "cpu" and gflop and trl_step and ours:
        peak = pairs.matmul_gflops(args.threads)
        floor = gflop / peak
        print(f"lit_pref's step: {gflop:.1f} GFLOP of matmuls at {gflop / ours:.1f} GFLOP/s = {gflop / ours / peak:.0%} of "
              f"the measured fp32 matmul peak ({peak:.1f} GFLOP/s, 2048² matmul); at 100 % of the peak the step would "
              f"take {floor:.3f} s, {trl_step / floor:.2f}× TRL's median step: the most any implementation of this step "
              "reaches against TRL on this machine")  # fmt: skip


def compare_engines(args: argparse.Namespace, model: Path) -> None:
    """lit_pref's whole GRPO step with the vLLM engine against the built-in one, in pairs."""
    names = ("lit_pref GRPO, vllm engine", "lit_pref GRPO, built-in engine")
    comparison = pairs.run_pairs(
        child_argv(model, "lit_pref", "--engine", "vllm"),
        child_argv(model, "lit_pref", "--engine", "generate"),
        "tokens_per_s",
        args.pairs,
        names,
        args.max_spread,
    )
    for key in ("tokens_per_s", "rollout_tokens_per_s", "median_step_s"):
        cells = [comparison.median_of(side, key) for side in (0, 1)]
        print(f"median {key}: " + ", ".join(f"{n} {c:.3g}" if c is not None else f"{n} —" for n, c in zip(names, cells, strict=True)))
    print(comparison.report("{:.0f}"))


def prefill_scaling(args: argparse.Namespace, model: Path) -> None:
    print(
        f"Prefill sharing — random Qwen2 (hidden {args.hidden}, {args.layers} layers), {args.prompts} prompts of "
        f"{args.prompt_length} tokens, k completions ≤ {args.max_new_tokens} tokens each, fp32, {args.device}"
        + (f" ({args.threads} threads)" if args.device == "cpu" else "")
        + f"; {args.steps} timed calls after {args.warmup} warm-up per run; figure: generated tokens / s"
    )
    summary = []
    for k in args.ks:
        extra = ("--num-generations", str(k))
        for baseline in args.against:
            print(f"\nk = {k}: {PREFILL_RUNS['shared']} vs {PREFILL_RUNS[baseline]}")
            comparison = pairs.run_pairs(
                child_argv(model, "shared", *extra),
                child_argv(model, baseline, *extra),
                "tokens_per_s",
                args.pairs,
                ("shared", baseline),
                args.max_spread,
            )
            print(comparison.report("{:.0f}"))
            summary.append((k, baseline, comparison))
    print(
        f"\n{'k':>3s} {'shared tok/s':>14s} {'baseline':>10s} {'baseline tok/s':>15s} {'median ratio':>13s} {'min–max':>13s}"
    )
    for k, baseline, c in summary:
        shared, other, ratios = c.median_of(0, "tokens_per_s"), c.median_of(1, "tokens_per_s"), c.ratios
        span = f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "—"
        cells = [f"{v:.0f}" if v is not None else "—" for v in (shared, other)]
        median = f"{c.median:.2f}×" if c.median is not None else "—"
        print(f"{k:>3d} {cells[0]:>14s} {baseline:>10s} {cells[1]:>15s} {median:>13s} {span:>13s}"
              + ("" if c.trustworthy else "  (spread too wide)"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("trl", "engines", "prefill"), default="trl",
                        help="trl: whole GRPO steps against TRL; engines: the vLLM engine against the built-in one "
                             "(in the vLLM venv); prefill: the engine's prefill sharing on long prompts")  # fmt: skip
    parser.add_argument(
        "--pairs", type=int, default=3, help="alternating pairs of runs (each run its own process)"
    )
    parser.add_argument("--max-spread", type=float, default=1.25,
                        help="max/min of the pair ratios above which the result is flagged untrustworthy")  # fmt: skip
    parser.add_argument("--steps", type=int, default=6, help="timed training steps (prefill: calls) per run")
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
    parser.add_argument(
        "--engine", choices=("generate", "vllm"), default="generate", help="lit_pref's rollout engine"
    )
    parser.add_argument("--prompt-length", type=int, default=512, help="prefill mode: prompt tokens")
    parser.add_argument(
        "--ks", type=int, nargs="+", default=[1, 4, 8], help="prefill mode: completions per prompt"
    )
    parser.add_argument("--against", nargs="+", choices=("unshared", "generate"), default=["unshared", "generate"],
                        help="prefill mode: what shared prefill is compared with")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    pairs.add_malloc_argument(parser)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--run", choices=(*SIDES, *PREFILL_RUNS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args)
        return
    with pairs.malloc(args.keep_freed_memory), tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build(model, args.hidden, args.layers)
        if args.mode == "prefill":
            prefill_scaling(args, model)
        elif args.mode == "engines":
            compare_engines(args, model)
        else:
            compare_with_trl(args, model)


if __name__ == "__main__":
    main()
