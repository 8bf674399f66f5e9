"""The random models the benchmarks train: a Qwen2-style network and a word-level tokenizer
(``w0``, ``w1`` … are single tokens, so a row of k words is exactly k tokens)."""

from __future__ import annotations

from pathlib import Path


def save_word_level_model(
    directory: Path, vocab: int, hidden: int, layers: int, intermediate: int, heads: int = 4, kv_heads: int = 2
) -> None:
    """Save a randomly initialised Qwen2 causal LM to ``directory`` and its tokenizer to
    ``directory / "tokenizer"`` (pass that as ``tokenizer_name_or_path``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32_768,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(directory)
    # Apart from the model: next to a qwen2 config, AutoTokenizer would rebuild it as a BPE tokenizer.
    tokenizer.save_pretrained(directory / "tokenizer")
