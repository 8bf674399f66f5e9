"""Shared tensor math: masked reductions and whitening.

Every algorithm reduces over completion tokens with the same helpers so that "mean over
tokens" means the same thing everywhere. Masks are 0/1 (or bool) tensors broadcastable to
the values; positions where the mask is 0 never influence a result.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lit_pref.attention import SPAN_SDPA, check_spans_used, packed_spans, spans_forward, use_span_attention
from lit_pref.types import CausalLM, CompletionBatch, CompletionLogps
from lit_pref.vision.modeling import check_vision_inputs, multimodal_decoder
from lit_pref.vision.processing import repeat_vision_inputs

PackedAttention = Literal["auto", "spans", "mask", "position_ids"]


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is set, over ``dim`` (all dims when ``None``)."""
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set.

    An all-zero mask gives 0 rather than NaN, so an empty row can never poison a batch.
    """
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries (Bessel-corrected when ``unbiased`` and more than one entry)."""
    mean = masked_mean(values, mask)
    count = mask.to(values.dtype).sum()
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the masked entries to unit variance (and zero mean when ``shift_mean``).

    Masked-out positions are returned as 0 so they stay inert downstream.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding aware)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """``[B]`` index of each row's last real token, whatever side the padding is on."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(-1).clamp(min=0)


class _TargetLogSoftmax(torch.autograd.Function):
    """``log softmax(z)[target]`` per row (and, on request, the detached entropy), computed in the
    logits' own storage.

    ``F.cross_entropy`` writes a ``[N, vocab]`` log-softmax, and its backward allocates two more
    (a dense one-hot gradient and the log-softmax gradient). On the CPU every fresh tensor of this
    size is paid again in page faults, and these passes cost as much as a fifth of a DPO step.
    Here the logits become the softmax in place, which backward turns into the gradient in place:
    ∂ log p_t / ∂z = onehot(t) − softmax(z). The caller must not read the logits afterwards.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        ctx.set_materialize_grads(False)
        peak = logits.amax(-1, keepdim=True)
        picked = logits.gather(-1, targets[:, None])
        shifted = logits.sub_(peak)  # y = z − max z
        if with_entropy:
            # H = log Σe^y − Σe^y·y / Σe^y needs y and e^y at once: a block of rows at a time, small
            # enough to stay in cache (and for the allocator to reuse), exponentiated beside y.
            rows = max(1, _ENTROPY_BLOCK // shifted.shape[-1])
            weighted = torch.empty_like(peak)
            for start in range(0, shifted.shape[0], rows):
                block = shifted[start : start + rows]
                exp = torch.exp(block)
                weighted[start : start + rows] = torch.linalg.vecdot(exp, block)[:, None]
                block.copy_(exp)
        else:
            shifted.exp_()
        total = shifted.sum(-1, keepdim=True)
        log_total = total.log()
        logps = (picked - peak - log_total).squeeze(-1)
        entropy = (log_total - weighted / total).squeeze(-1) if with_entropy else None
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(shifted.div_(total), targets)
        ctx.mark_dirty(logits)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy, logits

    @staticmethod
    def backward(
        ctx: Any, grad_logps: Tensor | None, _entropy: Tensor | None, _logits: Tensor | None
    ) -> tuple[Tensor | None, None, None]:
        if grad_logps is None:
            return None, None, None
        # The saved softmax is used up: a second backward through this graph fails the version check.
        softmax, targets = ctx.saved_tensors
        grad = softmax.mul_(-grad_logps[:, None])
        return grad.scatter_add_(-1, targets[:, None], grad_logps[:, None]), None, None


# Elements (8 MiB of fp32) per block of rows of the in-place entropy.
_ENTROPY_BLOCK = 1 << 21


def _token_logps_chunk(
    head: Callable[[Tensor], Tensor],
    hidden: Tensor,
    targets: Tensor,
    temperature: float,
    with_entropy: bool,
    with_sq_norm: bool,
    with_argmax: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Log-probs of ``targets`` for one chunk, plus per-token diagnostics (detached, except the
    entropy with ``entropy_grad``)."""
    logits = head(hidden).float()
    if temperature != 1.0:
        # In place: the head's matmul keeps its inputs for backward, not its output.
        logits = logits.div_(temperature)
    with torch.no_grad():
        mean_logits = logits.mean(-1)
        sq_norm = (2 * logits).logsumexp(-1) - 2 * logits.logsumexp(-1) if with_sq_norm else None
        argmax = logits.argmax(-1) if with_argmax else None
    if with_entropy and entropy_grad and torch.is_grad_enabled():
        # A differentiable entropy's backward reads the logits, so they cannot be overwritten.
        # H = log Σ e^z − Σ softmax(z)·z, from the logits this chunk already holds: no second head pass.
        entropy = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
        return -F.cross_entropy(logits, targets, reduction="none"), mean_logits, entropy, sq_norm, argmax
    logps, entropy, _ = _TargetLogSoftmax.apply(logits, targets, with_entropy)
    return logps, mean_logits, entropy, sq_norm, argmax


# Architectures whose causal-LM ``forward`` scales the LM head's output (text config's
# ``model_type`` prefix → (config attribute, whether the logits are divided by it)). The log-prob
# path calls the head itself, so it must apply what that ``forward`` would.
_LOGIT_SCALES = {
    "cohere": ("logit_scale", False),
    "granite": ("logits_scaling", True),
    "minicpm3": ("logits_scaling", True),  # divides the hidden states; the head has no bias
    "hyperclovax": ("logits_scaling", False),
    "falcon_h1": ("lm_head_multiplier", False),
}


def final_logit_transform(model: torch.nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)`` that ``model``'s forward applies to its LM head's output:
    ``z ↦ softcap · tanh(scale · z / softcap)`` (a config's ``final_logit_softcapping``: Gemma 2
    caps its logits at 30; Cohere, Granite… scale them), ``(1.0, None)`` for a plain head."""
    config = _text_config(model)
    model_type = str(getattr(config, "model_type", ""))
    scale = 1.0
    for prefix, (attribute, divides) in _LOGIT_SCALES.items():
        if model_type.startswith(prefix) and getattr(config, attribute, None) is not None:
            value = float(getattr(config, attribute))
            scale = 1 / value if divides else value
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, float(softcap) if softcap is not None else None


def _final_logits(head: torch.nn.Module, scale: float, softcap: float | None, hidden: Tensor) -> Tensor:
    # In fp32: a bf16 tanh quantizes badly near the cap. In place, as a [tokens, vocab] tensor
    # costs its page faults again on every allocation; only tanh's backward reads its output,
    # so the cap's last multiply allocates.
    logits = head(hidden).float()
    if softcap is None:
        return logits.mul_(scale)
    return torch.tanh_(logits.mul_(scale / softcap)) * softcap


def text_decoder(model: Any) -> torch.nn.Module:
    """``model.get_decoder()``: a causal LM's decoder stack, without the head; ``model`` itself
    when it holds none. Where ``transformers``' lookup misses it, the decoder stored as
    ``model.model``: Llama 4's text model names ``language_model`` as its base model's attribute
    (a PEFT model's lookup then returns the model it wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder: torch.nn.Module = model.get_decoder()
    return decoder if decoder is not base else getattr(base, "model", model)


def decoder_and_head(model: CausalLM) -> tuple[torch.nn.Module, Callable[[Tensor], Tensor]]:
    """A causal LM's decoder (no LM head) and its LM head, the two halves of the log-prob path.

    The head returns the logits the model's own ``forward`` would: with the scaling or soft
    capping some architectures apply after the LM head (:func:`final_logit_transform`). A
    vision-language model's decoder is its multimodal one, which encodes the images too.
    """
    decoder, head = multimodal_decoder(model) or text_decoder(model), model.get_output_embeddings()
    if decoder is model or head is None:
        raise TypeError(
            f"{type(model).__name__} does not expose a decoder and an LM head separately "
            "(get_decoder / get_output_embeddings); lit_pref needs a causal LM."
        )
    scale, softcap = final_logit_transform(model)
    if scale == 1.0 and softcap is None:
        return decoder, head
    return decoder, functools.partial(_final_logits, head, scale, softcap)


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model`` recomputes activations in backward (which disables the KV cache).

    transformers 5.20 renamed ``is_gradient_checkpointing`` to ``is_activation_checkpointing`` (the
    old name warns); earlier 5.x releases (vLLM's pin) know only the old one.
    """
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def cache_argument(decoder: torch.nn.Module) -> str:
    """The name under which ``decoder`` takes and returns its KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works, with a
    FutureWarning); earlier 5.x releases know only the old name.
    """
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def completion_hidden(
    decoder: torch.nn.Module,
    prompt_input_ids: Tensor,
    prompt_attention_mask: Tensor,
    completion_input_ids: Tensor,
    completion_attention_mask: Tensor,
    share_prompt: bool = True,
    vision_inputs: dict[str, Tensor] | None = None,
    image_counts: Tensor | None = None,
) -> Tensor:
    """The decoder half of the log-prob path: hidden states that predict each completion token, ``[Bc, L, H]``.

    The prompt is left-padded and the completions right-padded, so every row's real tokens are
    contiguous and column ``P - 1`` is always the last prompt token. :func:`completion_logps`
    feeds them to the LM head; a value head (PPO) reads the same states. ``share_prompt`` is
    ignored under gradient checkpointing (which disables the KV cache).

    ``vision_inputs`` (``pixel_values``…, the prompts' images in row order) go to the prompt's
    forward pass, so with a shared prompt the vision encoder runs once per prompt and the cached
    image tokens serve every completion; ``image_counts`` (``[Bp]`` images per prompt) lets the
    concatenated pass repeat them with the prompts.
    """
    vision = vision_inputs or {}
    share_prompt = share_prompt and not is_checkpointing(decoder)
    k = completion_input_ids.shape[0] // prompt_input_ids.shape[0]
    if share_prompt and k > 1:
        # The prompt is encoded once and its key/value cache reused by all k completions: the
        # same attention pattern as the concatenated rows, with 1/k of the prompt compute.
        prompt_out = decoder(
            input_ids=prompt_input_ids,
            attention_mask=prompt_attention_mask,
            position_ids=position_ids_from_mask(prompt_attention_mask),
            use_cache=True,
            **vision,
        )
        cache_name = cache_argument(decoder)
        cache = getattr(prompt_out, cache_name)
        cache.batch_repeat_interleave(k)
        prompt_mask = prompt_attention_mask.repeat_interleave(k, 0)
        prompt_lengths = prompt_mask.sum(-1, keepdim=True)
        offsets = torch.arange(completion_input_ids.shape[1], device=completion_input_ids.device)
        completion_out = decoder(
            input_ids=completion_input_ids,
            attention_mask=prefix_causal_mask(prompt_mask, completion_input_ids.shape[1], attention_dtype(decoder))
            if takes_own_causal_mask(decoder)
            else torch.cat([prompt_mask, completion_attention_mask], 1),
            position_ids=prompt_lengths + offsets,
            **{cache_name: cache},
            use_cache=True,
        )
        last_prompt = prompt_out.last_hidden_state[:, -1:].repeat_interleave(k, 0)
        return torch.cat([last_prompt, completion_out.last_hidden_state[:, :-1]], 1)
    prompt_ids = prompt_input_ids.repeat_interleave(k, 0)
    if vision and k > 1:
        if image_counts is None:
            raise ValueError("repeating the prompts' images needs image_counts (images per prompt)")
        vision = repeat_vision_inputs(vision, image_counts, k)
    attention_mask = torch.cat([prompt_attention_mask.repeat_interleave(k, 0), completion_attention_mask], 1)
    hidden = decoder(
        input_ids=torch.cat([prompt_ids, completion_input_ids], 1),
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **vision,
    ).last_hidden_state
    prompt_len = prompt_ids.shape[1]
    return hidden[:, prompt_len - 1 : -1]


def completion_logps(
    model: torch.nn.Module,
    prompt_input_ids: Tensor,
    prompt_attention_mask: Tensor,
    completion_input_ids: Tensor,
    completion_attention_mask: Tensor,
    completion_mask: Tensor | None = None,
    *,
    chunk_size: int = 1024,
    share_prompt: bool = True,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_sq_norm: bool = False,
    with_argmax: bool = False,
    entropy_grad: bool = False,
    vision_inputs: dict[str, Tensor] | None = None,
    image_counts: Tensor | None = None,
) -> CompletionLogps:
    """Per-token log-probs of completions given prompts: the one log-prob path of lit_pref.

    Args:
        model: a causal LM (``transformers`` model, optionally PEFT-wrapped).
        prompt_input_ids: ``[Bp, P]`` left-padded prompts, each with at least one real token.
        prompt_attention_mask: ``[Bp, P]``.
        completion_input_ids: ``[Bc, L]`` right-padded completions, ``Bc = k·Bp``; row ``j``
            continues prompt ``j // k``.
        completion_attention_mask: ``[Bc, L]`` real completion tokens.
        completion_mask: ``[Bc, L]`` tokens whose log-prob counts (defaults to the attention mask).
        chunk_size: completion tokens per LM-head chunk. The head runs only on counted tokens, a
            chunk at a time; with more than one chunk all but the last are recomputed in
            backward, so ``[N, vocab]`` fp32 logits for the whole batch never exist at once.
        share_prompt: encode each prompt once and reuse its KV cache for its k completions
            (ignored when k = 1 or gradient checkpointing is on, which disables the cache).
        temperature: logits are divided by it (sampling temperature of PPO/GRPO rollouts).
        with_entropy: also return the per-token entropy (detached unless ``entropy_grad``).
        with_sq_norm: also return log Σ_v π(v)² per token (detached; WPO weights).
        with_argmax: also return the most likely token at each position (token accuracy).
        entropy_grad: keep the entropy's gradient (an entropy bonus in the loss); computed in
            the same chunk as the log-probs, so no second pass over the LM head.
        vision_inputs: a vision-language model's image inputs for the prompts (the batch's
            ``vision_inputs``: ``pixel_values``…), encoded with the prompt pass.
        image_counts: ``[Bp]`` images per prompt (needed to repeat them when the prompt is not shared).
    """
    if completion_input_ids.shape[0] % prompt_input_ids.shape[0]:
        raise ValueError(
            f"{completion_input_ids.shape[0]} completions cannot be split evenly over "
            f"{prompt_input_ids.shape[0]} prompts"
        )
    decoder, head = decoder_and_head(model)
    check_vision_inputs(decoder, prompt_input_ids, vision_inputs)
    share_prompt = share_prompt and not is_checkpointing(model)
    hidden = completion_hidden(
        decoder,
        prompt_input_ids,
        prompt_attention_mask,
        completion_input_ids,
        completion_attention_mask,
        share_prompt,
        vision_inputs,
        image_counts,
    )
    mask = completion_attention_mask if completion_mask is None else completion_mask
    return hidden_logps(
        head,
        hidden,
        completion_input_ids,
        mask,
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
        with_sq_norm=with_sq_norm,
        with_argmax=with_argmax,
        entropy_grad=entropy_grad,
    )


def batch_logps(
    model: torch.nn.Module, batch: CompletionBatch, packed_attention: PackedAttention = "auto", **kwargs: Any
) -> CompletionLogps:
    """:func:`completion_logps` of a collated batch (its ``completion_mask`` counted when present),
    or :func:`packed_logps` of a padding-free one (``packing: true``), with ``packed_attention``."""
    if "packed_source" in batch:
        kwargs.pop("share_prompt", None)  # the packed layout always encodes each prompt once
        return packed_logps(model, batch, attention=packed_attention, **kwargs)
    return completion_logps(
        model,
        batch["prompt_input_ids"],
        batch["prompt_attention_mask"],
        batch["completion_input_ids"],
        batch["completion_attention_mask"],
        batch.get("completion_mask"),
        vision_inputs=batch.get("vision_inputs"),
        image_counts=batch.get("image_counts"),
        **kwargs,
    )


def hidden_logps(
    head: Callable[[Tensor], Tensor],
    hidden: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_sq_norm: bool = False,
    with_argmax: bool = False,
    entropy_grad: bool = False,
) -> CompletionLogps:
    """The LM-head half of the log-prob path: log-probs of ``targets`` from the states predicting them.

    :func:`completion_logps` calls it after its forward pass; layouts it does not cover (packed
    rows) run their own forward and call it directly.

    Args:
        head: the LM head, as :func:`decoder_and_head` returns it.
        hidden: ``[B, L, H]`` hidden states; ``hidden[b, t]`` predicts ``targets[b, t]``.
        targets: ``[B, L]`` token ids.
        mask: ``[B, L]`` tokens whose log-prob counts; the head runs on these only, ``chunk_size``
            at a time, all chunks but the last recomputed in backward.
        chunk_size, temperature, with_entropy, with_sq_norm, with_argmax, entropy_grad: as in
            :func:`completion_logps`.
    """
    mask = mask.bool()
    selected, targets = hidden[mask], targets[mask]
    if not mask.any():
        raise ValueError("the batch has no completion tokens to score")
    # Recomputing the head in backward keeps one chunk of logits alive instead of all of them. The
    # last chunk is kept rather than recomputed: backward uses it up first, before it recomputes
    # any other, and it is a full one (the remainder comes first), so only the tokens beyond the
    # first ``chunk_size`` pay a second head forward. The price is that chunk's softmax held from
    # forward to backward (+90 MiB on the skewed DPO benchmark's 1.2 GiB, for ~10 % fewer FLOPs).
    recompute = torch.is_grad_enabled() and selected.requires_grad
    bounds = [0, *range(selected.shape[0] % chunk_size or chunk_size, selected.shape[0] + 1, chunk_size)]
    chunks = []
    for start, end in itertools.pairwise(bounds):
        args = (head, selected[start:end], targets[start:end],
                temperature, with_entropy, with_sq_norm, with_argmax, entropy_grad)  # fmt: skip
        if recompute and end < selected.shape[0]:
            chunks.append(checkpoint(_token_logps_chunk, *args, use_reentrant=False))
        else:
            chunks.append(_token_logps_chunk(*args))

    def scatter(column: int) -> Tensor:
        values = torch.cat([chunk[column] for chunk in chunks])
        return torch.zeros(mask.shape, dtype=values.dtype, device=mask.device).masked_scatter(mask, values)

    return CompletionLogps(
        token_logps=scatter(0),
        mask=mask,
        mean_logits=masked_mean(scatter(1), mask, dim=-1),
        entropy=scatter(2) if with_entropy else None,
        log_sq_norm=scatter(3) if with_sq_norm else None,
        argmax=scatter(4) if with_argmax else None,
    )


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation ``model`` runs (``transformers``' default: ``sdpa``)."""
    return str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa")


def takes_dense_mask(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention takes a dense ``[B, 1, Q, K]`` mask (eager and SDPA do, and
    span attention, SDPA on every call without spans)."""
    return attention_implementation(model) in ("eager", "sdpa", SPAN_SDPA)


def _text_config(model: torch.nn.Module) -> Any:
    """The language model's configuration of ``model`` (a vision-language model's text config)."""
    config: Any = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# ``layer_types`` (transformers' names) of layers that mix tokens through attention only, and of
# layers that do not mix tokens at all: MLP and mixture-of-experts blocks (Nemotron-H lists them as
# mlp and moe; dense and sparse are transformers' names for MLP kinds).
_ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
_TOKENWISE_LAYERS = frozenset({"mlp", "moe", "dense", "sparse"})


def layer_types(model: torch.nn.Module) -> list[str]:
    """The kind of each layer ``model``'s language model stacks, in order (its config's
    ``layer_types``; empty for a config that does not list them, as older all-attention ones)."""
    return list(getattr(_text_config(model), "layer_types", None) or ())


def attention_layer_count(model: torch.nn.Module) -> int:
    """How many of ``model``'s language-model layers attend: every layer when its config lists no
    ``layer_types`` (at least one where it does not name its depth)."""
    if kinds := layer_types(model):
        return sum(kind in _ATTENTION_LAYERS for kind in kinds)
    return int(getattr(_text_config(model), "num_hidden_layers", 1))


def sliding_window(model: torch.nn.Module) -> int | None:
    """The window (in tokens) of ``model``'s sliding-window attention layers; ``None`` when every
    layer attends to the whole sequence."""
    config = _text_config(model)
    window = getattr(config, "sliding_window", None)
    kinds = layer_types(model)
    if window is None or (kinds and "sliding_attention" not in kinds):
        return None  # e.g. a Qwen2 whose window layers start past its last layer
    return int(window)


def takes_own_causal_mask(decoder: torch.nn.Module) -> bool:
    """Whether ``decoder`` may be handed a causal 4-D mask built by lit_pref: its attention takes
    dense masks and every layer attends to the whole sequence (``transformers`` builds the masks
    of sliding-window and chunked layers from the 2-D one, and recurrent or convolutional layers
    read it to skip padding; a 4-D mask would reach them unchanged)."""
    if getattr(decoder, "config", None) is None or not takes_dense_mask(decoder):
        return False
    return sliding_window(decoder) is None and set(layer_types(decoder)) <= {"full_attention"} | _TOKENWISE_LAYERS


def check_packable(model: torch.nn.Module, longest_example: Callable[[], int]) -> None:
    """Refuses a model whose layers a packed row would let one example's tokens reach another's.

    Span attention and the block-causal mask keep examples apart in full, sliding-window and
    chunked attention layers, and each example's positions restart at 0. Recurrent
    (``linear_attention``: Mamba, gated delta nets…), convolutional and hybrid layers carry their
    state along the row into the next example; indexed and compressed attention kinds select keys
    in ways neither applies the examples' bounds to; a decoder that takes no ``position_ids``
    (RWKV, xLSTM, which list no ``layer_types``) sees one long sequence. A chunked layer (Llama 4)
    attends within chunks of ``attention_chunk_size`` positions, which packing does not apply:
    examples of at most that many tokens are exact (alone, an example starts at position 0, so no
    chunk boundary falls inside it).

    Args:
        model: the decoder a packed batch is about to run through.
        longest_example: the batch's longest example (a prompt and one of its completions), in
            tokens; called only for a model with chunked layers.
    """
    kinds = set(layer_types(model))
    if mixing := sorted(kinds - _ATTENTION_LAYERS - _TOKENWISE_LAYERS):
        raise ValueError(
            "packing keeps examples apart in full, sliding-window and chunked attention only; this model also has "
            f"{', '.join(mixing)} layers, which would let each packed example reach the next one: use packing: false"
        )
    inputs = inspect.signature(model.forward).parameters
    if "input_ids" in inputs and "position_ids" not in inputs:  # a wrapper's (*args, **kwargs) passes
        raise ValueError(
            f"{type(model).__name__} takes no position_ids, so it would run a packed row as one sequence "
            "and each example would see the ones before it: use packing: false"
        )
    chunk = getattr(_text_config(model), "attention_chunk_size", None)
    if "chunked_attention" in kinds and chunk is not None and (longest := longest_example()) > chunk:
        raise ValueError(
            f"a packed example spans {longest} tokens, more than the model's attention chunk ({chunk} tokens), "
            "which packing does not apply: use packing: false, or a max_length of at most the chunk"
        )


def attention_dtype(decoder: Any) -> torch.dtype:
    """The dtype ``decoder``'s attention scores are computed in: autocast's while it is on, else
    its embeddings'. A dense mask built in it reaches every layer as the same tensor."""
    weight: Tensor = decoder.get_input_embeddings().weight
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """``allowed`` (True: attend) as an additive mask: 0 where allowed, ``dtype``'s most negative value elsewhere.

    Built once per forward pass and passed as a 4-D ``attention_mask``, one tensor serves every
    layer; a boolean mask would be converted to such a float copy by SDPA in every layer, each
    copy kept for backward (``[B, Q, K]`` floats per layer). Written in one allocation: at long
    sequences the mask is the largest tensor of a pass.
    """
    allowed_value = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, allowed_value, torch.finfo(dtype).min)


def prefix_causal_mask(prefix_mask: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """Additive mask of completions of ``L`` tokens after a cached, left-padded prefix of ``P``:
    ``[B, 1, L, P + L]``, or ``[1, 1, L, P + L]`` (shared by every row) when no prefix is padded.

    Query ``i`` (position ``P + i``) sees the real prefix keys and the completion keys up to
    itself. Completion padding needs no mask: a right-padded row's pad keys lie after its last
    real token, where causality already hides them from every real query, and what pad queries
    compute is never read. Every query sees its prefix's real tokens, so no softmax row is empty.

    Args:
        prefix_mask: ``[B, P]`` real prefix tokens.
        length: ``L``, the completions' (padded) width.
        dtype: the attention dtype (:func:`attention_dtype`).
    """
    prefix = prefix_mask.shape[1]
    keys = torch.arange(prefix + length, device=prefix_mask.device)
    queries = torch.arange(length, device=prefix_mask.device) + prefix
    allowed = (keys[None, :] <= queries[:, None])[None, None]
    if not bool(prefix_mask.all()):
        real = torch.cat([prefix_mask.bool(), prefix_mask.new_ones(prefix_mask.shape[0], length, dtype=torch.bool)], 1)
        allowed = allowed & real[:, None, None, :]
    return additive_mask(allowed, dtype)


def block_causal_mask(sequence_ids: Tensor, dtype: torch.dtype = torch.bool, branch_ids: Tensor | None = None) -> Tensor:
    """``[R, 1, T, T]`` attention mask: causal within each segment, nothing across segments.

    Query ``q`` may attend to key ``k`` when both lie in the same example and ``k ≤ q``; with
    ``branch_ids`` (prompt 0, completions 1, 2, …) also only when ``k`` is a prompt token or in
    ``q``'s own completion. A padding position attends to itself only, so no softmax row is
    empty. With ``dtype=torch.bool`` the mask is True where attention is allowed; with a floating
    dtype it is :func:`additive_mask`'s, the form :func:`packed_logps` passes to every layer.
    """
    width = sequence_ids.shape[-1]
    positions = torch.arange(width, device=sequence_ids.device)
    causal = positions[None, :] <= positions[:, None]
    same = (sequence_ids[:, :, None] == sequence_ids[:, None, :]) & (sequence_ids[:, :, None] >= 0)
    if branch_ids is not None:
        same &= (branch_ids[:, None, :] == 0) | (branch_ids[:, None, :] == branch_ids[:, :, None])
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool, device=sequence_ids.device)
    allowed = allowed[:, None]
    return allowed if dtype == torch.bool else additive_mask(allowed, dtype)


def packed_logps(
    model: torch.nn.Module,
    batch: CompletionBatch,
    *,
    attention: PackedAttention = "auto",
    **head_kwargs: Any,
) -> CompletionLogps:
    """The log-prob path of a padding-free batch (:mod:`lit_pref.data.packing`), returned in the
    padded completion layout, so every loss reads it exactly as :func:`completion_logps`' output.

    One forward pass over the packed sequences: each prompt once, each completion after it with
    its own positions, kept apart by span attention (:mod:`lit_pref.attention`) or the
    branch-aware :func:`block_causal_mask`. The hidden state that predicts each completion token
    is then gathered (``packed_source``) and the LM head runs, in chunks, on counted tokens only.

    Args:
        model: a causal LM.
        batch: a batch from :class:`~lit_pref.data.packing.PackingCollator`.
        attention: ``spans`` runs SDPA once per prompt and completion span
            (:mod:`lit_pref.attention`; switches an ``sdpa`` model to it); ``mask`` passes the
            ``[R, 1, T, T]`` mask (eager / SDPA attention), which costs ``T²`` per row and layer;
            ``position_ids`` passes none and lets ``transformers`` find the sequences from the
            restarting position ids (flash-attention's varlen path), which only holds for one
            completion per prompt; ``auto`` picks ``spans`` for SDPA, ``mask`` for eager
            attention, else ``position_ids`` (an error for pairs).
        **head_kwargs: ``chunk_size``, ``temperature``, ``with_entropy``… of :func:`hidden_logps`.
    """
    if batch.get("vision_inputs") is not None:
        raise ValueError("packing does not take image inputs yet; use the padded layout (packing: false)")
    decoder, head = decoder_and_head(model)
    branches: Tensor = batch["packed_branch_ids"]
    sequences: Tensor = batch["packed_sequence_ids"]
    check_packable(decoder, lambda: packed_spans(sequences, branches).longest)
    implementation = attention_implementation(model)
    if attention == "auto":
        if implementation in ("sdpa", SPAN_SDPA):
            attention = "spans"
        else:
            attention = "mask" if takes_dense_mask(model) else "position_ids"
    inputs: dict[str, Any] = {}
    window = sliding_window(decoder)
    if attention == "mask":
        if not takes_dense_mask(model):
            raise ValueError(f"the dense packed mask needs eager or sdpa attention, the model uses {implementation!r}")
        # The block-causal mask lets a token see its whole example; a sliding layer may not.
        if window is not None and (longest := packed_spans(sequences, branches).longest) > window:
            raise ValueError(
                f"a packed example spans {longest} tokens, more than the model's sliding attention window "
                f"({window} tokens), which the dense packed mask does not apply: use packed_attention: spans "
                "(sdpa attention) or packing: false"
            )
        inputs = {"attention_mask": block_causal_mask(sequences, attention_dtype(decoder), branches)}
    elif attention == "spans":
        if not use_span_attention(decoder):
            raise ValueError(
                f"span attention runs on sdpa attention, the model uses {implementation!r}: load it with "
                "attn_implementation: sdpa, or use packed_attention: mask (eager) or position_ids (flash attention, "
                "one completion per prompt)"
            )
        spans = packed_spans(sequences, branches)
        # An all-ones 2-D mask, so transformers does not look for the sequences in the restarting
        # position ids; within spans_forward it builds no mask from it either.
        inputs = {"attention_mask": torch.ones_like(sequences), "packed_spans": spans}
    elif int(branches.max()) > 1:
        raise ValueError(
            f"packed prompts with several completions need packed_attention: spans or mask (the model uses "
            f"{implementation!r}): position ids alone cannot keep a prompt's completions apart"
        )
    with spans_forward() if attention == "spans" else contextlib.nullcontext():
        hidden = decoder(
            input_ids=batch["packed_input_ids"], position_ids=batch["packed_position_ids"], use_cache=False, **inputs
        ).last_hidden_state
    if attention == "spans":
        check_spans_used(spans, model, window, attention_layer_count(decoder))
    completion_states = hidden.flatten(0, 1)[batch["packed_source"]]
    counted = batch.get("completion_mask", batch["completion_attention_mask"])
    return hidden_logps(head, completion_states, batch["completion_input_ids"], counted, **head_kwargs)
