"""Tiny models and tokenizers built entirely locally.

Tests, the quickstart and ``make demo`` run with no hub access, so they build a byte-level BPE
tokenizer (with a ChatML chat template) and a small Qwen2-style network on the spot. Real runs
pass a hub id or a local path instead; nothing here is needed for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

BOS, EOS, PAD, IM_START = "<|bos|>", "<|im_end|>", "<|pad|>", "<|im_start|>"

# The template itself emits the BOS token, as Llama 3's does: a tokenizer that also adds BOS when
# encoding would duplicate it, which is exactly the trap the data pipeline must avoid.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_BASE_CORPUS = (
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: Can you help me write a poem?\n\nAssistant: Of course, here is a short poem.",
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{}<>-_+=*/\\|@#$%^&~`",
    "system user assistant prompt completion chosen rejected label text messages role content",
)


def build_tiny_tokenizer(
    corpus: Iterable[str] = (), vocab_size: int = 512, pad_equals_eos: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in well under a second on ``corpus``.

    Byte-level means any text encodes (no unknown tokens). It adds BOS when encoding, like
    Llama's, and carries a ChatML chat template.

    Args:
        corpus: extra text to learn merges from (the task's own text keeps sequences short).
        vocab_size: target vocabulary size including the special tokens.
        pad_equals_eos: make the pad token the EOS token, as many released tokenizers do.
    """
    specials = [BOS, EOS, PAD, IM_START]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*_BASE_CORPUS, *corpus], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS if pad_equals_eos else PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2, sliding_window: int | None = None
) -> Qwen2Config:
    """A Qwen2 configuration a few hundred kilobytes in size, matched to ``tokenizer``; with
    ``sliding_window``, every layer attends through a window of that many tokens."""
    return Qwen2Config(
        use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window,
        max_window_layers=0,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config_kwargs) -> Qwen2ForCausalLM:
    """A randomly initialised causal LM with a few layers and hidden size ≤ 64."""
    import torch

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_config(tokenizer, **config_kwargs))


def build_tiny_sequence_classifier(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config_kwargs
) -> Qwen2ForSequenceClassification:
    """A randomly initialised one-output sequence classifier (a reward model)."""
    import torch

    torch.manual_seed(seed)
    config = tiny_config(tokenizer, **config_kwargs)
    config.num_labels = 1
    return Qwen2ForSequenceClassification(config)


def save_tiny_model(
    directory: str | Path, corpus: Iterable[str] = (), kind: str = "causal_lm", seed: int = 0, **kwargs
) -> Path:
    """Build a tiny tokenizer and model and save both (Hugging Face format) to ``directory``.

    Args:
        directory: where to write; loadable with ``from_pretrained`` afterwards.
        corpus: text for the tokenizer's merges.
        kind: ``"causal_lm"`` or ``"sequence_classifier"``.
        seed: weight initialisation seed.
    """
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer(corpus, **{k: v for k, v in kwargs.items() if k == "pad_equals_eos"})
    config_kwargs = {k: v for k, v in kwargs.items() if k != "pad_equals_eos"}
    builders = {"causal_lm": build_tiny_causal_lm, "sequence_classifier": build_tiny_sequence_classifier}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}, got {kind!r}")
    model = builders[kind](tokenizer, seed=seed, **config_kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_pref.tiny DIR``: write the tiny model the shipped configs train."""
    import argparse

    from lit_pref import tasks
    from lit_pref.models import quiet_weight_bars

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", help="output directory (Hugging Face format)")
    parser.add_argument("--kind", default="causal_lm", choices=("causal_lm", "sequence_classifier"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quiet_weight_bars()
    print(save_tiny_model(args.directory, tasks.corpus(), kind=args.kind, seed=args.seed))



def save_tiny_vlm(directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny vision-language model (LLaVA-style) and its processor for the shipped visual
    task and save both to ``directory`` (see :mod:`lit_pref.vision.tiny`; also
    ``python -m lit_pref.vision.tiny DIR``)."""
    from lit_pref.vision import task
    from lit_pref.vision.tiny import save_tiny_vlm as save

    return save(directory, task.corpus(), seed=seed)


def save_tiny_diffusion_pipeline(directory: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Build a tiny text-to-image pipeline (UNet, VAE, CLIP text encoder and tokenizer, DDIM) and
    save it to ``directory`` (see :mod:`lit_pref.diffusion.tiny`; also
    ``python -m lit_pref.diffusion.tiny DIR``; needs the ``diffusion`` extra)."""
    from lit_pref.diffusion.tiny import build_tiny_pipeline

    return build_tiny_pipeline(directory, seed=seed, sample_size=sample_size)


if __name__ == "__main__":
    main()
