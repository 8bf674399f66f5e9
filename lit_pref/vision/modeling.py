"""Vision-language models in the shared log-prob path: the multimodal decoder, the vision tower,
LoRA on the language model only."""

from __future__ import annotations

import re
from typing import Any

import torch


def is_vision_language(config: Any) -> bool:
    """Whether a model configuration describes a vision-language model (it nests a vision config)."""
    return getattr(config, "vision_config", None) is not None


# Vision-language models that always position their tokens in 3-D (M-RoPE), whatever the config says.
MROPE_MODEL_TYPES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe"}


def check_positions_supported(config: Any) -> None:
    """Refuse a vision-language model whose language model takes 3-D (M-RoPE) positions
    (Qwen2-VL, Qwen2.5-VL): the shared log-prob path builds 1-D positions, which would silently
    give such a model wrong log-probs."""
    text_config = config.get_text_config()
    ropes = [getattr(text_config, name, None) for name in ("rope_scaling", "rope_parameters")]
    mrope = any(isinstance(rope, dict) and "mrope_section" in rope for rope in ropes)
    if mrope or config.model_type in MROPE_MODEL_TYPES:
        raise NotImplementedError(
            f"{config.model_type} positions its image tokens in 3-D (M-RoPE), which lit_pref's log-prob "
            "path does not build yet; LLaVA-style models (llava, llava_next, llava_onevision, idefics3…) are supported"
        )


def _unwrapped(model: Any) -> Any:
    # A PEFT model's own ``.model`` is its tuner (LoraModel), not the transformers model.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def multimodal_decoder(model: Any) -> Any:
    """The decoder half of a vision-language model (``LlavaModel``, ``Qwen2VLModel``…): it takes
    ``pixel_values`` with the token ids, encodes the images and returns the language model's
    hidden states (and KV cache). ``None`` for a text-only model."""
    base = _unwrapped(model)
    if not is_vision_language(getattr(base, "config", None)):
        return None
    return getattr(base, base.base_model_prefix)


def vision_module_names(model: Any) -> list[str]:
    """Names (within the multimodal decoder) of the modules that are not the language model: the
    vision tower and the projector into the language model's embeddings."""
    decoder = multimodal_decoder(model)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} is not a vision-language model")
    language_model = decoder.get_decoder()
    return [name for name, child in decoder.named_children() if child is not language_model]


def freeze_vision_tower(model: Any) -> list[str]:
    """Freeze the vision tower and projector of ``model`` (full fine-tuning of the language model
    only); returns the frozen modules' names."""
    decoder = multimodal_decoder(model)
    names = vision_module_names(model)
    assert decoder is not None
    for name in names:
        decoder.get_submodule(name).requires_grad_(False)
    return names


def language_model_lora(model: Any, peft_config: dict[str, Any]) -> dict[str, Any]:
    """``peft_config`` for a vision-language ``model`` with LoRA kept out of the vision tower and the
    projector (``exclude_modules``), unless the config already says what to exclude."""
    if "exclude_modules" in peft_config:
        return peft_config
    alternatives = "|".join(re.escape(name) for name in vision_module_names(model))
    return {**peft_config, "exclude_modules": rf"(.*\.)?({alternatives})(\..*)?"}


def check_vision_inputs(decoder: torch.nn.Module, prompt_input_ids: torch.Tensor, vision_inputs: Any) -> None:
    """Raise when prompts hold image tokens but no image inputs came with them: the model would
    embed the placeholder token itself in place of the image features, with no error of its own."""
    token = getattr(getattr(decoder, "config", None), "image_token_id", None)
    if not vision_inputs and token is not None and bool((prompt_input_ids == token).any()):
        raise ValueError(
            "the prompts hold image tokens but the batch has no vision_inputs (pixel values); a batch built "
            "from another one must carry its vision_inputs and image_counts along"
        )
