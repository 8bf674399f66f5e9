"""The rollout buffer of the online modules: sampled completions, laid out for the log-prob path.

A rollout starts from a prompt-only batch (prompts left-padded, as the data module collates
them) and holds ``k`` completions per prompt from a rollout engine (:mod:`lit_pref.engines`),
cut after their first EOS token and right-padded, so it has exactly the layout of the shared
log-prob path (:func:`lit_pref.ops.completion_logps`): completion row ``j`` continues prompt
``j // k``. The prompts stay token ids throughout: the tokens the policy was conditioned on when
sampling are the tokens it is scored on, with no decode / re-encode round trip.

What an algorithm computes per completion (old log-probs, reference log-probs, values,
advantages…) lives in its own typed :class:`CompletionTensors` dataclass, which a mini-batch of
prompt groups selects with the same completion rows as the rollout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lit_pref.data.formats import is_conversation
from lit_pref.engines.base import GenerationSettings, RolloutEngine
from lit_pref.types import CompletionBatch, PromptBatch

if TYPE_CHECKING:
    from lit_pref.rewards import RewardSet

# Batch keys that are model inputs; every other key of a prompt-only batch is a dataset column.
TOKEN_KEYS = ("prompt_input_ids", "prompt_attention_mask", "vision_inputs", "image_counts")


@dataclass
class Rollout:
    """Sampled completions of a batch of prompts and everything computed about them.

    ``P`` prompts with ``k`` completions each; completion row ``j`` belongs to prompt ``j // k``.

    Attributes:
        prompt_input_ids: ``[P, Lp]`` left-padded prompt ids (the data module's, unchanged).
        prompt_attention_mask: ``[P, Lp]``.
        completion_input_ids: ``[P·k, L]`` right-padded completion ids, EOS included.
        completion_attention_mask: ``[P·k, L]`` 0/1, the real completion tokens.
        ended: ``[P·k]`` bool, whether each completion stopped at an EOS token.
        num_generations: k.
        prompts: the raw ``prompt`` column per prompt (text or messages).
        completions: decoded completions per completion row (text, or an assistant message
            list when the prompt is a conversation).
        columns: the dataset's other columns, one list entry per prompt.
        sampler_logps: ``[P·k, L]`` the engine's log-probs of the sampled tokens, when it has them.
        vision_inputs: image prompts' processor tensors (``pixel_values``…, as the batch's), else ``None``.
        image_counts: ``[P]`` images per prompt, with ``vision_inputs``.
    """

    prompt_input_ids: Tensor
    prompt_attention_mask: Tensor
    completion_input_ids: Tensor
    completion_attention_mask: Tensor
    ended: Tensor
    num_generations: int
    prompts: list[Any]
    completions: list[Any]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    sampler_logps: Tensor | None = None
    vision_inputs: dict[str, Tensor] | None = None
    image_counts: Tensor | None = None

    @property
    def num_prompts(self) -> int:
        return self.prompt_input_ids.shape[0]

    @property
    def num_completions(self) -> int:
        return self.completion_input_ids.shape[0]

    @property
    def mask(self) -> Tensor:
        """``[P·k, L]`` bool completion mask."""
        return self.completion_attention_mask.bool()

    @property
    def lengths(self) -> Tensor:
        """``[P·k]`` completion lengths in tokens (EOS included)."""
        return self.completion_attention_mask.sum(-1)

    def batch(self) -> CompletionBatch:
        """The rollout as a batch for :func:`lit_pref.ops.completion_logps`."""
        batch = CompletionBatch(
            prompt_input_ids=self.prompt_input_ids,
            prompt_attention_mask=self.prompt_attention_mask,
            completion_input_ids=self.completion_input_ids,
            completion_attention_mask=self.completion_attention_mask,
        )
        if self.vision_inputs is not None and self.image_counts is not None:
            batch["vision_inputs"], batch["image_counts"] = self.vision_inputs, self.image_counts
        return batch

    def completion_rows(self, prompt_rows: Tensor) -> Tensor:
        """Completion row indices of the given prompt rows, groups kept together and in order."""
        k = self.num_generations
        offsets = torch.arange(k, device=prompt_rows.device)
        return (prompt_rows[:, None] * k + offsets).reshape(-1)

    def select(self, prompt_rows: Tensor) -> Rollout:
        """The sub-rollout of ``prompt_rows`` (a 1-D index tensor) with all their completions."""
        prompt_rows = prompt_rows.to(self.prompt_input_ids.device)
        rows = self.completion_rows(prompt_rows)
        p_list, c_list = prompt_rows.tolist(), rows.tolist()
        return Rollout(
            prompt_input_ids=self.prompt_input_ids[prompt_rows],
            prompt_attention_mask=self.prompt_attention_mask[prompt_rows],
            completion_input_ids=self.completion_input_ids[rows],
            completion_attention_mask=self.completion_attention_mask[rows],
            ended=self.ended[rows],
            num_generations=self.num_generations,
            prompts=[self.prompts[i] for i in p_list],
            completions=[self.completions[i] for i in c_list],
            columns={name: [values[i] for i in p_list] for name, values in self.columns.items()},
            sampler_logps=None if self.sampler_logps is None else self.sampler_logps[rows],
            **self.vision_of(prompt_rows),
        )

    def vision_of(self, prompt_rows: Tensor) -> dict[str, Any]:
        """``vision_inputs`` / ``image_counts`` of ``prompt_rows`` (nothing for text prompts)."""
        if self.vision_inputs is None or self.image_counts is None:
            return {}
        from lit_pref.vision.processing import vision_of_prompts

        return vision_of_prompts(self.vision_inputs, self.image_counts, prompt_rows)

    def chunks(self, max_completions: int) -> Iterator[Rollout]:
        """Consecutive sub-rollouts of whole prompt groups with at most ``max_completions`` rows
        (at least one group each)."""
        per_chunk = max(1, max_completions // self.num_generations)
        rows = torch.arange(self.num_prompts, device=self.prompt_input_ids.device)
        for start in range(0, self.num_prompts, per_chunk):
            yield self.select(rows[start : start + per_chunk])

    def completion_columns(self) -> dict[str, list[Any]]:
        """The dataset columns repeated so there is one entry per completion."""
        k = self.num_generations
        return {name: [v for v in values for _ in range(k)] for name, values in self.columns.items()}

    def completion_prompts(self) -> list[Any]:
        """The raw prompt of each completion row."""
        return [p for p in self.prompts for _ in range(self.num_generations)]

    def sequences(self, pad_token_id: int) -> tuple[Tensor, Tensor]:
        """``[P·k, Lp + L]`` prompt + completion ids with their real tokens first, right-padded.

        What a sequence scorer (a reward model) reads: exactly the tokens sampled and the tokens
        they were conditioned on.
        """
        k = self.num_generations
        prompt_ids = self.prompt_input_ids.repeat_interleave(k, 0)
        prompt_mask = self.prompt_attention_mask.repeat_interleave(k, 0)
        ids = torch.cat([prompt_ids, self.completion_input_ids], 1)
        mask = torch.cat([prompt_mask, self.completion_attention_mask], 1)
        # A stable sort on "is padding" moves the real tokens to the front in their order.
        order = torch.sort((mask == 0).long(), dim=1, stable=True).indices
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token_id))
        width = int(mask.sum(-1).max())
        return ids[:, :width], mask[:, :width]


def decode_completions(
    tokenizer: PreTrainedTokenizerBase,
    ids: Tensor,
    mask: Tensor,
    prompts: Sequence[Any],
    num_generations: int,
) -> list[Any]:
    """Completion text without special tokens; an assistant message list for conversational prompts."""
    rows = [row[: int(n)].tolist() for row, n in zip(ids, mask.sum(-1), strict=True)]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [
        [{"role": "assistant", "content": text}] if is_conversation(prompts[j // num_generations]) else text
        for j, text in enumerate(texts)
    ]


def prompt_batch_columns(
    batch: PromptBatch, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Any], dict[str, list]]:
    """(raw prompts, other dataset columns) of a prompt-only batch.

    The prompts are the batch's ``prompt`` column (text or messages) when present, else the
    decoded prompt ids.
    """
    size = batch["prompt_input_ids"].shape[0]
    prompts = batch.get("prompt")
    if prompts is None:
        rows = [
            ids[m.bool()].tolist()
            for ids, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"], strict=True)
        ]
        prompts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    columns = {}
    for key, value in batch.items():
        if key in TOKEN_KEYS or key == "prompt":
            continue
        columns[key] = value.tolist() if isinstance(value, Tensor) else list(cast(list, value))
        if len(columns[key]) != size:
            raise ValueError(f"batch column {key!r} has {len(columns[key])} entries for {size} prompts")
    return list(prompts), columns


def generate_rollout(
    engine: RolloutEngine,
    policy: torch.nn.Module,
    batch: PromptBatch,
    settings: GenerationSettings,
    tokenizer: PreTrainedTokenizerBase,
    num_generations: int = 1,
) -> Rollout:
    """Sample a :class:`Rollout` for a prompt-only batch with ``engine``.

    Args:
        engine: the rollout engine.
        policy: the policy to sample from.
        batch: a collated prompt-only batch (``prompt_input_ids``, ``prompt_attention_mask``,
            the raw ``prompt`` column and any other dataset columns).
        settings: sampling settings.
        tokenizer: the policy's tokenizer.
        num_generations: completions per prompt.
    """
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    vision: dict[str, Any] = {key: batch[key] for key in ("vision_inputs", "image_counts") if key in batch}
    if vision and not engine.takes_images:
        raise ValueError(f"{type(engine).__name__} cannot sample from image prompts; use rollout_engine: generate")
    samples = engine.sample(policy, prompt_ids, prompt_mask, num_generations, settings, tokenizer, **vision)
    ids, mask = samples.completion_input_ids, samples.completion_attention_mask
    prompts, columns = prompt_batch_columns(batch, tokenizer)
    return Rollout(
        prompt_input_ids=prompt_ids,
        prompt_attention_mask=prompt_mask,
        completion_input_ids=ids,
        completion_attention_mask=mask,
        ended=samples.ended,
        num_generations=num_generations,
        prompts=prompts,
        completions=decode_completions(tokenizer, ids, mask, prompts, num_generations),
        columns=columns,
        sampler_logps=samples.token_logps,
        **vision,
    )


TensorsT = TypeVar("TensorsT", bound="CompletionTensors")


@dataclass
class CompletionTensors:
    """Base of an algorithm's typed per-completion tensors (first dimension ``P·k``, the rollout's
    completion rows); optional fields may be ``None``.

    A mini-batch selects them with the same completion rows as the rollout
    (:meth:`Rollout.completion_rows`), and chunked scoring concatenates them (:func:`score_in_chunks`).
    """

    def select(self: TensorsT, rows: Tensor) -> TensorsT:
        """The same fields restricted to completion ``rows``."""
        return dataclasses.replace(
            self,
            **{
                f.name: value[rows.to(value.device)]
                for f in dataclasses.fields(self)
                if isinstance(value := getattr(self, f.name), Tensor)
            },
        )

    @classmethod
    def concat(cls: type[TensorsT], parts: Sequence[TensorsT]) -> TensorsT:
        """Fields of consecutive chunks concatenated on dim 0 (a field ``None`` in the chunks stays ``None``)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            column = [getattr(part, f.name) for part in parts]
            values[f.name] = torch.cat(column) if all(isinstance(v, Tensor) for v in column) else None
        return cls(**values)


def score_in_chunks(
    rollout: Rollout, max_completions: int, fn: Callable[[Rollout], TensorsT]
) -> TensorsT:
    """``fn`` over consecutive chunks of ``rollout`` (whole prompt groups, at most ``max_completions``
    rows each), its results concatenated: one no-grad scoring pass that fits in memory."""
    parts = [fn(chunk) for chunk in rollout.chunks(max_completions)]
    return type(parts[0]).concat(parts)


def score_rollout(
    rewards: RewardSet, rollout: Rollout, pad_token_id: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total reward per completion (on the rollout's device) and each source's raw reward (CPU)."""
    ids, mask = rollout.sequences(pad_token_id)
    lengths = rollout.lengths.tolist()
    total, per_source = rewards.score(
        rollout.completion_prompts(),
        rollout.completions,
        rollout.completion_columns(),
        completion_ids=[
            row[:n].tolist() for row, n in zip(rollout.completion_input_ids, lengths, strict=True)
        ],
        sequence_ids=ids,
        sequence_mask=mask,
        ended=rollout.ended,
    )
    return total.to(rollout.completion_input_ids.device), per_source


