"""DPO training throughput and memory: lit_pref vs TRL's DPOTrainer, side by side, on CPU.

Same model (random Qwen2-style: hidden 256, 4 layers, vocab 32,000), same synthetic rows, each
library's default optimizer (fused AdamW in both), fp32, batch 4. Two data sets:

* ``uniform`` (the shipped configuration): prompt 192 tokens, completions 64 + EOS;
* ``skewed``: prompt lengths drawn from 16–512 tokens and each completion's from 8–256, where
  TRL pads every row of a batch to the longest and lit_pref can run padding-free
  (``packing: true``: each prompt once, then its two completions, no padding).

Each comparison alternates its two configurations in pairs (A B A B …, ``--pairs`` of them, each
run in its own process: ``benchmarks/pairs.py``) and prints the median of the per-pair ratios
with min and max, warning when they spread too far to trust. Run by hand (TRL is an optional
extra: ``pip install -e .[bench]``)::

    python benchmarks/dpo_throughput.py [--pairs 3] [--steps 8] [--warmup 2] [--threads 2] [--only uniform,skewed,longest]
    python benchmarks/dpo_throughput.py --only longest [--longest plain,gc] [--longest-cap 16384]
    python benchmarks/dpo_throughput.py --keep-freed-memory   # both libraries, glibc keeping freed memory

Page faults weigh on CPU steps: by default glibc returns large freed blocks to the system, and
every fresh one faults its pages in again. ``--keep-freed-memory`` sets ``GLIBC_TUNABLES`` for
the throughput comparisons' children (both libraries), which is closer to what a GPU's caching
allocator does; the memory probe keeps the default, as kept memory would count in its RSS limit.

Per run: tokens/s (real prompt + completion tokens over step time), peak RSS and the
training-time memory increment (peak RSS minus RSS once the models are loaded); for the uniform
set also the fraction of the machine's fp32 matmul throughput (measured in the same process right
after the steps) that lit_pref's step achieves. The memory probe finds the longest completion
(prompt 128 tokens, batch 4) each library trains in one step within 8 GiB of resident memory,
with gradient checkpointing off on both sides and on on both sides.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pairs
from synthetic import save_word_level_model

PROMPT, COMPLETION, BATCH, VOCAB, HIDDEN, LAYERS, INTERMEDIATE = 192, 64, 4, 32_000, 256, 4, 1024
SKEWED_PROMPT, SKEWED_COMPLETION = (16, 512), (8, 256)
# The memory probe: the longest completion (prompt 128 tokens, batch 4) whose training step stays
# within MEMORY_LIMIT of resident memory.
LONG_PROMPT, MEMORY_LIMIT_MIB = 128, 8 * 1024
# (library, reference precomputed, gradient checkpointing, padding-free) of each configuration.
RUNS = {
    "lit_pref": ("lit_pref", False, False, False),
    "lit_pref_packed": ("lit_pref", False, False, True),
    "lit_pref_pre": ("lit_pref", True, False, False),
    "lit_pref_gc": ("lit_pref", False, True, False),
    "trl": ("trl", False, False, False),
    "trl_gc": ("trl", False, True, False),
    "trl_pre": ("trl", True, False, False),
}
# The memory probe's settings: name → (label, lit_pref run, TRL run), both libraries with the same setting.
LONGEST = {
    "plain": ("no gradient checkpointing", "lit_pref", "trl"),
    "gc": ("gradient checkpointing on both", "lit_pref_gc", "trl_gc"),
}
# (data set, A, B): each comparison is run as interleaved pairs.
COMPARISONS = (
    ("uniform", "lit_pref", "trl"),
    ("uniform", "lit_pref_pre", "trl_pre"),
    ("skewed", "lit_pref_packed", "trl"),
    ("skewed", "lit_pref_packed", "lit_pref"),
)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(directory: Path) -> None:
    """The random model and its word-level tokenizer (``w0`` … ``w31995`` are single tokens)."""
    save_word_level_model(directory, VOCAB, HIDDEN, LAYERS, INTERMEDIATE)


def rows(n: int, dataset: str = "uniform") -> list[dict[str, str]]:
    rng = random.Random(0)

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(k))

    if dataset == "uniform":
        return [{"prompt": text(PROMPT), "chosen": " " + text(COMPLETION), "rejected": " " + text(COMPLETION)} for _ in range(n)]
    if dataset.startswith("long"):  # "long<L>": the memory probe's rows, completions of L tokens
        length = int(dataset.removeprefix("long"))
        return [{"prompt": text(LONG_PROMPT), "chosen": " " + text(length), "rejected": " " + text(length)} for _ in range(n)]
    return [
        {
            "prompt": text(rng.randint(*SKEWED_PROMPT)),
            "chosen": " " + text(rng.randint(*SKEWED_COMPLETION)),
            "rejected": " " + text(rng.randint(*SKEWED_COMPLETION)),
        }
        for _ in range(n)
    ]


def row_tokens(row: dict[str, str]) -> int:
    """Real tokens of a row: the prompt once, each completion with its EOS (word-level tokens)."""
    return len(row["prompt"].split()) + len(row["chosen"].split()) + len(row["rejected"].split()) + 2


def run_lit_pref(
    model_dir: str, steps: int, n_rows: int, precompute: bool, gradient_checkpointing: bool, packing: bool, dataset: str
) -> tuple[list[float], float]:
    import lightning as L
    from datasets import Dataset

    from lit_pref.data import PreferenceDataModule
    from lit_pref.modules import DPO

    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            times.append(time.perf_counter() - self.start)

    module = DPO(
        model_name_or_path=model_dir,
        tokenizer_name_or_path=f"{model_dir}/tokenizer",
        beta=0.1,
        precompute_ref_logps=precompute,
        ref_cache_dir=tempfile.mkdtemp(),
        gradient_checkpointing=gradient_checkpointing,
    )
    # Packed sequences of up to 1,024 tokens (a prompt and its two completions fit in one).
    data = PreferenceDataModule(
        Dataset.from_list(rows(n_rows, dataset)), val_split=None, batch_size=BATCH,
        max_length=1024 if packing else None, max_prompt_length=None, packing=packing,
    )  # fmt: skip
    module.configure_model()
    loaded = rss_mib()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Timer()], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return times, loaded


def run_trl(
    model_dir: str, steps: int, n_rows: int, gradient_checkpointing: bool, precompute: bool, dataset: str
) -> tuple[list[float], float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs) -> None:
            times.append(time.perf_counter() - self.start)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(f"{model_dir}/tokenizer")
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=1e-6,
        beta=0.1, gradient_checkpointing=gradient_checkpointing, report_to=[], logging_steps=1000,
        save_strategy="no", use_cpu=True, max_length=None, dataloader_num_workers=0, bf16=False, fp16=False,
        precompute_ref_log_probs=precompute,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows(n_rows, dataset)), processing_class=tokenizer
    )
    trainer.add_callback(Timer())
    first, row = trainer.train_dataset[0], rows(1, dataset)[0]
    if len(first["prompt_ids"]) != len(row["prompt"].split()) or len(first["chosen_ids"]) != len(row["chosen"].split()) + 1:
        raise RuntimeError(f"TRL tokenised the rows to unexpected lengths: {[len(v) for v in first.values()]}")
    loaded = rss_mib()
    trainer.train()
    return times, loaded


def lit_pref_step_flops(precompute: bool) -> float:
    """FLOPs lit_pref's step executes (matmuls only; attention scores are < 3 % here and left out).

    The prompt is encoded once per pair (shared KV cache) and the LM head runs on completion
    positions only (one chunk here, so it is not recomputed in backward); the policy does forward
    + backward (3×), the reference a forward (1×) unless precomputed.
    """
    attn = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN // 2)  # q, o + k, v (2 of 4 heads for kv)
    per_token_decoder = 2 * LAYERS * (attn + 3 * HIDDEN * INTERMEDIATE)
    per_token_head = 2 * HIDDEN * VOCAB
    decoder_tokens = BATCH * (PROMPT + 1 + 2 * (COMPLETION + 1))  # +1: BOS-free prompt, EOS on completions
    head_tokens = BATCH * 2 * (COMPLETION + 1)
    policy = 3 * decoder_tokens * per_token_decoder + 3 * head_tokens * per_token_head
    reference = decoder_tokens * per_token_decoder + head_tokens * per_token_head
    return policy + (0 if precompute else reference)


def watch_memory(limit_mib: float) -> None:
    """End this process (reporting ``fits: false``) the moment its resident memory passes ``limit_mib``."""
    import threading

    def watch() -> None:
        while True:
            if rss_mib() > limit_mib:
                pairs.emit({"fits": False, "peak_mib": rss_mib()})
                os._exit(0)
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()


def longest_completion(model_dir: Path, run: str, threads: int, cap: int, start: int = 256) -> tuple[int, dict]:
    """The longest completion (doubling from ``start`` up to ``cap``, then one bisection step)
    whose step fits; ``cap`` itself when that fits (the true limit may be longer)."""

    def probe(length: int) -> dict:
        result = pairs.run_once([sys.executable, __file__, "--run", run, "--data", f"long{length}", "--model-dir",
                                 str(model_dir), "--threads", str(threads)])  # fmt: skip
        fits = result.get("fits", "peak_mib" in result and result["peak_mib"] <= MEMORY_LIMIT_MIB)
        print(f"  {run}: completion {length}: peak {result.get('peak_mib', float('nan')):.0f} MiB, "
              f"{'fits' if fits else 'does not fit'}{'' if 'error' not in result else ' (' + result['error'] + ')'}",
              flush=True)  # fmt: skip
        return dict(result, fits=fits)

    best, best_result, length = 0, {}, start
    while length <= cap and (result := probe(length))["fits"]:
        best, best_result, length = length, result, 2 * length
    if best and best < cap and (middle := (best + length) // 2) > best and (result := probe(middle))["fits"]:
        best, best_result = middle, result
    return best, best_result


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    library, precompute, gradient_checkpointing, packing = RUNS[args.run]
    if args.data.startswith("long"):
        # One step, stopped as soon as it holds more than the limit (so a probe never takes the machine's memory).
        watch_memory(MEMORY_LIMIT_MIB)
        n_rows, steps, measured, tokens = BATCH, 1, slice(0, None), 0
    elif args.data == "uniform":
        # Every step holds the same tokens: the first ``warmup`` steps are left out.
        n_rows = steps = args.steps + args.warmup
        n_rows *= BATCH
        measured = slice(args.warmup, None)
        tokens = BATCH * row_tokens(rows(1)[0]) * args.steps
    else:
        # Steps differ (and each library shuffles its own way): two epochs over the rows, the
        # second one measured, so both sides are timed on exactly the same tokens.
        n_rows, steps = BATCH * args.steps, 2 * args.steps
        measured = slice(args.steps, None)
        tokens = sum(row_tokens(r) for r in rows(n_rows, "skewed"))
    if library == "lit_pref":
        times, loaded = run_lit_pref(args.model_dir, steps, n_rows, precompute, gradient_checkpointing, packing, args.data)
    else:
        try:
            times, loaded = run_trl(args.model_dir, steps, n_rows, gradient_checkpointing, precompute, args.data)
        except ImportError as error:
            pairs.emit({"unavailable": f"TRL is not installed ({error})"})
            return
    peak = peak_rss_mib()
    result = {
        "tokens_per_s": tokens / sum(times[measured]),
        "median_s": statistics.median(times[measured]),
        "peak_mib": peak,
        "train_mib": peak - loaded,
    }
    if library == "lit_pref" and args.data == "uniform":
        # The host's load moves the matmul peak by a third within a day: each run is set against
        # the peak measured in its own process, right after its steps.
        result["peak_fraction"] = lit_pref_step_flops(precompute) / result["median_s"] / 1e9 / pairs.matmul_gflops()
    pairs.emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    pairs.add_malloc_argument(parser)
    parser.add_argument("--only", default="uniform,skewed,longest",
                        help="comma-separated: uniform, skewed (the throughput comparisons), longest (the memory probe)")
    parser.add_argument("--longest", default="plain,gc",
                        help="memory probe settings, comma-separated: plain (no gradient checkpointing), gc (on, both sides)")
    parser.add_argument("--longest-cap", type=int, default=16_384,
                        help="memory probe: longest completion tried (a step at 16,384 tokens takes minutes on 2 cores)")
    parser.add_argument("--run", choices=tuple(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--data", default="uniform", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args)
        return
    if rows(1)[0]["prompt"].count(" ") != PROMPT - 1:
        raise RuntimeError("synthetic rows are malformed")
    model_dir = Path(tempfile.mkdtemp()) / "model"
    build(model_dir)
    peak_gflops = pairs.matmul_gflops(args.threads)
    wanted = args.only.split(",")
    for dataset, a, b in COMPARISONS:
        if dataset not in wanted:
            continue

        def command(run: str, dataset: str = dataset) -> list[str]:
            return [sys.executable, __file__, "--run", run, "--data", dataset, "--model-dir", str(model_dir),
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip

        print(f"\n== {dataset} rows, batch {BATCH}: {a} vs {b}", flush=True)
        with pairs.malloc(args.keep_freed_memory):
            comparison = pairs.run_pairs(command(a), command(b), "tokens_per_s", pairs=args.pairs, names=(a, b))
        print(comparison.report("{:.0f}"))
        ratios = [ra["train_mib"] / rb["train_mib"] for ra, rb in zip(comparison.runs_a, comparison.runs_b, strict=False)
                  if "train_mib" in ra and "train_mib" in rb]  # fmt: skip
        if ratios:
            print(f"{a} / {b}, training memory (peak − loaded RSS): median {statistics.median(ratios):.2f}× "
                  f"(min {min(ratios):.2f}×, max {max(ratios):.2f}×); medians "
                  f"{comparison.median_of(0, 'train_mib'):.0f} vs {comparison.median_of(1, 'train_mib'):.0f} MiB")  # fmt: skip
        fractions = [run["peak_fraction"] for run in comparison.runs_a if "peak_fraction" in run]
        if fractions:
            print(f"{a}: its step executes {statistics.median(fractions):.0%} of the fp32 matmul peak (median; min "
                  f"{min(fractions):.0%}, max {max(fractions):.0%}; each run against a 2048² matmul measured "
                  f"in its own process after its steps; {peak_gflops:.1f} GFLOP/s at the start)")  # fmt: skip

    if "longest" in wanted:
        print(f"\n== longest completion, prompt {LONG_PROMPT}, batch {BATCH}, within {MEMORY_LIMIT_MIB / 1024:.0f} GiB "
              "peak RSS (one training step per probe)", flush=True)  # fmt: skip
        for key in args.longest.split(","):
            setting, ours, theirs = LONGEST[key]
            print(f"-- {setting}", flush=True)
            found = {run: longest_completion(model_dir, run, args.threads, args.longest_cap)[0] for run in (ours, theirs)}
            at_least = "≥ " if found[ours] == args.longest_cap else ""
            ratio = f"{at_least}{found[ours] / found[theirs]:.1f}×" if found[theirs] else "—"
            print(f"longest completion, {setting}: lit_pref {at_least}{found[ours]}, TRL {found[theirs]} tokens: "
                  f"lit_pref / TRL = {ratio}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
