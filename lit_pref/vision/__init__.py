"""Vision-language preference training: images in rows, a processor in the data pipeline, a VLM in
the shared log-prob path, and a tiny offline VLM with a visual task."""

from lit_pref.vision.images import IMAGES_COLUMN, images_fingerprint, load_image, load_images
from lit_pref.vision.modeling import (
    freeze_vision_tower,
    is_vision_language,
    language_model_lora,
    multimodal_decoder,
    vision_module_names,
)
from lit_pref.vision.processing import (
    ImageRowTokenizer,
    collate_images,
    count_image_tokens,
    image_token_id,
    repeat_vision_inputs,
)

__all__ = [
    "IMAGES_COLUMN",
    "ImageRowTokenizer",
    "collate_images",
    "count_image_tokens",
    "freeze_vision_tower",
    "image_token_id",
    "images_fingerprint",
    "is_vision_language",
    "language_model_lora",
    "load_image",
    "load_images",
    "multimodal_decoder",
    "repeat_vision_inputs",
    "vision_module_names",
]
