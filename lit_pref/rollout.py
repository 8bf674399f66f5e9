"""Online rollouts shared by PPO and GRPO: sample completions, lay them out, score them in chunks.

A rollout starts from a prompt-only batch (prompts left-padded, as the data module collates
them) and samples ``k`` completions per prompt with the policy's ``generate``. The completions are
cut after their first EOS token and right-padded, so the rollout has exactly the layout of the
shared log-prob path (:func:`lit_pref.ops.completion_logps`): completion row ``j`` continues
prompt ``j // k``. The prompts stay token ids throughout: the tokens the policy was conditioned on
when sampling are the tokens it is scored on, with no decode / re-encode round trip.

Everything an algorithm computes per completion (old log-probs, reference log-probs, values,
advantages…) is stored in :attr:`Rollout.data`, so that a mini-batch of prompt groups selects
all of it at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lit_pref.data.formats import is_conversation

if TYPE_CHECKING:
    from lightning import LightningModule

    from lit_pref.rewards import RewardSet

# Batch keys that are model inputs; every other key of a prompt-only batch is a dataset column.
TOKEN_KEYS = ("prompt_input_ids", "prompt_attention_mask")


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
        data: per-completion tensors (first dimension ``P·k``) added by the algorithm.
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
    data: dict[str, Tensor] = field(default_factory=dict)

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

    def batch(self) -> dict[str, Tensor]:
        """The rollout as a batch for :func:`lit_pref.ops.completion_logps`."""
        return {
            "prompt_input_ids": self.prompt_input_ids,
            "prompt_attention_mask": self.prompt_attention_mask,
            "completion_input_ids": self.completion_input_ids,
            "completion_attention_mask": self.completion_attention_mask,
        }

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
            data={name: value[rows.to(value.device)] for name, value in self.data.items()},
        )

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
    batch: dict[str, Any], tokenizer: PreTrainedTokenizerBase
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
        columns[key] = value.tolist() if isinstance(value, Tensor) else list(value)
        if len(columns[key]) != size:
            raise ValueError(f"batch column {key!r} has {len(columns[key])} entries for {size} prompts")
    return list(prompts), columns


def generate_rollout(
    model: Any,
    batch: dict[str, Any],
    settings: GenerationSettings,
    tokenizer: PreTrainedTokenizerBase,
    num_generations: int = 1,
    rollout_batch_size: int | None = None,
) -> Rollout:
    """Sample a :class:`Rollout` for a prompt-only batch.

    Args:
        model: the policy.
        batch: a collated prompt-only batch (``prompt_input_ids``, ``prompt_attention_mask``,
            the raw ``prompt`` column and any other dataset columns).
        settings: sampling settings.
        tokenizer: the policy's tokenizer.
        num_generations: completions per prompt.
        rollout_batch_size: completions per ``generate`` call (rounded down to whole prompt
            groups, at least one); ``None`` generates the whole batch at once.
    """
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    per_call = None if rollout_batch_size is None else max(1, rollout_batch_size // num_generations)
    ids, mask, ended = sample_completions(
        model, prompt_ids, prompt_mask, settings, tokenizer, num_generations, per_call
    )
    prompts, columns = prompt_batch_columns(batch, tokenizer)
    return Rollout(
        prompt_input_ids=prompt_ids,
        prompt_attention_mask=prompt_mask,
        completion_input_ids=ids,
        completion_attention_mask=mask,
        ended=ended,
        num_generations=num_generations,
        prompts=prompts,
        completions=decode_completions(tokenizer, ids, mask, prompts, num_generations),
        columns=columns,
    )


def map_chunks(
    rollout: Rollout, max_completions: int, fn: Callable[[Rollout], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """``fn`` over consecutive chunks of ``rollout`` (whole prompt groups), concatenated on dim 0.

    ``fn`` returns named tensors whose first dimension is the chunk's completions and whose other
    dimensions match the rollout's (e.g. ``[n, L]`` per-token values); ``None`` values are dropped.
    """
    outputs: dict[str, list[Tensor]] = {}
    for chunk in rollout.chunks(max_completions):
        for name, value in fn(chunk).items():
            if value is not None:
                outputs.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in outputs.items()}


def completion_stats(rollout: Rollout) -> dict[str, Tensor]:
    """Completion length (mean / min / max, in tokens) and the fraction that end with EOS."""
    lengths = rollout.lengths.float()
    return {
        "completions/mean_length": lengths,
        "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(),
        "completions/eos_fraction": rollout.ended.float(),
    }


def minibatch_indices(
    num_prompts: int, num_mini_batches: int, accumulation_steps: int, generator: torch.Generator | None = None
) -> list[list[Tensor]]:
    """A shuffled split of prompt rows into mini-batches, each a list of micro-batches.

    One optimizer step is taken per mini-batch; its micro-batches are accumulated. Empty
    micro-batches (more splits than prompts) are left out, and a mini-batch with none at all.
    """
    order = torch.randperm(num_prompts, generator=generator)
    plan = []
    for mini in torch.tensor_split(order, num_mini_batches):
        micros = [m for m in torch.tensor_split(mini, accumulation_steps) if m.numel()]
        if micros:
            plan.append(micros)
    return plan


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


def reward_metrics(scores: Tensor, per_source: dict[str, Tensor]) -> dict[str, Tensor]:
    """``score`` (the weighted total, penalty included) and ``rewards/<source>`` (raw, where scored)."""
    metrics = {"score": scores.float()}
    if len(per_source) > 1 or any(v.isnan().any() for v in per_source.values()):
        for name, values in per_source.items():
            scored = values[~values.isnan()]
            if scored.numel():
                metrics[f"rewards/{name}"] = scored.to(scores.device)
    return metrics


def sample_rows(
    rollout: Rollout, scores: Tensor, per_source: dict[str, Tensor], tokenizer: PreTrainedTokenizerBase
) -> list[dict[str, Any]]:
    """One plain dict per completion (prompt text, completion text, rewards) for sample tables."""
    prompt_text = tokenizer.batch_decode(
        [
            ids[m.bool()].tolist()
            for ids, m in zip(rollout.prompt_input_ids, rollout.prompt_attention_mask, strict=True)
        ],
        skip_special_tokens=True,
    )
    score_list = scores.float().cpu().tolist()
    sources = {name: values.tolist() for name, values in per_source.items()}
    rows = []
    for j, completion in enumerate(rollout.completions):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        row = {
            "prompt": prompt_text[j // rollout.num_generations],
            "completion": text,
            "score": score_list[j],
        }
        if len(sources) > 1:
            row |= {f"reward/{name}": values[j] for name, values in sources.items()}
        rows.append(row)
    return rows


def optimizer_step(module: LightningModule, max_grad_norm: float | None) -> None:
    """Clip the accumulated gradients, step the optimizer and the step-interval schedulers, zero the gradients.

    Manual optimisation: Lightning neither clips nor steps schedulers for us.
    """
    optimizer = module.optimizers()
    if max_grad_norm is not None:
        module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedulers = module.lr_schedulers()
    for scheduler in (
        schedulers if isinstance(schedulers, list) else [schedulers] if schedulers is not None else []
    ):
        scheduler.step()
