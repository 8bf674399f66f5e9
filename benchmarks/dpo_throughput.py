"""DPO training throughput and memory: lit_pref vs TRL's DPOTrainer, side by side, on CPU.

Same model (random Qwen2-style: hidden 256, 4 layers, vocab 32,000), same synthetic rows (prompt
192 tokens, completions 64 tokens + EOS, batch 4), each library's default optimizer (fused AdamW
in both), fp32, one process per configuration so peak memory is measured in isolation. Run by hand (TRL is an optional extra:
``pip install -e .[bench]``)::

    python benchmarks/dpo_throughput.py [--steps 8] [--warmup 2] [--threads 2]

Prints per-step median time, tokens/s, peak RSS and the training-time memory increment (peak RSS
minus RSS once the models are loaded), the ratios lit_pref / TRL, and the fraction of the
machine's measured fp32 matmul throughput that lit_pref's step achieves.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT, COMPLETION, BATCH, VOCAB, HIDDEN, LAYERS, INTERMEDIATE = 192, 64, 4, 32_000, 256, 4, 1024
RUNS = {
    "lit_pref": "lit_pref DPO",
    "trl": "TRL DPOTrainer (no GC)",
    "trl_gc": "TRL DPOTrainer (GC)",
    "lit_pref_pre": "lit_pref, ref precomputed",
    "trl_pre": "TRL (no GC), ref precomputed",
}
# Each lit_pref run is compared with the TRL runs that use the same reference setting.
PAIRS = (("lit_pref", "trl"), ("lit_pref", "trl_gc"), ("lit_pref_pre", "trl_pre"))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(directory: Path) -> None:
    """A word-level tokenizer (``w0`` … ``w31995`` are single tokens) and the random model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(directory)
    # Apart from the model: next to a qwen2 config, AutoTokenizer would rebuild it as a BPE tokenizer.
    tokenizer.save_pretrained(directory / "tokenizer")


def rows(n: int) -> list[dict[str, str]]:
    import random

    rng = random.Random(0)

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(k))

    return [{"prompt": text(PROMPT), "chosen": " " + text(COMPLETION), "rejected": " " + text(COMPLETION)} for _ in range(n)]


def run_lit_pref(model_dir: str, steps: int, precompute: bool) -> tuple[list[float], float]:
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
    )
    data = PreferenceDataModule(
        Dataset.from_list(rows(BATCH * steps)), val_split=None, batch_size=BATCH, max_length=None, max_prompt_length=None
    )
    module.configure_model()
    loaded = rss_mib()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Timer()], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return times, loaded


def run_trl(model_dir: str, steps: int, gradient_checkpointing: bool, precompute: bool) -> tuple[list[float], float]:
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
        model=model, args=config, train_dataset=Dataset.from_list(rows(BATCH * steps)), processing_class=tokenizer
    )
    trainer.add_callback(Timer())
    first = trainer.train_dataset[0]
    if len(first["prompt_ids"]) != PROMPT or len(first["chosen_ids"]) != COMPLETION + 1:
        raise RuntimeError(f"TRL tokenised the rows to unexpected lengths: {[len(v) for v in first.values()]}")
    loaded = rss_mib()
    trainer.train()
    return times, loaded


def matmul_gflops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - start) / 1e9


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


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps, precompute = args.steps + args.warmup, args.run.endswith("_pre")
    if args.run.startswith("lit_pref"):
        times, loaded = run_lit_pref(args.model_dir, steps, precompute)
    else:
        times, loaded = run_trl(args.model_dir, steps, args.run == "trl_gc", precompute)
    measured = times[args.warmup :]
    print(json.dumps({"median_s": statistics.median(measured), "peak_mib": peak_rss_mib(), "loaded_mib": loaded}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", choices=tuple(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args)
        return
    if rows(1)[0]["prompt"].count(" ") != PROMPT - 1:
        raise RuntimeError("synthetic rows are malformed")
    model_dir = Path(tempfile.mkdtemp()) / "model"
    build(model_dir)
    tokens = BATCH * 2 * (PROMPT + COMPLETION + 1)
    results = {}
    for run in RUNS:
        command = [sys.executable, __file__, "--run", run, "--model-dir", str(model_dir)]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{run}: failed\n{done.stderr[-3000:]}")
            continue
        results[run] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nDPO step, batch {BATCH}, prompt {PROMPT}, completions {COMPLETION} (+EOS), {tokens} tokens/step, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'run':<32}{'median s/step':>14}{'tokens/s':>11}{'peak RSS MiB':>14}{'train Δ MiB':>13}")
    for run, r in results.items():
        delta = r["peak_mib"] - r["loaded_mib"]
        print(f"{RUNS[run]:<32}{r['median_s']:>14.3f}{tokens / r['median_s']:>11.0f}{r['peak_mib']:>14.0f}{delta:>13.0f}")
    for ours_name, theirs_name in PAIRS:
        if ours_name in results and theirs_name in results:
            ours, theirs = results[ours_name], results[theirs_name]
            speed = theirs["median_s"] / ours["median_s"]
            mem = (ours["peak_mib"] - ours["loaded_mib"]) / (theirs["peak_mib"] - theirs["loaded_mib"])
            peak = ours["peak_mib"] / theirs["peak_mib"]
            print(f"{RUNS[ours_name]} vs {RUNS[theirs_name]}: {speed:.2f}× tokens/s, training memory {mem:.2f}×, "
                  f"peak RSS {peak:.2f}×")  # fmt: skip
    peak_gflops = matmul_gflops(args.threads)
    for run in ("lit_pref", "lit_pref_pre"):
        if run in results:
            achieved = lit_pref_step_flops(run.endswith("_pre")) / results[run]["median_s"] / 1e9
            print(f"{RUNS[run]}: executes {achieved:.1f} GFLOP/s = {achieved / peak_gflops:.0%} of the measured "
                  f"fp32 matmul peak ({peak_gflops:.1f} GFLOP/s, 2048² matmul)")  # fmt: skip


if __name__ == "__main__":
    main()
