"""Items 2 and 3: a VLM in the shared log-prob path (vision encoder once per prompt, the prompt's
cache shared, equal to the concatenated forward with gradients), LoRA / freezing of the vision tower."""

from __future__ import annotations

import pytest
import torch

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.models import apply_lora, load_causal_lm
from lit_pref.ops import batch_logps
from lit_pref.vision import freeze_vision_tower, multimodal_decoder, task, vision_module_names


@pytest.fixture(scope="module")
def batch(tiny_vlm_dir):
    data = PreferenceDataModule(task.colour_preferences(train=6, test=1), tokenizer_name_or_path=str(tiny_vlm_dir),
                                target="paired", val_split=None, batch_size=3)  # fmt: skip
    data.setup()
    # Prompts of different lengths (left padding) and completions of different lengths.
    rows = [dict(data.splits["train"][i]) for i in range(3)]
    rows[1]["prompt_input_ids"] = rows[1]["prompt_input_ids"][:1] + rows[1]["prompt_input_ids"][3:]
    rows[2]["chosen_input_ids"] = rows[2]["chosen_input_ids"][:-2]
    return data.collator(rows)


def vision_calls(model) -> list[int]:
    calls: list[int] = []
    multimodal_decoder(model).vision_tower.register_forward_hook(
        lambda m, args, out: calls.append(args[0].shape[0])
    )
    return calls


def test_shared_prompt_equals_concatenated_forward_with_images(tiny_vlm_dir, batch):
    model = load_causal_lm(str(tiny_vlm_dir), "float32")
    calls = vision_calls(model)
    shared = batch_logps(model, batch)
    # One vision pass over the 3 prompts' images, none for the completions (their cache holds them).
    assert calls == [3]
    grads = torch.autograd.grad(shared.sum.sum(), [p for p in model.parameters()], allow_unused=True)
    concatenated = batch_logps(model, batch, share_prompt=False)
    assert calls == [3, 6]  # each of the 6 concatenated rows encodes its prompt's image
    torch.testing.assert_close(shared.token_logps, concatenated.token_logps, atol=1e-5, rtol=0)
    reference = torch.autograd.grad(
        concatenated.sum.sum(), [p for p in model.parameters()], allow_unused=True
    )
    vision_params = {id(p) for p in multimodal_decoder(model).vision_tower.parameters()}
    checked = 0
    for param, got, want in zip(model.parameters(), grads, reference, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            checked += id(param) in vision_params and bool(want.abs().sum() > 0)
    assert checked > 0  # the vision tower's gradients flow through the shared cache and match


def test_the_image_changes_the_log_probs(tiny_vlm_dir, batch):
    model = load_causal_lm(str(tiny_vlm_dir), "float32")
    with torch.no_grad():
        before = batch_logps(model, batch).sum
        other = {**batch, "vision_inputs": {"pixel_values": batch["vision_inputs"]["pixel_values"].flip(0)}}
        after = batch_logps(model, other).sum
    assert (before - after).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs image_counts"):
        batch_logps(model, {k: v for k, v in batch.items() if k != "image_counts"}, share_prompt=False)


def test_lora_on_the_language_model_only(tiny_vlm_dir):
    model = load_causal_lm(str(tiny_vlm_dir), "float32")
    assert vision_module_names(model) == ["vision_tower", "multi_modal_projector"]
    peft = apply_lora(model, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    lora = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n and ".language_model." in n for n in lora)
    # exclude_modules given: left as the user wrote it (here: LoRA on the vision tower's q_proj too).
    model = load_causal_lm(str(tiny_vlm_dir), "float32")
    peft = apply_lora(model, {"r": 4, "target_modules": ["q_proj"], "exclude_modules": []})
    assert any(".vision_tower." in n for n, p in peft.named_parameters() if p.requires_grad)


def test_freeze_vision_tower(tiny_vlm_dir):
    model = load_causal_lm(str(tiny_vlm_dir), "float32")
    assert freeze_vision_tower(model) == ["vision_tower", "multi_modal_projector"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("vision_tower" not in n and "projector" not in n for n in trainable)
    assert any("language_model" in n for n in trainable) and any("lm_head" in n for n in trainable)


def test_the_module_option_freezes_the_vision_tower(tiny_vlm_dir, tiny_lm_dir):
    from lit_pref.modules import DPO

    module = DPO(model_name_or_path=str(tiny_vlm_dir), freeze_vision_tower=True)
    module.configure_model()
    frozen = {n for n, p in module.policy.named_parameters() if not p.requires_grad}
    assert frozen and all("vision_tower" in n or "projector" in n for n in frozen)
    assert any("vision_tower" in n for n in frozen) and any("projector" in n for n in frozen)
    with pytest.raises(ValueError, match="no vision tower"):
        DPO(model_name_or_path=str(tiny_lm_dir), freeze_vision_tower=True).configure_model()


def test_image_tokens_without_pixels_fail_loudly(tiny_vlm_dir, batch):
    model = load_causal_lm(str(tiny_vlm_dir), "float32")
    with pytest.raises(ValueError, match="hold image tokens but the batch has no vision_inputs"):
        batch_logps(model, {k: v for k, v in batch.items() if k != "vision_inputs"})


def test_a_model_with_3d_positions_is_refused_not_mis_scored(tmp_path):
    from transformers import Qwen2VLConfig

    Qwen2VLConfig().save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="M-RoPE"):
        load_causal_lm(str(tmp_path), "float32")
