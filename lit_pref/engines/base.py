"""The rollout-engine interface: sample k completions per prompt from the current policy.

An engine turns a batch of left-padded prompt ids into right-padded completion ids cut after
their first EOS token (the layout of the shared log-prob path: completion row ``j`` continues
prompt ``j // k``), and, if it computes them while sampling, their per-token log-probs. It is
told after every optimizer step that the policy's weights changed, so an engine that keeps its
own copy of the weights (vLLM) can reload them. The online modules
(:class:`~lit_pref.modules.online.OnlineRLModule`) only ever talk to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationSettings:
    """How rollouts are sampled.

    Sampling is plain ancestral sampling from ``softmax(logits / temperature)``, optionally
    restricted by top-p / top-k; the same temperature divides the logits when the rollout is
    scored, so the log-probs are those of the distribution actually sampled from (exactly so
    without top-p / top-k). Any other logits processing a model's own ``generation_config`` may
    ask for (repetition penalty, min-p, beams) is switched off, for the same reason.

    Args:
        max_new_tokens: completion length limit; a completion that reaches it without an EOS
            token is *truncated*.
        temperature: sampling temperature (> 0).
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; ``None`` or 0 disables it.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 or null, got {self.top_k}")

    def generation_config(
        self, eos_token_ids: list[int], pad_token_id: int, num_return_sequences: int
    ) -> GenerationConfig:
        return GenerationConfig(
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or 0,
            min_p=0.0,
            repetition_penalty=1.0,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=eos_token_ids,
            pad_token_id=pad_token_id,
            num_return_sequences=num_return_sequences,
            use_cache=True,
        )


@dataclass
class Samples:
    """What an engine returns for ``P`` prompts with ``k`` completions each (``N = P·k`` rows,
    the completions of one prompt adjacent).

    Attributes:
        completion_input_ids: ``[N, L]`` completion ids, EOS included, right-padded.
        completion_attention_mask: ``[N, L]`` 0/1, the real completion tokens.
        ended: ``[N]`` bool, whether each completion stopped at an EOS token (else it was cut at
            ``max_new_tokens``).
        token_logps: ``[N, L]`` the sampler's log-probs of the sampled tokens, when the engine
            computes them (``None`` otherwise); 0 where the mask is unset.
    """

    completion_input_ids: Tensor
    completion_attention_mask: Tensor
    ended: Tensor
    token_logps: Tensor | None = None


class RolloutEngine(ABC):
    """Samples completions for the online modules; subclass it to add an engine.

    An engine that samples from image prompts (a vision-language policy) sets ``takes_images``
    and its ``sample`` takes the batch's ``vision_inputs`` and ``image_counts`` as keywords.
    """

    takes_images: bool = False

    @abstractmethod
    def sample(
        self,
        policy: torch.nn.Module,
        prompt_input_ids: Tensor,
        prompt_attention_mask: Tensor,
        num_generations: int,
        settings: GenerationSettings,
        tokenizer: PreTrainedTokenizerBase,
    ) -> Samples:
        """``num_generations`` completions per prompt from ``policy`` (no grad).

        Args:
            policy: the module's policy, with its current weights.
            prompt_input_ids: ``[P, Lp]`` left-padded prompts.
            prompt_attention_mask: ``[P, Lp]``.
            num_generations: completions per prompt k.
            settings: how to sample.
            tokenizer: the policy's tokenizer (EOS and pad ids).
        """

    def weights_changed(self, policy: torch.nn.Module) -> None:  # noqa: B027 (a no-op by default)
        """Called after every optimizer step; an engine with its own copy of the weights reloads them here."""

    def metrics(self) -> dict[str, float]:
        """What the engine measured since the last call (e.g. start-up, weight-sync and generation
        seconds), logged by the online modules as ``train/rollout/<name>``. Empty by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold for sampling to continue identically after a resume (an
        engine with a random generator of its own returns its state); the process's global random
        state is saved by the module. Empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (nothing to restore by default)
        """Restore what :meth:`state_dict` returned (called right before the first resumed step)."""


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and those of the model's generation config."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for token in [extra] if isinstance(extra, int) else list(extra or ()):
        if token not in ids:
            ids.append(token)
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an EOS token")
    return ids


def cut_after_eos(tokens: Tensor, eos_ids: Sequence[int], pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each row up to and including its first EOS token; right-pad the rest.

    Args:
        tokens: ``[N, T]`` generated tokens (without the prompt).
        eos_ids: ids that end a completion.
        pad_token_id: id written after the end (the mask, not this id, says what is real).

    Returns:
        ``(ids, mask, ended)``: ``[N, T']`` ids, ``[N, T']`` 0/1 long mask with ``T'`` the
        longest kept row, and ``[N]`` bool, whether the row ends with an EOS token (otherwise it
        was truncated at the length limit).
    """
    is_eos = torch.isin(tokens, torch.as_tensor(list(eos_ids), device=tokens.device))
    ended = is_eos.any(-1)
    first_eos = torch.where(
        ended, is_eos.long().argmax(-1), torch.full_like(ended, tokens.shape[1], dtype=torch.long)
    )
    lengths = torch.where(ended, first_eos + 1, first_eos)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    mask = (positions[None, :] < lengths[:, None]).long()
    width = int(lengths.max()) if tokens.shape[0] else 0
    ids = torch.where(mask.bool(), tokens, torch.full_like(tokens, pad_token_id))
    return ids[:, :width], mask[:, :width], ended


def pad_right(rows: Sequence[Tensor], value: int) -> Tensor:
    """Concatenate ``[n_i, T_i]`` tensors along dim 0, right-padding to the widest with ``value``."""
    width = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=value) for r in rows])


