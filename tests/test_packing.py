"""Padding-free batches of pairs and unpaired rows (``packing: true``): each prompt once, then its
completions, in a few packed sequences. Every paired and unpaired module gets the same loss and
the same gradients as from the padded layout, on rows of very different lengths, through span
attention (sdpa) and the dense block-causal mask (eager; sdpa with ``packed_attention="mask"``)."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset

from lit_pref.attention import SPAN_SDPA, packed_spans
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules import BCO, CPO, DPO, KTO, ORPO
from lit_pref.ops import attention_implementation, batch_logps, block_causal_mask, decoder_and_head

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


def build(name: str, model_dir, attn: str, packed_attention: str = "auto"):
    module_cls, kwargs, target = MODULES[name]
    torch.manual_seed(0)
    module = module_cls(
        model_name_or_path=str(model_dir), dtype="float32", attn_implementation=attn, packed_attention=packed_attention, **kwargs
    )
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


def assert_packed_equals_padded(module, padded: dict, packed: dict) -> torch.Tensor:
    """The packed batch's loss and every policy gradient equal the padded one's (1e-5), among
    gradients large enough to differ; returns the packed loss."""
    loss_padded, grads_padded = loss_and_grads(module, padded)
    loss_packed, grads_packed = loss_and_grads(module, packed)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=0, atol=1e-5)
    assert grads_padded.keys() == grads_packed.keys() and grads_padded
    assert max(float(g.abs().max()) for g in grads_padded.values()) > 1e-3  # gradients that can differ
    for key, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[key], grad, rtol=0, atol=1e-5, msg=key)
    return loss_packed


@pytest.mark.parametrize(("attn", "packed_attention"), [("sdpa", "auto"), ("sdpa", "mask"), ("eager", "auto")])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_packed_loss_and_gradients_equal_the_padded_ones(name, attn, packed_attention, tiny_lm_dir):
    module, target = build(name, tiny_lm_dir, attn, packed_attention)
    assert attention_implementation(module.policy) == attn
    padded, packed = batch_of(module, target, packing=False), batch_of(module, target, packing=True)
    # The packed layout computes fewer positions than the padded one (no padding, prompts once).
    padded_positions = padded["prompt_input_ids"].numel() + padded["completion_input_ids"].numel()
    assert int(packed["packed_sequence_ids"].ge(0).sum()) < 0.8 * padded_positions
    assert_packed_equals_padded(module, padded, packed)
    # auto on sdpa switched the model to span attention (lit_pref.attention); mask and eager did not.
    switched = attention_implementation(module.policy) == SPAN_SDPA
    assert switched == ((attn, packed_attention) == ("sdpa", "auto"))


@pytest.mark.parametrize("packed_attention", ["spans", "mask"])
def test_without_the_branch_mask_the_rejected_completion_would_see_the_chosen(tiny_lm_dir, packed_attention):
    """The equality above can fail: attention that lets a prompt's completions see each other
    changes the rejected completions' log-probs (and only theirs)."""
    module, target = build("dpo", tiny_lm_dir, "sdpa", packed_attention)
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
    with pytest.raises(ValueError, match="need packed_attention: spans or mask"):
        module.logps(module.policy, packed, packed_attention="position_ids")


@pytest.mark.parametrize("packed_attention", ["spans", "mask"])
@pytest.mark.parametrize("window", [8, 4096])
def test_sliding_windows_apply_within_each_packed_example(window, packed_attention, tokenizer, tmp_path):
    """Span attention bands each example by the window; the dense mask cannot, and refuses rows longer than it."""
    from lit_pref.tiny import build_tiny_causal_lm

    build_tiny_causal_lm(tokenizer, sliding_window=window).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module, target = build("dpo", tmp_path, "sdpa", packed_attention)
    padded, packed = batch_of(module, target, packing=False), batch_of(module, target, packing=True)
    longest = packed_spans(packed["packed_sequence_ids"], packed["packed_branch_ids"]).longest
    if packed_attention == "mask" and window < longest:
        with pytest.raises(ValueError, match="more than the model's sliding attention window"):
            loss_and_grads(module, packed)
        return
    loss_packed = assert_packed_equals_padded(module, padded, packed)
    if packed_attention == "spans":  # masks per piece only: transformers builds no [R, 1, T, T] one for the rows
        masks: list = []
        hooks = [
            layer.self_attn.register_forward_pre_hook(lambda _, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
            for layer in module.policy.model.layers
        ]  # fmt: skip
        with torch.no_grad():
            module.logps(module.policy, packed)
        for hook in hooks:
            hook.remove()
        assert len(masks) == len(module.policy.model.layers) and all(mask is None for mask in masks)
    if window == 8:  # the window changes the loss: the equality above holds only with it applied
        module.policy.config.sliding_window = 1 << 20  # longer than any example: no band
        for layer in module.policy.model.layers:
            layer.self_attn.sliding_window = 1 << 20
        with torch.no_grad():
            assert abs(float(module.shared_step(packed, "val")[0]) - float(loss_packed)) > 1e-4


def test_span_attention_refuses_a_sliding_window_it_is_not_given(tokenizer, tmp_path):
    from lit_pref.tiny import build_tiny_causal_lm

    build_tiny_causal_lm(tokenizer, sliding_window=8).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module, target = build("dpo", tmp_path, "sdpa")
    for layer in module.policy.model.layers:  # layers that keep the window to themselves
        layer.self_attn.sliding_window = None
    with torch.no_grad(), pytest.raises(ValueError, match="does not pass it to its attention function"):
        module.logps(module.policy, batch_of(module, target, packing=True))


def save_architecture(config_class: str, tokenizer, directory, **settings):
    """A tiny randomly initialised model of another architecture, with the tiny tokenizer, saved to ``directory``."""
    import transformers
    from transformers import AutoModelForCausalLM

    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **settings,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize("packed_attention", ["spans", "mask"])
def test_packing_refuses_layers_that_carry_state_from_one_example_to_the_next(packed_attention, tokenizer, tmp_path):
    # LFM2's short convolutions run along the packed row, across example boundaries.
    save_architecture("Lfm2Config", tokenizer, tmp_path, layer_types=["conv", "full_attention"])
    module, target = build("dpo", tmp_path, "sdpa", packed_attention)
    packed = batch_of(module, target, packing=True)
    with torch.no_grad(), pytest.raises(ValueError, match=r"also has conv layers.*use packing: false"):
        module.logps(module.policy, packed)
    assert attention_implementation(module.policy) == "sdpa"  # refused before anything was switched


def test_packing_refuses_a_decoder_that_takes_no_position_ids(tokenizer, tmp_path):
    # RWKV lists no layer_types and swallows unknown keywords: without this check it would run the
    # packed row as one sequence.
    save_architecture("RwkvConfig", tokenizer, tmp_path, attention_hidden_size=64)
    module, target = build("dpo", tmp_path, "eager")
    packed = batch_of(module, target, packing=True)
    with torch.no_grad(), pytest.raises(ValueError, match=r"RwkvModel takes no position_ids.*use packing: false"):
        module.logps(module.policy, packed)


LLAMA4 = {"head_dim": 32, "intermediate_size_mlp": 128, "num_local_experts": 2, "no_rope_layers": [1, 0]}


def test_the_decoder_of_llama4_is_found_under_peft(tokenizer, tmp_path):
    # transformers' get_decoder misses it, and on a PEFT model returns the wrapped causal LM, head included.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    save_architecture("Llama4TextConfig", tokenizer, tmp_path, **LLAMA4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    decoder, _ = decoder_and_head(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
    assert decoder is model.model and type(decoder).__name__ == "Llama4TextModel"


@pytest.mark.parametrize("packed_attention", ["spans", "mask"])
@pytest.mark.parametrize("chunk", [8, 4096])
def test_chunked_attention_packs_the_examples_a_chunk_holds(chunk, packed_attention, tokenizer, tmp_path):
    """Llama 4's chunked layers: examples no longer than a chunk pack exactly; longer ones are refused."""
    save_architecture("Llama4TextConfig", tokenizer, tmp_path, attention_chunk_size=chunk, **LLAMA4)
    module, target = build("dpo", tmp_path, "sdpa", packed_attention)
    assert "chunked_attention" in module.policy.config.layer_types
    padded, packed = batch_of(module, target, packing=False), batch_of(module, target, packing=True)
    if chunk == 8:
        with pytest.raises(ValueError, match="more than the model's attention chunk"):
            loss_and_grads(module, packed)
        return
    assert_packed_equals_padded(module, padded, packed)


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


# ----------------------------------------------------------------- span attention (sdpa's default)
def test_span_pieces_cover_each_row_once():
    """A prompt runs causally with its first completion; a later one gets the prompt's keys too."""
    sequence_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1, -1]])
    branch_ids = torch.tensor([[0, 0, 1, 2, 2, 0, 1, 1, -1, -1]])
    spans = packed_spans(sequence_ids, branch_ids)
    (pieces,) = spans.rows
    assert [(p.start, p.end, p.prompt, p.padding) for p in pieces] == [
        (0, 3, None, False), (3, 5, (0, 2), False), (5, 8, None, False), (8, 10, None, True),
    ]  # fmt: skip
    assert spans.longest == 4 and spans.mask(pieces[0], None) is None and spans.mask(pieces[2], 3) is None
    # The rejected completion's mask: the block-causal mask's rows for it, on its prompt's keys and its own.
    dense = block_causal_mask(sequence_ids, branch_ids=branch_ids)[0, 0]
    torch.testing.assert_close(spans.mask(pieces[1], None)[0, 0], dense[3:5][:, [0, 1, 3, 4]], rtol=0, atol=0)
    # In a window of 2 tokens, each query sees itself and the key before it in its example.
    banded = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(spans.mask(pieces[1], 2)[0, 0], banded, rtol=0, atol=0)
    assert torch.equal(spans.mask(pieces[0], 2)[0, 0], torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool))


def test_span_attention_equals_the_dense_mask_under_checkpointing(tiny_lm_dir):
    module, target = build("dpo", tiny_lm_dir, "sdpa")
    packed = batch_of(module, target, packing=True, max_length=256)  # several pairs to a row
    assert int(packed["packed_branch_ids"].max()) == 2 and int(packed["packed_sequence_ids"].max()) >= 1
    module.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module.policy.train()

    def logps_and_grads(attention: str):
        module.policy.zero_grad(set_to_none=True)
        logps = batch_logps(module.policy, packed, packed_attention=attention)
        (logps.sum * torch.linspace(-1, 1, logps.sum.numel())).sum().div(100).backward()
        return logps.token_logps.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters()}

    mask_logps, mask_grads = logps_and_grads("mask")
    span_logps, span_grads = logps_and_grads("spans")
    assert attention_implementation(module.policy) == SPAN_SDPA
    torch.testing.assert_close(span_logps, mask_logps, rtol=0, atol=1e-5)
    assert max(float(g.abs().max()) for g in mask_grads.values()) > 1e-3
    for name, grad in mask_grads.items():
        torch.testing.assert_close(span_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def test_the_switch_to_span_attention_leaves_padded_batches_and_saved_configs_alone(tiny_lm_dir, tmp_path):
    module, target = build("dpo", tiny_lm_dir, "sdpa")
    padded, packed = batch_of(module, target, packing=False), batch_of(module, target, packing=True)
    with torch.no_grad():
        before = batch_logps(module.policy, padded).sum
        batch_logps(module.policy, packed)
        assert attention_implementation(module.policy) == SPAN_SDPA
        assert torch.equal(batch_logps(module.policy, padded).sum, before)  # sdpa itself without spans
    module.policy.save_pretrained(tmp_path)
    assert SPAN_SDPA not in (tmp_path / "config.json").read_text()


def test_span_attention_needs_sdpa_and_a_decoder_that_passes_it_the_spans(tiny_lm_dir, monkeypatch):
    with pytest.raises(ValueError, match="packed_attention must be one of auto, spans, mask, position_ids"):
        build("dpo", tiny_lm_dir, "sdpa", packed_attention="dense")
    module, target = build("dpo", tiny_lm_dir, "eager")
    packed = batch_of(module, target, packing=True)
    with pytest.raises(ValueError, match="span attention runs on sdpa attention"):
        batch_logps(module.policy, packed, packed_attention="spans")
    for dropping in (slice(None), slice(1)):  # an architecture whose layers (or one) drop their keyword arguments
        module, _ = build("dpo", tiny_lm_dir, "sdpa")
        layers = module.policy.model.layers
        for layer in layers[dropping]:
            attention_forward = layer.self_attn.forward
            monkeypatch.setattr(
                layer.self_attn, "forward", lambda *a, _f=attention_forward, packed_spans=None, **k: _f(*a, **k)
            )
        used = len(layers) - len(layers[dropping])
        with torch.no_grad(), pytest.raises(ValueError, match=f"passes the packed spans down to {used} of its {len(layers)}"):
            batch_logps(module.policy, packed)


def test_packed_attention_modes_refuse_what_they_cannot_run(tiny_lm_dir, tokenizer):
    from lit_pref.attention import span_sdpa_attention
    from lit_pref.ops import sliding_window
    from lit_pref.tiny import build_tiny_causal_lm

    module, target = build("dpo", tiny_lm_dir, "sdpa")
    packed = batch_of(module, target, packing=True)
    module.policy.config._attn_implementation = "flex_attention"  # takes no dense float mask
    with pytest.raises(ValueError, match="the dense packed mask needs eager or sdpa attention"):
        batch_logps(module.policy, packed, packed_attention="mask")
    spans = packed_spans(packed["packed_sequence_ids"], packed["packed_branch_ids"])
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="does not slice a per-position attention bias"):
        span_sdpa_attention(module.policy.model.layers[0].self_attn, q, q, q, None, spans, position_bias=torch.zeros(1, 2, 4, 4))
    # A Qwen2 window that starts past its last layer is no window at all.
    qwen = build_tiny_causal_lm(tokenizer, sliding_window=8)
    assert sliding_window(qwen) == 8
    qwen.config.layer_types = ["full_attention"] * qwen.config.num_hidden_layers
    assert sliding_window(qwen) is None
