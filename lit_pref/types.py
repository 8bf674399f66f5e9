"""Typed containers at module boundaries: the batches collators produce and the log-probs a forward pass returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias, TypedDict

from torch import Tensor
from typing_extensions import NotRequired


@dataclass
class CompletionLogps:
    """Per-token log-probabilities of completions under one model.

    ``Bc`` completions of length ``L`` (right-padded). Completion row ``j`` belongs to prompt
    ``j // k`` when a batch has ``k`` completions per prompt (chosen/rejected pairs are rows
    ``2i`` and ``2i + 1``).

    Attributes:
        token_logps: ``[Bc, L]`` log π(y_t | x, y_<t); 0 where ``mask`` is unset.
        mask: ``[Bc, L]`` bool, the completion tokens that count (the loss mask).
        mean_logits: ``[Bc]`` detached mean over vocabulary and counted tokens (a diagnostic).
        entropy: ``[Bc, L]`` per-token entropy when requested (detached unless ``entropy_grad``), else ``None``.
        log_sq_norm: ``[Bc, L]`` detached log Σ_v π(v)² per token (WPO) when requested, else ``None``.
        argmax: ``[Bc, L]`` most likely token at each counted position when requested (token
            accuracy), else ``None``; 0 where ``mask`` is unset.
    """

    token_logps: Tensor
    mask: Tensor
    mean_logits: Tensor
    entropy: Tensor | None = None
    log_sq_norm: Tensor | None = None
    argmax: Tensor | None = None

    @property
    def sum(self) -> Tensor:
        """``[Bc]`` sequence log-probability Σ_t log π(y_t)."""
        return self.token_logps.sum(-1)

    @property
    def count(self) -> Tensor:
        """``[Bc]`` number of counted completion tokens."""
        return self.mask.sum(-1)

    @property
    def mean(self) -> Tensor:
        """``[Bc]`` length-normalised log-probability (IPO, SimPO, ORPO)."""
        return self.sum / self.count.clamp(min=1)

    def pairs(self) -> tuple[CompletionLogps, CompletionLogps]:
        """Split an interleaved chosen/rejected batch into its (chosen, rejected) halves."""
        return self.select(slice(0, None, 2)), self.select(slice(1, None, 2))

    def select(self, rows: slice | Tensor) -> CompletionLogps:
        """The same fields restricted to ``rows``."""
        return CompletionLogps(
            token_logps=self.token_logps[rows],
            mask=self.mask[rows],
            mean_logits=self.mean_logits[rows],
            entropy=None if self.entropy is None else self.entropy[rows],
            log_sq_norm=None if self.log_sq_norm is None else self.log_sq_norm[rows],
            argmax=None if self.argmax is None else self.argmax[rows],
        )


# --------------------------------------------------------------------------- batches
# What the data module's collators hand a module, by data shape. Prompts are left-padded and
# completions right-padded (the layout of the shared log-prob path); any other dataset column
# passes through as a list (or a tensor for ``index`` / ``label`` / ``margin``).


class CompletionBatch(TypedDict):
    """Prompts and the completions that continue them: what :func:`lit_pref.ops.completion_logps` reads.

    ``Bc = k·Bp`` completions; completion row ``j`` continues prompt ``j // k``.
    """

    prompt_input_ids: Tensor  # [Bp, P]
    prompt_attention_mask: Tensor  # [Bp, P]
    completion_input_ids: Tensor  # [Bc, L]
    completion_attention_mask: Tensor  # [Bc, L]
    completion_mask: NotRequired[Tensor]  # [Bc, L] tokens whose log-prob counts (default: all real ones)
    # Vision-language rows: the image processor's tensors for the prompts' images, in row order
    # (``pixel_values``, ``image_grid_thw``…, passed to the prompt's forward pass), and images per prompt.
    vision_inputs: NotRequired[dict[str, Tensor]]
    image_counts: NotRequired[Tensor]  # [Bp]
    # The padding-free layout (``packing: true``, :mod:`lit_pref.data.packing`): each prompt once,
    # then its completions, in R sequences of T tokens; the forward pass runs on these.
    packed_input_ids: NotRequired[Tensor]  # [R, T]
    packed_position_ids: NotRequired[Tensor]  # [R, T] each completion's continue from its prompt's
    packed_sequence_ids: NotRequired[Tensor]  # [R, T] group within the row, -1 on padding
    packed_branch_ids: NotRequired[Tensor]  # [R, T] 0 prompt, j the j-th completion, -1 padding
    packed_source: NotRequired[Tensor]  # [Bc, L] flat packed position predicting each completion token


class PairedBatch(CompletionBatch):
    """Chosen / rejected pairs: completion rows ``2i`` (chosen) and ``2i + 1`` (rejected) continue prompt ``i``."""

    index: Tensor  # [Bp] row ids of the split (the precomputed reference table is keyed by them)
    margin: NotRequired[Tensor]  # [Bp] preference strength (reward modelling)


class UnpairedBatch(CompletionBatch):
    """One completion per prompt with a desirable / undesirable label (KTO, BCO)."""

    index: Tensor  # [B]
    label: Tensor  # [B] bool, desirable
    kl_completion_input_ids: NotRequired[Tensor]  # [B, L'] another row's completion (KTO's z0)
    kl_completion_attention_mask: NotRequired[Tensor]




class PromptBatch(TypedDict):
    """Prompts only (PPO, GRPO): the raw ``prompt`` column and every other dataset column come along
    for reward functions."""

    prompt_input_ids: Tensor  # [P, Lp]
    prompt_attention_mask: Tensor  # [P, Lp]
    prompt: NotRequired[list[Any]]  # text or messages per row
    vision_inputs: NotRequired[dict[str, Tensor]]  # as in CompletionBatch
    image_counts: NotRequired[Tensor]  # [P]


# A transformers causal LM (``PreTrainedModel``), possibly PEFT-wrapped. Typed as ``Any``: a PEFT
# model forwards every attribute to the model it wraps, which no static type describes, and
# ``torch.nn.Module.__getattr__`` would type each such attribute ``Tensor | Module``.
CausalLM: TypeAlias = Any
