"""The built-in rollout engine: a decode loop on the policy itself.

Each prompt is prefilled once and its key/value cache shared by its k completions (as in the
log-prob path, :func:`lit_pref.ops.completion_hidden`), the cache is preallocated (a
``StaticCache``: written in place, never re-concatenated), and each step runs the decoder on one
token per row and the LM head on that position only. Tokens are drawn exactly as
``transformers``' ``generate`` draws them (the same logits warpers, ``torch.multinomial`` on the
process's global random generator, finished rows padded until every row is done), so with the same
seed the completions are those of ``generate`` token for token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase, StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lit_pref.engines.base import (
    GenerationSettings,
    RolloutEngine,
    Samples,
    cut_after_eos,
    eos_token_ids,
    pad_right,
)
from lit_pref.ops import (
    additive_mask,
    attention_dtype,
    cache_argument,
    decoder_and_head,
    position_ids_from_mask,
    takes_own_causal_mask,
)
from lit_pref.vision.modeling import check_vision_inputs
from lit_pref.vision.processing import repeat_vision_inputs, vision_of_prompts


class GenerateEngine(RolloutEngine):
    """Samples with lit_pref's decode loop on the policy itself, so the weights are always current
    (nothing to reload after an optimizer step) and it works with any strategy.

    Args:
        completions_per_call: completions decoded together (rounded down to whole prompt groups,
            at least one); ``None`` decodes the whole batch at once.
        share_prompt: prefill each prompt once and share its key/value cache among its k
            completions; ``False`` prefills every completion's copy of the prompt (the same
            samples, k times the prefill work; for comparison).

    Image prompts (a vision-language policy) are encoded with the prefill, once per prompt.
    """

    takes_images = True

    def __init__(self, completions_per_call: int | None = None, share_prompt: bool = True) -> None:
        if completions_per_call is not None and completions_per_call < 1:
            raise ValueError(f"completions_per_call must be >= 1 or null, got {completions_per_call}")
        self.completions_per_call = completions_per_call
        self.share_prompt = share_prompt

    def sample(
        self,
        policy: torch.nn.Module,
        prompt_input_ids: Tensor,
        prompt_attention_mask: Tensor,
        num_generations: int,
        settings: GenerationSettings,
        tokenizer: PreTrainedTokenizerBase,
        vision_inputs: dict[str, Tensor] | None = None,
        image_counts: Tensor | None = None,
    ) -> Samples:
        per_call = self.completions_per_call
        prompts_per_call = None if per_call is None else max(1, per_call // num_generations)
        ids, mask, ended = sample_completions(
            policy,
            prompt_input_ids,
            prompt_attention_mask,
            settings,
            tokenizer,
            num_generations,
            prompts_per_call,
            self.share_prompt,
            vision_inputs,
            image_counts,
        )
        return Samples(ids, mask, ended)


def _trim_left_padding(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    # A chunk of a left-padded batch may start with columns that are padding in every row.
    first = int(mask.any(0).long().argmax())
    return ids[:, first:], mask[:, first:]


def logits_warpers(settings: GenerationSettings) -> LogitsProcessorList:
    """The logits processing of ``settings``, in ``generate``'s order: temperature, top-k, top-p."""
    warpers = LogitsProcessorList()
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    return warpers


@torch.no_grad()
def decode(
    model: Any,
    prompt_input_ids: Tensor,
    prompt_attention_mask: Tensor,
    settings: GenerationSettings,
    eos_ids: list[int],
    pad_token_id: int,
    num_generations: int = 1,
    share_prompt: bool = True,
    vision_inputs: dict[str, Tensor] | None = None,
    image_counts: Tensor | None = None,
) -> Tensor:
    """``[P·k, T]`` tokens sampled after each of ``P`` left-padded prompts (``k`` adjacent rows per
    prompt, ``T <= max_new_tokens``); a row is ``pad_token_id`` after its first EOS token.

    ``top_k == 1`` is greedy decoding (argmax, no random draw). ``vision_inputs`` (the prompts'
    images, ``image_counts`` per prompt) go to the prefill only: their tokens are then in the cache.
    """
    decoder, head = decoder_and_head(model)
    cache_name = cache_argument(decoder)
    k, (num_prompts, prompt_len) = num_generations, prompt_input_ids.shape
    rows, device = num_prompts * k, prompt_input_ids.device
    vision = vision_inputs or {}
    check_vision_inputs(decoder, prompt_input_ids, vision_inputs)
    if not share_prompt:
        prompt_input_ids = prompt_input_ids.repeat_interleave(k, 0)
        prompt_attention_mask = prompt_attention_mask.repeat_interleave(k, 0)
        if vision and image_counts is not None:
            vision = repeat_vision_inputs(vision, image_counts, k)
    prefill = decoder(
        input_ids=prompt_input_ids,
        attention_mask=prompt_attention_mask,
        position_ids=position_ids_from_mask(prompt_attention_mask),
        use_cache=True,
        **vision,
    )
    repeats = k if share_prompt else 1
    # Preallocated for the longest completion: each step writes one column in place, where a
    # growing cache would copy itself every step.
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + settings.max_new_tokens)
    for index, layer in enumerate(getattr(prefill, cache_name).layers):
        if layer.keys.shape[-2] != prompt_len:
            raise NotImplementedError(
                f"{type(model).__name__} keeps {layer.keys.shape[-2]} of the {prompt_len} prompt positions in its "
                "cache (a sliding window shorter than the prompt); the built-in engine needs the whole prompt cached"
            )
        cache.update(
            layer.keys.repeat_interleave(repeats, 0), layer.values.repeat_interleave(repeats, 0), index
        )
    attention_mask = prompt_attention_mask.new_zeros(rows, prompt_len + settings.max_new_tokens)
    attention_mask[:, :prompt_len] = prompt_attention_mask.repeat_interleave(repeats, 0)
    # One query per step: the keys it sees are exactly the cached ones, so the 4-D mask is the 2-D
    # one broadcast, kept and opened one column per step instead of rebuilt by every forward pass.
    step_mask = (
        additive_mask(attention_mask.bool()[:, None, None, :], attention_dtype(decoder))
        if takes_own_causal_mask(decoder)
        else None
    )
    next_position = prompt_attention_mask.sum(-1, keepdim=True).repeat_interleave(repeats, 0)
    # The head sees only the last position; with a shared prompt, once per prompt.
    logits = head(prefill.last_hidden_state[:, -1]).float().repeat_interleave(repeats, 0)
    del prefill  # its cache is copied: free it before decoding

    warpers, greedy = logits_warpers(settings), settings.top_k == 1
    eos = torch.as_tensor(eos_ids, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    for step in range(settings.max_new_tokens):
        if greedy:
            token = logits.argmax(-1)
        else:
            # generate's draw: the same warpers and the same multinomial call on the same
            # generator, so a seed gives generate's tokens.
            scores = warpers(None, logits)  # type: ignore[arg-type]  # these warpers ignore the ids
            token = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
        token = torch.where(unfinished, token, pad_token_id)
        tokens.append(token)
        unfinished &= ~torch.isin(token, eos)
        if step + 1 == settings.max_new_tokens or not bool(unfinished.any()):
            break
        if step_mask is None:
            attention_mask[:, prompt_len + step] = 1
        else:
            step_mask[..., prompt_len + step] = 0
        out = decoder(
            input_ids=token[:, None],
            attention_mask=attention_mask if step_mask is None else step_mask,
            position_ids=next_position + step,
            **{cache_name: cache},
            use_cache=True,
        )
        logits = head(out.last_hidden_state[:, -1]).float()
    return torch.stack(tokens, 1)


def sample_completions(
    model: Any,
    prompt_input_ids: Tensor,
    prompt_attention_mask: Tensor,
    settings: GenerationSettings,
    tokenizer: PreTrainedTokenizerBase,
    num_generations: int = 1,
    prompts_per_call: int | None = None,
    share_prompt: bool = True,
    vision_inputs: dict[str, Tensor] | None = None,
    image_counts: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``num_generations`` completions per prompt with :func:`decode`, in chunks.

    The model is put in eval mode for generation (and back into its previous mode after).
    Completions of one prompt are adjacent rows.

    Args:
        model: a causal LM (``transformers`` or PEFT model).
        prompt_input_ids: ``[P, Lp]`` left-padded prompts.
        prompt_attention_mask: ``[P, Lp]``.
        settings: sampling settings.
        tokenizer: gives the EOS and pad ids.
        num_generations: completions per prompt.
        prompts_per_call: prompts decoded together (``None``: all at once).
        share_prompt: prefill each prompt once for its completions.
        vision_inputs: image prompts' processor tensors (``pixel_values``…), ``image_counts`` per prompt.
        image_counts: ``[P]`` images per prompt, with ``vision_inputs``.

    Returns:
        ``(ids, mask, ended)`` as in :func:`cut_after_eos`, ``P·num_generations`` rows.
    """
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    step = prompts_per_call or prompt_input_ids.shape[0]
    was_training = model.training
    model.eval()
    try:
        pieces = []
        for start in range(0, prompt_input_ids.shape[0], step):
            ids, mask = _trim_left_padding(
                prompt_input_ids[start : start + step], prompt_attention_mask[start : start + step]
            )
            vision: dict[str, Any] = {}
            if vision_inputs is not None and image_counts is not None:
                rows = torch.arange(start, min(start + step, prompt_input_ids.shape[0]))
                vision = vision_of_prompts(vision_inputs, image_counts, rows)
            tokens = decode(model, ids, mask, settings, eos_ids, pad_id, num_generations, share_prompt, **vision)
            pieces.append(cut_after_eos(tokens, eos_ids, pad_id))
    finally:
        model.train(was_training)
    return (
        pad_right([p[0] for p in pieces], pad_id),
        pad_right([p[1] for p in pieces], 0),
        torch.cat([p[2] for p in pieces]),
    )
