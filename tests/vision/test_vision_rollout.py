"""GRPO's rollouts from image prompts: the built-in engine encodes each prompt's image in its
prefill and decodes exactly what ``generate`` with the pixel values decodes; the rollout keeps the
images with their prompts when it is split into mini-batches."""

from __future__ import annotations

import torch
from datasets import Dataset

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.engines import GenerateEngine, GenerationSettings
from lit_pref.models import load_causal_lm, load_processor
from lit_pref.rollout import generate_rollout
from lit_pref.vision import task


def prompt_batch(tiny_vlm_dir, n: int = 4) -> dict:
    rows = [row for row in task.colour_prompts(train=n, test=1)["train"]]
    data = PreferenceDataModule(Dataset.from_list(rows), target="prompt_only", batch_size=n, val_split=None,
                                tokenizer_name_or_path=str(tiny_vlm_dir))  # fmt: skip
    data.setup("fit")
    return next(iter(data.sequential_dataloader("train")))


def test_greedy_samples_from_image_prompts_equal_generate_with_pixel_values(tiny_vlm_dir):
    model = load_causal_lm(str(tiny_vlm_dir), "float32").eval()
    tokenizer = load_processor(str(tiny_vlm_dir)).tokenizer
    batch = prompt_batch(tiny_vlm_dir)
    settings = GenerationSettings(max_new_tokens=6, top_k=1)
    for share_prompt in (True, False):
        samples = GenerateEngine(share_prompt=share_prompt, completions_per_call=4).sample(
            model, batch["prompt_input_ids"], batch["prompt_attention_mask"], 2, settings, tokenizer,
            vision_inputs=batch["vision_inputs"], image_counts=batch["image_counts"],
        )  # fmt: skip
        for i in range(batch["prompt_input_ids"].shape[0]):
            mask = batch["prompt_attention_mask"][i].bool()
            expected = model.generate(
                input_ids=batch["prompt_input_ids"][i][mask][None], pixel_values=batch["vision_inputs"]["pixel_values"][i : i + 1],
                max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )[0, int(mask.sum()) :]  # fmt: skip
            for row in (2 * i, 2 * i + 1):
                got = samples.completion_input_ids[row][samples.completion_attention_mask[row].bool()]
                assert got.tolist() == expected[: got.numel()].tolist()
    # The images matter: the same prompts with each other's images decode differently.
    swapped = dict(batch["vision_inputs"], pixel_values=batch["vision_inputs"]["pixel_values"].flip(0))
    other = GenerateEngine().sample(model, batch["prompt_input_ids"], batch["prompt_attention_mask"], 1, settings,
                                    tokenizer, vision_inputs=swapped, image_counts=batch["image_counts"])  # fmt: skip
    assert not torch.equal(other.completion_input_ids, samples.completion_input_ids[::2])


def test_a_rollout_split_into_mini_batches_keeps_each_prompt_with_its_image(tiny_vlm_dir):
    model = load_causal_lm(str(tiny_vlm_dir), "float32").eval()
    tokenizer = load_processor(str(tiny_vlm_dir)).tokenizer
    batch = prompt_batch(tiny_vlm_dir)
    rollout = generate_rollout(GenerateEngine(), model, batch, GenerationSettings(max_new_tokens=3), tokenizer, 2)
    pixels = batch["vision_inputs"]["pixel_values"]
    for rows in (torch.tensor([2, 0]), torch.tensor([3])):
        part = rollout.select(rows)
        assert torch.equal(part.vision_inputs["pixel_values"], pixels[rows])
        assert part.batch()["image_counts"].tolist() == [1] * rows.numel()
    assert "vision_inputs" not in rollout.columns and "images" in rollout.columns  # rewards see the raw images
