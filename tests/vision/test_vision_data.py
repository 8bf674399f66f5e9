"""Item 1 and the truncation half of item 3: images in rows, the processor's template, the
prompt / completion split in token space, every data shape, image tokens never cut."""

from __future__ import annotations

import io

import pytest
import torch
from datasets import Dataset, Image, List
from PIL import Image as PILImage

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.data.formats import DataFormatError
from lit_pref.vision import (
    collate_images,
    image_token_id,
    images_fingerprint,
    load_images,
    repeat_vision_inputs,
    task,
)

IMAGE_TOKENS = 16  # 16×16 pixels in 4×4 patches


def red(shade: int = 0) -> PILImage.Image:
    return PILImage.new("RGB", (16, 16), (200, shade, 0))


def test_every_image_form_loads_to_the_same_pixels(tmp_path):
    image = red(7)
    path = tmp_path / "a.png"
    image.save(path)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    forms = [
        image,
        str(path),
        path,
        encoded.getvalue(),
        {"bytes": encoded.getvalue(), "path": None},
        {"bytes": None, "path": str(path)},
    ]
    for form in forms:
        (loaded,) = load_images(form)
        assert loaded.mode == "RGB" and loaded.tobytes() == image.tobytes(), form
    assert len(load_images([image, str(path)])) == 2 and load_images(None) == []
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_images(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="PIL image, a file path"):
        load_images(3)


def test_images_fingerprint_follows_pixels_and_rows():
    assert images_fingerprint([[red(1)], [red(2)]]) == images_fingerprint([[red(1)], [red(2)]])
    assert images_fingerprint([[red(1)], [red(2)]]) != images_fingerprint([[red(1)], [red(3)]])
    assert images_fingerprint([[red(1), red(2)], []]) != images_fingerprint([[red(1)], [red(2)]])


def data(rows, tiny_vlm_dir, target, **kwargs):
    module = PreferenceDataModule(
        rows if not isinstance(rows, list) else Dataset.from_list(rows),
        tokenizer_name_or_path=str(tiny_vlm_dir),
        target=target,
        val_split=None,
        batch_size=4,
        **kwargs,
    )
    module.setup()
    return module


@pytest.mark.parametrize("target", ["paired", "unpaired", "prompt_only", "sft"])
def test_every_shape_tokenises_and_batches_its_images(tiny_vlm_dir, processor, target):
    source = {"paired": task.colour_preferences, "unpaired": task.colour_feedback, "prompt_only": task.colour_prompts,
              "sft": task.colour_sft}[target](train=8, test=1)["train"]  # fmt: skip
    module = data(source, tiny_vlm_dir, target)
    row = module.splits["train"][0]
    image = image_token_id(processor)
    assert row["prompt_input_ids"].count(image) == IMAGE_TOKENS
    # The prompt is the rendered prompt with its generation prompt, in token space.
    text = processor.apply_chat_template(source[0]["prompt"], add_generation_prompt=True, tokenize=False)
    assert processor.tokenizer.decode(row["prompt_input_ids"]) == text.replace(
        "<image>", "<image>" * IMAGE_TOKENS
    )
    batch = next(iter(module.train_dataloader()))
    assert batch["vision_inputs"]["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["image_counts"].tolist() == [1, 1, 1, 1]
    expected = processor.image_processor(
        images=[load_images(i)[0] for i in batch["images"]], return_tensors="pt"
    )
    torch.testing.assert_close(batch["vision_inputs"]["pixel_values"], expected["pixel_values"])
    if target != "prompt_only":
        completion = row["chosen_input_ids"] if target == "paired" else row["completion_input_ids"]
        assert image not in completion and completion[-2] == processor.tokenizer.eos_token_id


def test_datasets_image_feature_file_paths_and_bytes(tiny_vlm_dir, tmp_path):
    """The ``datasets`` Image feature (a list per row), file paths and raw bytes give the same tokens and pixels."""
    rows = task.colour_preferences(train=4, test=1)["train"]
    paths, raw = [], []
    for i, row in enumerate(rows):
        path = tmp_path / f"{i}.png"
        row["images"][0].save(path)
        paths.append([str(path)])
        raw.append([path.read_bytes()])
    as_paths = rows.remove_columns("images").add_column("images", paths)
    as_bytes = rows.remove_columns("images").add_column("images", raw)
    assert rows.features["images"] == List(Image())
    batches = [
        next(iter(data(d, tiny_vlm_dir, "paired").train_dataloader())) for d in (rows, as_paths, as_bytes)
    ]
    for batch in batches[1:]:
        assert torch.equal(batch["prompt_input_ids"], batches[0]["prompt_input_ids"])
        torch.testing.assert_close(
            batch["vision_inputs"]["pixel_values"], batches[0]["vision_inputs"]["pixel_values"]
        )


def test_image_parts_and_images_must_match(tiny_vlm_dir):
    row = task.colour_preferences(train=1, test=1)["train"][0]
    with pytest.raises(DataFormatError, match="1 image parts but column 'images' holds 2 images"):
        data([{**row, "images": [red(), red()]}], tiny_vlm_dir, "paired")
    bad_answer = [{"role": "assistant", "content": [{"type": "image", "text": None}]}]
    with pytest.raises(DataFormatError, match="'rejected' holds image parts; images belong in the prompt"):
        data([{**row, "rejected": bad_answer}], tiny_vlm_dir, "paired")
    with pytest.raises(DataFormatError, match="expected str or a list of"):
        data(
            [{**row, "chosen": [{"role": "assistant", "content": [{"type": "text"}]}]}],
            tiny_vlm_dir,
            "paired",
        )


def test_text_rows_without_a_processor_source_error(tiny_lm_dir):
    rows = task.colour_preferences(train=2, test=1)["train"]
    with pytest.raises(ValueError, match="image processor"):
        PreferenceDataModule(
            rows, tokenizer_name_or_path=str(tiny_lm_dir), target="paired", val_split=None
        ).setup()


def test_truncation_never_cuts_into_image_tokens(tiny_vlm_dir, processor):
    rows = task.colour_preferences(train=8, test=1)["train"]
    # The prompt is 33 tokens, 16 of them the image's: keep_end to 24 would cut the image in two.
    with pytest.raises(DataFormatError, match="no train rows left after truncation"):
        data(rows, tiny_vlm_dir, "paired", max_prompt_length=24, max_length=64, truncation_mode="keep_end")
    # A limit that cuts only text (keep_start keeps the image at the front) keeps every row.
    module = data(
        rows, tiny_vlm_dir, "paired", max_prompt_length=30, max_length=64, truncation_mode="keep_start"
    )
    assert module.counts["train"]["cut_image"] == 0 and module.counts["train"]["truncated_prompt"] == 8
    assert all(
        r.count(image_token_id(processor)) == IMAGE_TOKENS for r in module.splits["train"]["prompt_input_ids"]
    )
    # Half the rows have a longer question: only those lose image tokens, and are counted and dropped.
    long = rows.map(lambda r, i: {"prompt": [{**r["prompt"][0], "content": [r["prompt"][0]["content"][0], {
        "type": "text", "text": task.QUESTION * (3 if i % 2 else 1)}]}]}, with_indices=True)  # fmt: skip
    module = data(
        long, tiny_vlm_dir, "paired", max_prompt_length=40, max_length=64, truncation_mode="keep_end"
    )
    assert module.counts["train"]["cut_image"] == 4 and len(module.splits["train"]) == 4
    with pytest.raises(DataFormatError, match="longer than the limits"):
        data(long, tiny_vlm_dir, "paired", max_prompt_length=40, max_length=64, truncation_mode="error")


def test_repeat_vision_inputs_follows_the_prompts():
    pixels = torch.arange(3.0)[:, None].expand(3, 4)  # image i is filled with i
    counts = torch.tensor([2, 0, 1])
    out = repeat_vision_inputs({"pixel_values": pixels}, counts, 2)["pixel_values"][:, 0].tolist()
    assert out == [0, 1, 0, 1, 2, 2]
    grid = torch.tensor([[1, 1, 2], [1, 1, 1]])  # Qwen2-VL: 2 and 1 patches, flattened
    patches = torch.tensor([[10.0], [11.0], [20.0]])
    out = repeat_vision_inputs({"pixel_values": patches, "image_grid_thw": grid}, torch.tensor([1, 1]), 2)
    assert out["pixel_values"][:, 0].tolist() == [10, 11, 10, 11, 20, 20] and out["image_grid_thw"].shape == (
        4,
        3,
    )
    assert collate_images(None, [None, []]) == {}
