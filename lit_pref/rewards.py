"""Reward sources for online RL: trained reward models and Python reward functions, weighted.

A reward source is named by a string:

* ``"pkg.module:function"`` — a Python function called as
  ``function(prompts, completions, **columns) -> list[float | None]``. ``prompts`` and
  ``completions`` have one entry per completion (text, or message lists for conversational
  prompts); ``columns`` holds the dataset's other columns repeated per completion, plus
  ``completion_ids`` (the sampled token ids). Functions must accept ``**kwargs``. ``None`` means
  "does not apply to this completion": the completion's total is then the weighted sum of the
  sources that did score it, and a completion no source scored gets 0, counted in a warning.
  NaN, infinities and values that are not numbers are errors naming the function and the
  completion: training on them would silently poison the advantages.
* a directory — a reward model (the reward stage's output), loaded with
  :class:`lit_pref.scoring.RewardScorer` and read at the last real token. When it shares the
  policy's tokenizer it scores the exact prompt + completion token ids that were sampled;
  otherwise it scores the decoded text with its own tokenizer.

Python callers may also pass a callable instead of a string.
"""

from __future__ import annotations

import importlib
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def import_object(path: str) -> Any:
    """The object named ``"pkg.module:name"`` (``name`` may be dotted, e.g. ``Class.method``)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected an import path 'pkg.module:name', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} for reward {path!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attribute!r} (reward {path!r})")
        obj = getattr(obj, part)
    return obj


def _sample(index: int, prompts: Sequence[Any], completions: Sequence[Any]) -> str:
    return f"completion {index} (prompt {str(prompts[index])[:60]!r}, completion {str(completions[index])[:60]!r})"


def _function_rewards(name: str, out: list[Any], prompts: Sequence[Any], completions: Sequence[Any]) -> Tensor:
    """A function's rewards as float32, NaN where it returned None; anything else not finite is an error."""
    values = []
    for i, value in enumerate(out):
        if value is None:
            values.append(math.nan)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"reward function {name} returned {value!r} ({type(value).__name__}) for "
                f"{_sample(i, prompts, completions)}; expected a number, or None where it does not apply"
            ) from None
        if not math.isfinite(number):
            raise ValueError(
                f"reward function {name} returned {number} for {_sample(i, prompts, completions)}; a reward "
                "must be a finite number, or None where it does not apply"
            )
        values.append(number)
    return torch.tensor(values, dtype=torch.float32)


def is_model_dir(source: object) -> bool:
    """Whether ``source`` is a local model or PEFT adapter directory."""
    return isinstance(source, (str, Path)) and any(
        (Path(source) / name).is_file() for name in ("config.json", "adapter_config.json")
    )


def load_reward_scorer(directory: str) -> Any:
    """The frozen reward model saved in ``directory`` by the reward stage."""
    from lit_pref.scoring import RewardScorer

    return RewardScorer.from_pretrained(directory)


def _scorer_module(scorer: Any) -> torch.nn.Module | None:
    if isinstance(scorer, torch.nn.Module):
        return scorer
    model = getattr(scorer, "model", None)
    return model if isinstance(model, torch.nn.Module) else None


def same_tokenizer(policy: PreTrainedTokenizerBase | None, scorer: PreTrainedTokenizerBase | None) -> bool:
    """Whether ids from ``policy`` mean the same to ``scorer``: same special tokens, and every token of
    the policy's vocabulary under the same id (the scorer may know extra tokens)."""
    if policy is None or scorer is None:
        return False
    if policy is scorer:
        return True
    specials = ("bos_token_id", "eos_token_id", "pad_token_id")
    if any(getattr(policy, s) != getattr(scorer, s) for s in specials):
        return False
    vocab = scorer.get_vocab()
    return all(vocab.get(token) == index for token, index in policy.get_vocab().items())


@dataclass
class RewardSource:
    """One reward source and its weight (see the module docstring for the source strings)."""

    name: str
    weight: float
    function: Callable[..., Sequence[float | None]] | None = None
    directory: str | None = None
    scorer: Any = None
    score_ids: bool = False

    @property
    def is_model(self) -> bool:
        return self.directory is not None


def _source_name(source: Any, taken: set[str]) -> str:
    if isinstance(source, str):
        name = source.rpartition(":")[2] if ":" in source and not is_model_dir(source) else Path(source).name
    else:
        name = getattr(source, "__name__", type(source).__name__)
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}_{n}"
    taken.add(unique)
    return unique


class RewardSet:
    """Weighted reward sources, scored together.

    The total reward of a completion is ``Σ_s w_s · r_s`` over the sources that scored it (a
    function may return ``None`` for completions it does not apply to), minus
    ``missing_eos_penalty`` when the completion was cut at the length limit without an EOS.

    Args:
        sources: import paths ``"pkg.module:fn"``, reward-model directories or callables.
        weights: one per source (default: all 1).
        missing_eos_penalty: subtracted from the total of completions that hit
            ``max_new_tokens`` without an EOS token (``None``: no penalty).
        batch_size: completions per reward-model forward pass.
    """

    def __init__(
        self,
        sources: str | Callable | Sequence[str | Callable],
        weights: Sequence[float] | None = None,
        missing_eos_penalty: float | None = None,
        batch_size: int = 64,
    ) -> None:
        if isinstance(sources, str) or callable(sources):
            sources = [sources]
        sources = list(sources)
        if not sources:
            raise ValueError(
                "give at least one reward: a reward-model directory or a function 'pkg.module:fn'"
            )
        if weights is not None and len(weights) != len(sources):
            raise ValueError(
                f"{len(weights)} reward_weights for {len(sources)} rewards; give one weight per reward"
            )
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if missing_eos_penalty is not None and missing_eos_penalty < 0:
            raise ValueError(
                f"missing_eos_penalty must be >= 0 (it is subtracted), got {missing_eos_penalty}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.missing_eos_penalty = missing_eos_penalty
        self.batch_size = batch_size
        self.unscored = 0  # completions no source scored, over every call
        self.sources: list[RewardSource] = []
        taken: set[str] = set()
        for source, weight in zip(sources, weights, strict=True):
            name = _source_name(source, taken)
            if callable(source):
                self.sources.append(RewardSource(name, weight, function=source))
            elif is_model_dir(source):
                self.sources.append(RewardSource(name, weight, directory=str(source)))
            elif isinstance(source, str) and ":" in source:
                function = import_object(source)
                if not callable(function):
                    raise ValueError(f"reward {source!r} is not callable")
                self.sources.append(RewardSource(name, weight, function=function))
            else:
                raise ValueError(
                    f"reward {source!r} is neither a reward-model directory (with a config.json) nor an import "
                    "path 'pkg.module:function'"
                )

    @property
    def model_directories(self) -> list[str]:
        return [s.directory for s in self.sources if s.directory is not None]

    def load_models(self, policy_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Load the reward models (frozen); each scores token ids when it shares ``policy_tokenizer``."""
        for source in self.sources:
            if source.directory is not None and source.scorer is None:
                source.scorer = load_reward_scorer(source.directory)
                module = _scorer_module(source.scorer)
                if module is not None:
                    module.requires_grad_(False).eval()
                source.score_ids = same_tokenizer(policy_tokenizer, getattr(source.scorer, "tokenizer", None))
                how = "sampled token ids" if source.score_ids else "decoded text (its own tokenizer)"
                log.info("reward model %s scores %s", source.directory, how)

    def to(self, device: torch.device | str) -> RewardSet:
        """Move the reward models to ``device`` (they are not part of the LightningModule's state)."""
        for source in self.sources:
            module = _scorer_module(source.scorer)
            if module is not None:
                module.to(device)
        return self

    def _score_model(
        self, source: RewardSource, prompts, completions, ids: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        scores = []
        for start in range(0, len(completions), self.batch_size):
            end = start + self.batch_size
            if source.score_ids:
                if ids is None or mask is None:
                    raise ValueError(f"reward model {source.directory} scores token ids: pass sequence_ids and sequence_mask")
                chunk_mask = mask[start:end]
                width = int(chunk_mask.sum(-1).max())
                values = source.scorer.score_ids(ids[start:end, :width], chunk_mask[:, :width])
                scores.append(torch.as_tensor(values, dtype=torch.float32).reshape(-1).cpu())
            else:
                values = source.scorer.score(list(prompts[start:end]), list(completions[start:end]))
                scores.append(torch.as_tensor(values, dtype=torch.float32).reshape(-1))
        return torch.cat(scores)

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        columns: dict[str, list[Any]] | None = None,
        *,
        completion_ids: list[list[int]] | None = None,
        sequence_ids: Tensor | None = None,
        sequence_mask: Tensor | None = None,
        ended: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total reward per completion and each source's raw reward.

        Args:
            prompts: one raw prompt per completion.
            completions: one decoded completion per completion.
            columns: dataset columns, one entry per completion (passed to functions).
            completion_ids: sampled ids per completion (passed to functions).
            sequence_ids: ``[N, T]`` prompt + completion ids, real tokens first (reward models
                sharing the policy's tokenizer read these).
            sequence_mask: ``[N, T]`` their attention mask.
            ended: ``[N]`` bool, whether each completion ended with EOS (for the penalty).

        Returns:
            ``(total, per_source)``: ``[N]`` float32 tensors on the CPU; a source's entries are NaN
            where it returned ``None``.
        """
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        kwargs = dict(columns or {})
        if completion_ids is not None:
            kwargs["completion_ids"] = completion_ids
        per_source: dict[str, Tensor] = {}
        for source in self.sources:
            if source.is_model:
                if source.scorer is None:
                    raise RuntimeError(
                        f"reward model {source.directory} is not loaded (call load_models first)"
                    )
                values = self._score_model(source, prompts, completions, sequence_ids, sequence_mask)
                bad = (~values.isfinite()).nonzero().flatten().tolist()
                if bad:
                    raise ValueError(
                        f"reward model {source.directory} gave {values[bad[0]].item()} for {len(bad)} of {n} "
                        f"completions, e.g. {_sample(bad[0], prompts, completions)}; its scores must be finite "
                        "(a float16 overflow? load it in float32 or bfloat16)"
                    )
            else:
                assert source.function is not None  # a source is a model directory or a function
                out = source.function(list(prompts), list(completions), **kwargs)
                out = list(out)
                if len(out) != n:
                    raise ValueError(
                        f"reward function {source.name} returned {len(out)} rewards for {n} completions"
                    )
                values = _function_rewards(source.name, out, prompts, completions)
            per_source[source.name] = values
        stacked = torch.stack(list(per_source.values()), -1)
        weights = torch.tensor([s.weight for s in self.sources], dtype=torch.float32)
        scored = ~stacked.isnan()
        total = torch.where(scored, stacked * weights, torch.zeros_like(stacked)).sum(-1)
        unscored = int((~scored.any(-1)).sum())
        self.unscored += unscored
        if unscored:
            warnings.warn(
                f"{unscored} of {n} completions were scored by no reward source (every source returned None "
                f"for them); their reward is 0 ({self.unscored} so far)",
                stacklevel=2,
            )
        if self.missing_eos_penalty is not None and ended is not None:
            total = total - self.missing_eos_penalty * (~ended.cpu().bool()).float()
        return total, per_source
