"""Load the networks a module holds: policy, reference, reward, value; PEFT wrapping, QLoRA."""

from __future__ import annotations

import copy
import inspect
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from lit_pref.vision.modeling import check_positions_supported, is_vision_language, language_model_lora

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


# --- vision-language models (lit_pref.vision): their processor, their auto class.
def load_processor(source: str) -> Any:
    """A vision-language model's processor (``AutoProcessor``) from a hub id or local path, its
    tokenizer with a pad token guaranteed (as :func:`load_tokenizer`)."""
    from lit_pref.data.sources import check_local

    check_local(source, "processor")
    processor = AutoProcessor.from_pretrained(source)
    if getattr(processor, "image_processor", None) is None or not hasattr(processor, "image_token"):
        raise ValueError(
            f"{source!r} has no image processor with an image token (AutoProcessor gave {type(processor).__name__}); "
            "data with an 'images' column needs a vision-language model's processor"
        )
    processor.tokenizer = load_tokenizer(processor.tokenizer)
    return processor


def auto_model_class(source: str, trust_remote_code: bool = False) -> Any:
    """``AutoModelForImageTextToText`` for a vision-language model (its config nests a vision
    config), else ``AutoModelForCausalLM``."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not is_vision_language(config):
        return AutoModelForCausalLM
    check_positions_supported(config)
    return AutoModelForImageTextToText
# --- end vision-language models


def quiet_weight_bars() -> None:
    """Load and save weights without transformers' progress bars, in this process (a command's
    console; the library itself leaves them alone). Downloads keep huggingface_hub's bars: a
    real model takes minutes to fetch."""
    downloads_shown = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # turns off huggingface_hub's bars too…
    if downloads_shown:
        enable_progress_bars()  # …which the downloads keep


def quantization_config(settings: dict[str, Any]) -> Any:
    """transformers' ``BitsAndBytesConfig`` from its fields (4- or 8-bit), checked before loading."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "quantization needs bitsandbytes: pip install 'lit-pref[quantization]'"
        ) from error
    from transformers import BitsAndBytesConfig

    fields = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(f"quantization: unknown BitsAndBytesConfig field(s) {unknown}; known: {sorted(fields)}")
    if bool(settings.get("load_in_4bit")) == bool(settings.get("load_in_8bit")):
        raise ValueError("quantization needs exactly one of load_in_4bit: true or load_in_8bit: true")
    return BitsAndBytesConfig(**settings)


def load_causal_lm(
    source: str | PreTrainedModel,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    quantization: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A causal LM from a hub id or local path, quantized by bitsandbytes when ``quantization``
    holds ``BitsAndBytesConfig`` fields; a model object is returned as is."""
    if not isinstance(source, str):
        return source
    from lit_pref.data.sources import check_local

    check_local(source, "model")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    auto = auto_model_class(source, trust_remote_code)  # lit_pref.vision: a VLM's own auto class
    if quantization is None:
        return auto.from_pretrained(source, **kwargs)
    model = auto.from_pretrained(source, quantization_config=quantization_config(quantization), **kwargs)
    layers: list[Any] = list(quantized_layers(model).values())  # bitsandbytes' classes are untyped
    for module in layers:
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # bitsandbytes repacks a 4-bit CPU layer's weights, one way, the first time it runs in
            # eval mode without gradients (generation, the reference pass): the repacked layer
            # rounds its scales to bfloat16 and can no longer backpropagate.
            module.support_avx512bf16_for_cpu = False
    return model


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The bitsandbytes 4- and 8-bit linear layers of ``model`` by name (none without bitsandbytes)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the base under its PEFT wrapper) holds bitsandbytes-quantized weights."""
    # A PeftModel forwards unknown attributes to the model it wraps.
    return bool(getattr(model, "is_quantized", False))


def prepare_kbit_training(model: PreTrainedModel) -> PreTrainedModel:
    """PEFT's k-bit preparation of a quantized base before its adapter is added: every base
    weight frozen, the layers left unquantized (norms, embeddings) in float32 for stable
    updates. Activation checkpointing is set separately (:func:`enable_activation_checkpointing`)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


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
    if is_vision_language(getattr(model, "config", None)):  # lit_pref.vision: LoRA on the language model only
        config = language_model_lora(model, config)
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
    source: str,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    trainable: bool = True,
    quantization: dict[str, Any] | None = None,
) -> Any:
    """The base model named in an adapter directory (quantized when ``quantization`` is set, and
    prepared for k-bit training when ``trainable``), with that adapter loaded as ``default``."""
    from peft import PeftConfig, PeftModel

    base_source = PeftConfig.from_pretrained(source).base_model_name_or_path
    base = load_causal_lm(base_source, dtype, attn_implementation, quantization=quantization)
    if quantization is not None and trainable:
        base = prepare_kbit_training(base)
    return PeftModel.from_pretrained(base, source, adapter_name="default", is_trainable=trainable)


def merge_into_full_precision(model: Any, dtype: str = "auto", attn_implementation: str | None = None) -> Any:
    """The ``default`` adapter of a PEFT ``model`` on a quantized base, merged into a fresh
    full-precision copy of that base (loaded again from its source).

    The merged weights are base + adapter delta in full precision, not the quantized weights
    the adapter was trained against: the usual QLoRA export, whose outputs differ from the
    trained model's by the base's quantization error.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = copy.deepcopy(model.peft_config["default"])
    if not config.base_model_name_or_path:
        raise ValueError("the adapter does not name its base model, so there is no full-precision copy to merge into")
    base = load_causal_lm(config.base_model_name_or_path, dtype, attn_implementation)
    full = get_peft_model(base, config)
    set_peft_model_state_dict(full, get_peft_model_state_dict(model, adapter_name="default"))
    return full.merge_and_unload()
