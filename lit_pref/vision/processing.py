"""A processor in the data pipeline: image placeholders expanded while tokenising, pixel values
while collating, and the per-prompt image inputs repeated for the concatenated forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from transformers import BatchEncoding

from lit_pref.vision.images import load_images


def image_token_id(processor: Any) -> int:
    """The id of the token that stands for one slot of image features (``<image>``, ``<|image_pad|>``)."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(token_id)


class ImageRowTokenizer:
    """The processor's tokenizer with one row's images bound to it, for :mod:`lit_pref.data.tokenize`.

    Text holding the processor's image placeholder encodes through the processor, which expands each
    placeholder into as many image tokens as that image has features; other text encodes with the
    tokenizer. Chat templates are the processor's (they render ``{"type": "image"}`` parts). Every
    other attribute is the tokenizer's.

    Args:
        processor: a ``transformers`` processor (``AutoProcessor``) with a tokenizer and an image processor.
        images: the row's images, in the order their placeholders appear.
    """

    def __init__(self, processor: Any, images: Sequence[Image.Image]) -> None:
        self.processor = processor
        self.images = list(images)

    @property
    def chat_template(self) -> str | None:
        return self.processor.chat_template or self.processor.tokenizer.chat_template

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        if tokenize:
            raise ValueError("ImageRowTokenizer renders text only; encode the text with the tokenizer itself")
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, text: str, add_special_tokens: bool = True) -> BatchEncoding:
        placeholders = text.count(self.processor.image_token)
        if placeholders == 0:
            return self.processor.tokenizer(text, add_special_tokens=add_special_tokens)
        if placeholders != len(self.images):
            # formats.normalise_row checks the counts; a template that adds placeholders of its own ends here.
            raise ValueError(
                f"the rendered text holds {placeholders} image placeholders for {len(self.images)} images"
            )
        encoded = self.processor(text=[text], images=self.images, add_special_tokens=add_special_tokens)
        return BatchEncoding({"input_ids": list(encoded["input_ids"][0])})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor.tokenizer, name)


def count_image_tokens(sequences: Sequence[Sequence[int]], token_id: int) -> int:
    """Image tokens in ``sequences`` (a prompt and its completions): truncation must keep all of them."""
    return sum(sum(1 for t in seq if t == token_id) for seq in sequences)


def collate_images(processor: Any, rows: Sequence[Any]) -> dict[str, Any]:
    """The batch's vision fields for the rows' ``images`` values (one entry per prompt).

    Returns ``vision_inputs`` (the image processor's tensors, e.g. ``pixel_values`` with one entry
    per image in row order, as the prompts' image tokens appear) and ``image_counts`` (``[B]``
    images per row); nothing when no row has an image.
    """
    per_row = [load_images(value) for value in rows]
    counts = torch.tensor([len(images) for images in per_row], dtype=torch.long)
    flat = [image for images in per_row for image in images]
    if not flat:
        return {}
    features = processor.image_processor(images=flat, return_tensors="pt")
    inputs = {key: value for key, value in features.items() if isinstance(value, Tensor)}
    return {"vision_inputs": inputs, "image_counts": counts}


def repeat_vision_inputs(inputs: dict[str, Tensor], image_counts: Tensor, k: int) -> dict[str, Tensor]:
    """The vision inputs of ``Bp`` prompts for their prompts repeated ``k`` times each (``repeat_interleave``)."""
    if k == 1:
        return inputs
    prompts = torch.arange(image_counts.shape[0], device=image_counts.device).repeat_interleave(k)
    return vision_inputs_of(inputs, image_counts, prompts)


def vision_of_prompts(inputs: dict[str, Tensor], image_counts: Tensor, prompt_rows: Tensor) -> dict[str, Any]:
    """The ``vision_inputs`` and ``image_counts`` of the prompts ``prompt_rows``: the two batch
    fields a sub-batch of those prompts carries."""
    return {
        "vision_inputs": vision_inputs_of(inputs, image_counts, prompt_rows),
        "image_counts": image_counts[prompt_rows.to(image_counts.device)],
    }


def vision_inputs_of(inputs: dict[str, Tensor], image_counts: Tensor, prompt_rows: Tensor) -> dict[str, Tensor]:
    """The vision inputs of the prompts ``prompt_rows`` (indices into the ``Bp`` prompts that
    ``image_counts`` counts images of, repeats allowed), in that order.

    Tensors hold one entry per image (``pixel_values``, ``image_sizes``, ``image_grid_thw``), or,
    with ``image_grid_thw``, one per patch (Qwen2-VL's flattened ``pixel_values``).
    """
    counts = image_counts.tolist()
    starts = [sum(counts[:i]) for i in range(len(counts))]
    per_image = torch.tensor(
        [image for i in prompt_rows.tolist() for image in range(starts[i], starts[i] + counts[i])],
        dtype=torch.long,
    )
    num_images = sum(counts)
    patches = inputs["image_grid_thw"].prod(-1) if "image_grid_thw" in inputs else None
    out = {}
    for key, value in inputs.items():
        if value.shape[0] == num_images:
            out[key] = value[per_image.to(value.device)]
        elif patches is not None and value.shape[0] == int(patches.sum()):
            ends = patches.cumsum(0).tolist()
            ranges = [torch.arange(ends[i] - int(patches[i]), ends[i]) for i in per_image.tolist()]
            out[key] = value[torch.cat(ranges).to(value.device)]
        else:
            raise ValueError(
                f"cannot select the vision input {key!r} (first dimension {value.shape[0]}) per prompt: "
                f"it is neither per image ({num_images}) nor per patch"
            )
    return out
