"""A tiny vision-language model and its processor, built locally.

A LLaVA-style model: a one-layer SigLIP vision tower over 16×16 images in 4×4 patches (16 image
tokens per image), a two-layer MLP projector and lit_pref's tiny Qwen2 language model, with a
processor around lit_pref's tiny tokenizer and a ChatML template that renders image parts. The
image processor is SigLIP's PIL/numpy one (no torchvision).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from lit_pref.tiny import build_tiny_tokenizer, tiny_config

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 16, 4

# lit_pref.tiny's ChatML template, with message content that is text or a list of parts.
VISION_CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_processor(
    corpus: Iterable[str] = (), image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE
) -> LlavaProcessor:
    """lit_pref's tiny tokenizer with an ``<image>`` token, a SigLIP image processor resizing to
    ``image_size`` pixels, and the vision ChatML template (on the tokenizer too)."""
    tokenizer = build_tiny_tokenizer(corpus)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = VISION_CHATML_TEMPLATE
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        chat_template=VISION_CHATML_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_tiny_vlm(
    processor: LlavaProcessor, seed: int = 0, hidden_size: int = 64, vision_hidden_size: int = 32
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA-style model matched to ``processor`` (about 160k parameters)."""
    import torch

    tokenizer = processor.tokenizer
    image_size = processor.image_processor.size["height"]
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=processor.patch_size,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=tiny_config(tokenizer, hidden_size=hidden_size),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.image_token_id = processor.image_token_id
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def save_tiny_vlm(directory: str | Path, corpus: Iterable[str] = (), seed: int = 0) -> Path:
    """Build the tiny VLM and its processor and save both (Hugging Face format) to ``directory``;
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` load them back."""
    directory = Path(directory)
    processor = build_tiny_processor(corpus)
    build_tiny_vlm(processor, seed=seed).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_pref.vision.tiny DIR``: write the tiny VLM the vision configs train."""
    import argparse

    from lit_pref.models import quiet_weight_bars
    from lit_pref.vision import task

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", help="output directory (Hugging Face format)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quiet_weight_bars()
    print(save_tiny_vlm(args.directory, task.corpus(), seed=args.seed))


if __name__ == "__main__":
    main()
