"""The built-in rollout engine: the policy's own ``generate``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lit_pref.engines.base import (
    GenerationSettings,
    RolloutEngine,
    Samples,
    cut_after_eos,
    eos_token_ids,
    pad_right,
)


class GenerateEngine(RolloutEngine):
    """Samples with ``transformers``' ``generate`` on the policy itself, so the weights are always
    current (nothing to reload after an optimizer step) and it works with any strategy.

    Args:
        completions_per_call: completions per ``generate`` call (rounded down to whole prompt
            groups, at least one); ``None`` samples the whole batch at once.
    """

    def __init__(self, completions_per_call: int | None = None) -> None:
        if completions_per_call is not None and completions_per_call < 1:
            raise ValueError(f"completions_per_call must be >= 1 or null, got {completions_per_call}")
        self.completions_per_call = completions_per_call

    def sample(
        self,
        policy: torch.nn.Module,
        prompt_input_ids: Tensor,
        prompt_attention_mask: Tensor,
        num_generations: int,
        settings: GenerationSettings,
        tokenizer: PreTrainedTokenizerBase,
    ) -> Samples:
        per_call = self.completions_per_call
        prompts_per_call = None if per_call is None else max(1, per_call // num_generations)
        ids, mask, ended = sample_completions(
            policy, prompt_input_ids, prompt_attention_mask, settings, tokenizer, num_generations, prompts_per_call
        )
        return Samples(ids, mask, ended)


def _trim_left_padding(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    # A chunk of a left-padded batch may start with columns that are padding in every row.
    first = int(mask.any(0).long().argmax())
    return ids[:, first:], mask[:, first:]


@torch.no_grad()
def sample_completions(
    model: Any,
    prompt_input_ids: Tensor,
    prompt_attention_mask: Tensor,
    settings: GenerationSettings,
    tokenizer: PreTrainedTokenizerBase,
    num_generations: int = 1,
    prompts_per_call: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``num_generations`` completions per prompt with ``model.generate``, in chunks.

    The model is put in eval mode for generation (and back into its previous mode after).
    Completions of one prompt are adjacent rows.

    Args:
        model: a causal LM (``transformers`` or PEFT model).
        prompt_input_ids: ``[P, Lp]`` left-padded prompts.
        prompt_attention_mask: ``[P, Lp]``.
        settings: sampling settings.
        tokenizer: gives the EOS and pad ids.
        num_generations: completions per prompt.
        prompts_per_call: prompts per ``generate`` call (``None``: all at once).

    Returns:
        ``(ids, mask, ended)`` as in :func:`cut_after_eos`, ``P·num_generations`` rows.
    """
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = settings.generation_config(eos_ids, pad_id, num_generations)
    step = prompts_per_call or prompt_input_ids.shape[0]
    was_training = model.training
    model.eval()
    try:
        pieces = []
        for start in range(0, prompt_input_ids.shape[0], step):
            ids, mask = _trim_left_padding(
                prompt_input_ids[start : start + step], prompt_attention_mask[start : start + step]
            )
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            pieces.append(cut_after_eos(out[:, ids.shape[1] :], eos_ids, pad_id))
    finally:
        model.train(was_training)
    return (
        pad_right([p[0] for p in pieces], pad_id),
        pad_right([p[1] for p in pieces], 0),
        torch.cat([p[2] for p in pieces]),
    )


