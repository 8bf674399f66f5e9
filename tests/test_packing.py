"""Padding-free batches of pairs and unpaired rows (``packing: true``): each prompt once, then its
completions, in a few packed sequences. Every paired and unpaired module gets the same loss and
the same gradients as from the padded layout, on rows of very different lengths."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules import BCO, CPO, DPO, KTO, ORPO

WORDS = ["the", "day", "is", "warm", "and", "good", "a", "cold", "night", "feels", "long", "bright", "friends", "laugh", "together"]


def skewed_rows(n: int, seed: int = 0) -> list[dict]:
    """Preference rows whose prompts (2–40 words) and completions (1–30 words) differ widely in length."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    return [{"prompt": text(2, 40), "chosen": text(1, 30), "rejected": text(1, 30)} for _ in range(n)]


ROWS = skewed_rows(6)
MODULES = {
    "dpo": (DPO, {}, "paired"),
    "ipo": (DPO, {"loss_type": "ipo"}, "paired"),
    "dpo_no_shared_prompt": (DPO, {"share_prompt": False}, "paired"),
    "cpo": (CPO, {}, "paired"),
    "simpo": (CPO, {"loss_type": "simpo"}, "paired"),
    "orpo": (ORPO, {}, "paired"),
    "kto": (KTO, {}, "unpaired"),
    "bco": (BCO, {}, "unpaired"),
}


def batch_of(module, target: str, packing: bool, max_length: int = 96) -> dict:
    data = PreferenceDataModule(
        Dataset.from_list(ROWS), target=target, batch_size=len(ROWS) * 2, val_split=None, packing=packing,
        max_length=max_length,
    )  # fmt: skip
    data._tokenizer = module.tokenizer
    data.setup("fit")
    return next(iter(data.sequential_dataloader("train")))


def build(name: str, model_dir, attn: str):
    module_cls, kwargs, target = MODULES[name]
    torch.manual_seed(0)
    module = module_cls(model_name_or_path=str(model_dir), dtype="float32", attn_implementation=attn, **kwargs)
    module.configure_model()
    if hasattr(module, "reference"):
        module.reference.build(module.policy, module.load_network)
    return module, target


def loss_and_grads(module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.policy.zero_grad(set_to_none=True)
    # "val": no running state (BCO's reward shift) moves between the two calls.
    loss, _ = module.shared_step(batch, "val")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_packed_loss_and_gradients_equal_the_padded_ones(name, attn, tiny_lm_dir):
    module, target = build(name, tiny_lm_dir, attn)
    padded, packed = batch_of(module, target, packing=False), batch_of(module, target, packing=True)
    # The packed layout computes fewer positions than the padded one (no padding, prompts once).
    padded_positions = padded["prompt_input_ids"].numel() + padded["completion_input_ids"].numel()
    assert int(packed["packed_sequence_ids"].ge(0).sum()) < 0.8 * padded_positions
    loss_padded, grads_padded = loss_and_grads(module, padded)
    loss_packed, grads_packed = loss_and_grads(module, packed)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=0, atol=1e-5)
    assert grads_padded.keys() == grads_packed.keys() and grads_padded
    assert max(float(g.abs().max()) for g in grads_padded.values()) > 1e-3  # gradients that can differ
    for key, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[key], grad, rtol=0, atol=1e-5, msg=key)


def test_without_the_branch_mask_the_rejected_completion_would_see_the_chosen(tiny_lm_dir):
    """The equality above can fail: a mask that lets a prompt's completions see each other changes
    the rejected completions' log-probs (and only theirs)."""
    module, target = build("dpo", tiny_lm_dir, "sdpa")
    packed = batch_of(module, target, packing=True)
    with torch.no_grad():
        chosen, rejected = module.logps(module.policy, packed).pairs()
        one_branch = torch.where(packed["packed_branch_ids"] >= 0, 0, -1)
        leaky_chosen, leaky_rejected = module.logps(module.policy, dict(packed, packed_branch_ids=one_branch)).pairs()
    torch.testing.assert_close(leaky_chosen.sum, chosen.sum, rtol=0, atol=1e-5)
    assert float((leaky_rejected.sum - rejected.sum).abs().min()) > 1e-4


def test_pairs_need_the_mask_not_position_ids(tiny_lm_dir):
    module, target = build("dpo", tiny_lm_dir, "sdpa")
    packed = batch_of(module, target, packing=True)
    with pytest.raises(ValueError, match="need the attention mask"):
        module.logps(module.policy, packed, packed_attention="position_ids")


@pytest.mark.parametrize("window", [8, 4096])
def test_a_sliding_window_shorter_than_the_packed_rows_is_refused(window, tokenizer, tmp_path):
    from lit_pref.tiny import build_tiny_causal_lm

    build_tiny_causal_lm(tokenizer, sliding_window=window).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module, target = build("dpo", tmp_path, "sdpa")
    padded, packed = batch_of(module, target, packing=False), batch_of(module, target, packing=True)
    if window < packed["packed_input_ids"].shape[1]:
        with pytest.raises(ValueError, match="longer than the model's sliding attention window"):
            loss_and_grads(module, packed)
    else:  # every token's whole example lies within the window: the packed mask is exact
        torch.testing.assert_close(loss_and_grads(module, packed)[0], loss_and_grads(module, padded)[0], rtol=0, atol=1e-5)


def test_a_packed_dpo_run_matches_the_padded_run_step_for_step(tiny_lm_dir, tmp_path):
    """Through the data module and the Trainer: the same weights after three optimizer steps."""
    import lightning as L

    def fit(packing: bool):
        L.seed_everything(0)
        module = DPO(model_name_or_path=str(tiny_lm_dir), dtype="float32", optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        data = PreferenceDataModule(Dataset.from_list(skewed_rows(12, seed=1)), batch_size=4, val_split=None,
                                    packing=packing, max_length=96)  # fmt: skip
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(module, data)
        return dict(module.policy.named_parameters())

    padded, packed = fit(False), fit(True)
    start = DPO(model_name_or_path=str(tiny_lm_dir), dtype="float32")
    start.configure_model()
    moved = max(float((padded[n] - p).abs().max()) for n, p in start.policy.named_parameters())
    assert moved > 1e-3
    for name, weight in padded.items():
        torch.testing.assert_close(packed[name], weight, rtol=0, atol=1e-5, msg=name)
