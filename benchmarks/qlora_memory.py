"""QLoRA memory: a DPO policy whose base is loaded in 4 bits (nf4) or 8 bits vs the same policy in
fp32, both training a LoRA adapter with the adapter-disabled base as the reference, on CPU.

Random Qwen2-style model (hidden 1024, 8 layers, MLP 2816, vocab 4,000: ~100 M parameters, 94 %
of them in the decoder's linear layers, which are what bitsandbytes quantizes), synthetic rows
(prompt 64 tokens, completions 32, batch 2). Each configuration runs in its own process, the
configurations alternated in pairs (4-bit, fp32, 4-bit, fp32, …: ``benchmarks/pairs.py``). Run by hand (needs the
``quantization`` extra)::

    python benchmarks/qlora_memory.py [--pairs 3] [--steps 3] [--threads 2]

Prints, per configuration, the bytes the policy's weights take (exact), the process's resident
memory once the module is built and its peak over the training steps (total and anonymous: see
:func:`rss_mib`; freed loading buffers handed back to the OS first), and the median step time;
then the quantized / fp32 ratios per pair, their median, min and max.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pairs
from synthetic import save_word_level_model

HIDDEN, LAYERS, INTERMEDIATE, VOCAB, PROMPT, COMPLETION, BATCH = 1024, 8, 2816, 4000, 64, 32, 2
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
CONFIGS = {
    "fp32": None,
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"},
    "int8": {"load_in_8bit": True},
}


def rss_mib() -> dict[str, float]:
    """Resident memory in MiB: ``total`` (``VmRSS``) and its ``anon`` part (``RssAnon``).

    transformers memory-maps the weight files: pages of the file read so far are resident but
    file-backed (``total`` − ``anon``), pages not read yet are not resident at all. Both figures are
    printed: the file-backed pages are reclaimable, the anonymous ones are not.
    """
    fields = {"VmRSS:": "total", "RssAnon:": "anon"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split()[0] if line else ""
        if key in fields:
            out[fields[key]] = int(line.split()[1]) / 1024
    return out


class PeakSampler(threading.Thread):
    """The highest :func:`rss_mib` figures seen while it runs, sampled every millisecond."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_mib()
        self.done = threading.Event()

    def sample(self) -> None:
        now = rss_mib()
        self.peak = {key: max(self.peak[key], now[key]) for key in now}

    def run(self) -> None:
        while not self.done.wait(0.001):
            self.sample()

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        self.sample()
        return self.peak


def measure(directory: str, name: str, steps: int, threads: int) -> dict:
    """One configuration, in this (fresh) process."""
    import warnings

    import torch

    from lit_pref.modules import DPO

    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = DPO(model_name_or_path=directory, tokenizer_name_or_path=f"{directory}/tokenizer", peft=LORA, quantization=CONFIGS[name], dtype="float32")
    module.configure_model()
    module.reference.build(module.policy, module.load_network)
    optimizer = module.configure_optimizers()
    weight_bytes = sum(t.numel() * t.element_size() for t in module.policy.state_dict().values())
    # Freed loading buffers (the full-precision weights a quantized load reads first) go back to the OS.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = rss_mib()
    sampler = PeakSampler()
    sampler.start()

    def row() -> dict:
        prompt = torch.randint(4, VOCAB, (BATCH, PROMPT))
        completion = torch.randint(4, VOCAB, (2 * BATCH, COMPLETION))
        return {
            "prompt_input_ids": prompt,
            "prompt_attention_mask": torch.ones_like(prompt),
            "completion_input_ids": completion,
            "completion_attention_mask": torch.ones_like(completion),
        }

    times = []
    for _ in range(steps):
        batch = row()
        start = time.perf_counter()
        loss, _ = module.shared_step(batch, "train")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = sampler.stop()
    return {
        "weights_mib": weight_bytes / 2**20,
        "loaded_mib": loaded["total"],
        "loaded_anon_mib": loaded["anon"],
        "peak_mib": peak["total"],
        "peak_anon_mib": peak["anon"],
        "step_s": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantized", choices=["nf4", "int8"], default="nf4")
    parser.add_argument("--child", choices=sorted(CONFIGS))
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.child:
        pairs.emit(measure(args.model, args.child, args.steps, args.threads))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        save_word_level_model(directory, VOCAB, HIDDEN, LAYERS, INTERMEDIATE, heads=8)

        def command(name: str) -> list[str]:
            return [sys.executable, __file__, "--child", name, "--model", str(directory), "--steps", str(args.steps),
                    "--threads", str(args.threads)]  # fmt: skip

        comparison = pairs.run_pairs(command(args.quantized), command("fp32"), "peak_mib", pairs=args.pairs,
                                     names=(args.quantized, "fp32"))  # fmt: skip
    print(f"\nmodel: hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}; DPO + LoRA r={LORA['r']}, batch {BATCH}, "
          f"prompt {PROMPT} + completions {COMPLETION}; {args.pairs} pairs, {args.steps} steps each")
    for side, name in enumerate(comparison.names):
        def median(key: str, side: int = side) -> float:
            return comparison.median_of(side, key) or float("nan")

        print(f"{name:>5}: policy weights {median('weights_mib'):6.1f} MiB | built: RSS {median('loaded_mib'):6.0f} (anon "
              f"{median('loaded_anon_mib'):6.0f}) MiB | training peak: RSS {median('peak_mib'):6.0f} (anon "
              f"{median('peak_anon_mib'):6.0f}) MiB | step {median('step_s'):.2f} s")  # fmt: skip
    print(comparison.report("{:.0f}"))
    for label, key in (("policy weights", "weights_mib"), ("training peak anonymous RSS", "peak_anon_mib"), ("step time", "step_s")):
        ratios = [q[key] / f[key] for q, f in zip(comparison.runs_a, comparison.runs_b, strict=False) if key in q and key in f]
        if ratios:
            print(f"{args.quantized} / fp32, {label}: median {statistics.median(ratios):.3f} "
                  f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
