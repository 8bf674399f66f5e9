"""Load the networks a module holds: policy, reference, reward, value; PEFT wrapping."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(source: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A tokenizer from a hub id or local path (or as given), with a pad token guaranteed.

    A tokenizer without a pad token gets EOS as its pad token, with a warning: the data pipeline
    masks by length, never by ``ids != pad``, so EOS stays a real label.
    """
    if isinstance(source, str):
        # Here, not at the top: lit_pref.data imports this module (the data module loads tokenizers).
        from lit_pref.data.sources import check_local

        check_local(source, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source) if isinstance(source, str) else source
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
        warnings.warn(
            f"the tokenizer {tokenizer.name_or_path!r} has no pad token; using its EOS token "
            f"{tokenizer.eos_token!r} for padding",
            stacklevel=2,
        )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quiet_weight_bars() -> None:
    """Load and save weights without transformers' progress bars, in this process (a command's
    console; the library itself leaves them alone). Downloads keep huggingface_hub's bars: a
    real model takes minutes to fetch."""
    downloads_shown = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # turns off huggingface_hub's bars too…
    if downloads_shown:
        enable_progress_bars()  # …which the downloads keep


def load_causal_lm(
    source: str | PreTrainedModel,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM from a hub id or local path; a model object is returned as is."""
    if not isinstance(source, str):
        return source
    from lit_pref.data.sources import check_local

    check_local(source, "model")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0: preference losses compare two forward passes.

    Besides ``nn.Dropout`` modules, attention implementations read a float attribute
    (``attention_dropout`` in Llama / Qwen2 / Mistral…) and the config's ``*dropout`` fields.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout", "dropout_rate"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for name, value in config.to_dict().items():
                if "dropout" in name and isinstance(value, float):
                    setattr(config, name, 0.0)


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    Non-reentrant checkpointing, which works with frozen embeddings and LoRA. transformers 5.23
    renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
    name warns); earlier releases have only the old one.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze ``model`` in eval mode (a reference or reward network)."""
    model.requires_grad_(False)
    model.eval()
    return model


def apply_lora(model: PreTrainedModel, peft_config: dict[str, Any], adapter_name: str = "default") -> Any:
    """Wrap ``model`` with a new LoRA adapter described by ``peft_config`` (``LoraConfig`` fields)."""
    from peft import LoraConfig, get_peft_model

    config = dict(peft_config)
    config.setdefault("task_type", "CAUSAL_LM")
    return get_peft_model(model, LoraConfig(**config), adapter_name=adapter_name)


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def is_adapter_dir(source: object) -> bool:
    """Whether ``source`` is a local directory holding a PEFT adapter."""
    return isinstance(source, str) and (Path(source) / "adapter_config.json").is_file()


def load_adapter_model(
    source: str, dtype: str = "auto", attn_implementation: str | None = None, trainable: bool = True
) -> Any:
    """The base model named in an adapter directory, with that adapter loaded as ``default``."""
    from peft import PeftConfig, PeftModel

    base = load_causal_lm(PeftConfig.from_pretrained(source).base_model_name_or_path, dtype, attn_implementation)
    return PeftModel.from_pretrained(base, source, adapter_name="default", is_trainable=trainable)
