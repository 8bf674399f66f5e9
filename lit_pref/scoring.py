"""Score (prompt, completion) pairs with a trained reward model.

>>> scorer = RewardScorer.from_pretrained("outputs/reward")          # doctest: +SKIP
>>> scorer.score(["Write a happy line about sea:"], [" good warm joy"])  # doctest: +SKIP
[1.73]

A reward model is either a sequence classifier with one output (``AutoModelForSequenceClassification``
with ``num_labels=1``) or a causal LM with a scalar value head, whose weights live next to the
model as ``value_head.safetensors``. Either way the reward is read at each row's last real token,
found from the attention mask (never from ``ids != pad``, which breaks when pad == EOS), so left,
right or two-sided padding all give the same value.

The pieces the ``RewardModel`` LightningModule trains with (:func:`reward_network_parts`,
:func:`sequence_rewards`, the value-head files) live here too, so training and scoring read the
reward the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_pref.data.tokenize import TruncationConfig, encode_completion, encode_prompt, truncate
from lit_pref.models import DTYPES, freeze, is_adapter_dir, is_peft_model, load_causal_lm, load_tokenizer
from lit_pref.ops import completion_hidden, last_token_index, position_ids_from_mask, text_decoder
from lit_pref.types import CausalLM, CompletionBatch

VALUE_HEAD_FILE = "value_head.safetensors"
# Attribute names of a sequence classifier's output layer, in the order they are tried.
CLASSIFIER_HEADS = ("score", "classifier")

__all__ = [
    "VALUE_HEAD_FILE",
    "RewardScorer",
    "ValueModel",
    "has_value_head",
    "is_sequence_classifier",
    "load_reward_network",
    "load_sequence_classifier",
    "load_value_head",
    "new_value_head",
    "reward_network_parts",
    "save_value_head",
    "sequence_rewards",
    "values_from_hidden",
    "zero_value_head",
]


# ----------------------------------------------------------------- value head
def new_value_head(
    hidden_size: int,
    init: Literal["normal", "zeros"] = "normal",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Linear:
    """A fresh ``hidden_size → 1`` linear head: the one constructor of reward and value heads.

    Args:
        hidden_size: width of the hidden states it reads.
        init: ``normal``: weights ~ N(0, 1/hidden_size) and a zero bias, for a reward model
            (rewards differ between completions from the first step, so the backbone gets a
            gradient at once); ``zeros``: zero weights and no bias, for PPO's value function
            (V = 0 at the start, so the first advantages are the KL-shaped returns themselves).
        dtype: parameter dtype (default: torch's).
        device: parameter device.
    """
    if init not in ("normal", "zeros"):
        raise ValueError(f"init must be normal or zeros, got {init!r}")
    head = torch.nn.Linear(hidden_size, 1, bias=init == "normal", dtype=dtype, device=device)
    if init == "zeros":
        torch.nn.init.zeros_(head.weight)
    else:
        torch.nn.init.normal_(head.weight, std=hidden_size**-0.5)
        torch.nn.init.zeros_(head.bias)
    return head


def has_value_head(directory: str | Path) -> bool:
    return (Path(directory) / VALUE_HEAD_FILE).is_file()


def save_value_head(head: torch.nn.Linear, directory: str | Path) -> Path:
    """Write ``head``'s weights to ``directory/value_head.safetensors``."""
    from safetensors.torch import save_file

    path = Path(directory) / VALUE_HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))
    return path


def load_value_head(directory: str | Path) -> torch.nn.Linear:
    """The value head saved in ``directory`` by :func:`save_value_head`."""
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / VALUE_HEAD_FILE))
    weight = state["weight"]
    if weight.dim() != 2 or weight.shape[0] != 1:
        raise ValueError(
            f"{Path(directory) / VALUE_HEAD_FILE} holds a {tuple(weight.shape)} weight, expected [1, hidden]"
        )
    head = torch.nn.Linear(weight.shape[1], 1)
    head.load_state_dict(state)
    return head


# ------------------------------------------------------------------- loading
def is_sequence_classifier(config: Any) -> bool:
    """Whether a model configuration names a ``…ForSequenceClassification`` architecture."""
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or ())


def load_sequence_classifier(
    source: str | PreTrainedModel, dtype: str = "auto", attn_implementation: str | None = None
) -> PreTrainedModel:
    """A one-output sequence classifier from a hub id or local path (a model object as is).

    A causal-LM checkpoint gets a freshly initialised one-output head (``transformers`` says so).
    """
    if not isinstance(source, str):
        return source
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = AutoConfig.from_pretrained(source)
    if is_sequence_classifier(config) and config.num_labels != 1:
        raise ValueError(
            f"{source} is a classifier with {config.num_labels} outputs; a reward model has exactly one"
        )
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "num_labels": 1}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForSequenceClassification.from_pretrained(source, **kwargs)


def load_reward_network(
    source: str, dtype: str = "auto", attn_implementation: str | None = None, trainable: bool = False
) -> tuple[torch.nn.Module, torch.nn.Linear | None]:
    """(network, value head or ``None``) saved in ``source`` by the reward stage.

    ``source`` is a model directory (a one-output classifier, or a causal LM with
    ``value_head.safetensors``) or a PEFT adapter directory over either.
    """
    value_head = load_value_head(source) if has_value_head(source) else None
    if is_adapter_dir(source):
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(source)
        base_source = config.base_model_name_or_path
        task_type = getattr(config.task_type, "value", config.task_type)
        if value_head is None and task_type != "SEQ_CLS":
            raise ValueError(
                f"{source} is a {config.task_type} adapter without {VALUE_HEAD_FILE}: not a reward model"
            )
        if value_head is None:
            base = load_sequence_classifier(base_source, dtype, attn_implementation)
        else:
            base = load_causal_lm(base_source, dtype, attn_implementation)
        return PeftModel.from_pretrained(base, source, is_trainable=trainable), value_head
    if value_head is not None:
        return load_causal_lm(source, dtype, attn_implementation), value_head
    config = AutoConfig.from_pretrained(source)
    if not is_sequence_classifier(config):
        raise ValueError(
            f"{source} is neither a sequence classifier ({config.architectures or 'no architectures listed'}) nor a "
            f"causal LM with {VALUE_HEAD_FILE}; train one with `lit-pref fit --config configs/reward.yaml`"
        )
    return load_sequence_classifier(source, dtype, attn_implementation), None


# ----------------------------------------------------------------- the reward
def reward_network_parts(
    model: CausalLM, value_head: torch.nn.Module | None = None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone returning ``last_hidden_state``, head mapping a hidden state to one reward).

    ``model`` is a one-output sequence classifier (head: its ``score``/``classifier`` layer, the
    trainable copy when LoRA keeps it in ``modules_to_save``) or, with ``value_head``, a causal LM
    (backbone: its decoder). PEFT wrappers are looked through; their adapters stay active.
    """
    base = model.get_base_model() if is_peft_model(model) else model
    if value_head is not None:
        backbone = text_decoder(base) if hasattr(base, "get_decoder") else None
        if backbone is None or backbone is base:
            raise TypeError(
                f"{type(base).__name__} does not expose its decoder (get_decoder); a value head needs a causal LM"
            )
        return backbone, value_head
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = next(
        (
            getattr(base, name)
            for name in CLASSIFIER_HEADS
            if isinstance(getattr(base, name, None), torch.nn.Module)
        ),
        None,
    )
    if backbone is None or head is None or backbone is base:
        raise TypeError(
            f"{type(base).__name__} is not a decoder sequence classifier with a `score`/`classifier` layer "
            "over its base model; use head='value_head' for other architectures"
        )
    return backbone, head


def sequence_rewards(
    backbone: torch.nn.Module,
    head: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor | None = None,
) -> Tensor:
    """``[B]`` float32 rewards: ``head`` applied to the hidden state of each row's last real token.

    Rows may be padded on either side or both (real tokens contiguous); position ids default to
    counting from each row's first real token. The head runs on ``B`` vectors only.
    """
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    weight = next(head.parameters(), None)
    if (
        weight is not None
        and weight.dtype.is_floating_point
        and not torch.is_autocast_enabled(last.device.type)
    ):
        last = last.to(weight.dtype)
    return head(last).squeeze(-1).float()


# -------------------------------------------------------------------- scorer
class RewardScorer(torch.nn.Module):
    """A frozen reward model with its tokenizer: scores text or token ids, batched, without grad.

    Being a ``torch.nn.Module``, it moves with ``.to(device)`` and can sit inside a
    LightningModule (PPO / GRPO) as a frozen sub-module.

    Args:
        model: a one-output sequence classifier, or a causal LM when ``value_head`` is given.
        tokenizer: the reward model's tokenizer (what :meth:`score` encodes with).
        value_head: the scalar head of a causal-LM reward model.
        batch_size: rows per forward pass in :meth:`score`.
        max_length: longest prompt + completion scored; longer prompts keep their last tokens
            (``None``: no limit).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        value_head: torch.nn.Module | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = freeze(model)
        self.value_head = None if value_head is None else freeze(value_head)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.truncation = TruncationConfig(max_length=max_length, truncation_mode="keep_end")
        reward_network_parts(self.model, self.value_head)  # fail early on an unsupported model
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> RewardScorer:
        """Load a reward model saved by the reward stage (either head type, merged or as a LoRA adapter)."""
        directory = str(directory)
        model: CausalLM
        model, value_head = load_reward_network(directory, dtype, attn_implementation)
        if is_peft_model(model):
            model = model.merge_and_unload()
        tokenizer = load_tokenizer(directory)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        scorer = cls(model, tokenizer, value_head, batch_size=batch_size, max_length=max_length)
        if value_head is not None:
            value_head.to(next(model.parameters()).dtype)
        return scorer.to(device) if device is not None else scorer

    def train(self, mode: bool = True) -> RewardScorer:
        """Stay in eval mode (no dropout), even inside a module that switches to training."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B]`` float32 rewards of token-id rows (prompt + completion, padded on any side).

        The reward is read at each row's last token where ``attention_mask`` is 1; the rows must
        already be in the reward model's vocabulary (same tokenizer).
        """
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if not attention_mask.bool().any(-1).all():
            raise ValueError("every row needs at least one real token (attention_mask all zero)")
        backbone, head = reward_network_parts(self.model, self.value_head)
        return sequence_rewards(backbone, head, input_ids, attention_mask)

    def encode(self, prompt: Any, completion: Any, index: int = 0) -> list[int]:
        """Token ids of one pair exactly as the reward data module encodes it (EOS included)."""
        prompt_ids = encode_prompt(self.tokenizer, prompt)
        completion_ids = encode_completion(self.tokenizer, prompt, completion, prompt_ids, index)
        prompt_ids, (completion_ids,), _ = truncate(prompt_ids, [completion_ids], self.truncation)
        return prompt_ids + completion_ids

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        """Rewards of (prompt, completion) pairs, in order.

        Args:
            prompts: plain-text prompts, or conversations (lists of ``{"role", "content"}``).
            completions: one per prompt: text, or the assistant message(s) as a conversation.

        Returns:
            One float per pair.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        rewards: list[float] = []
        pad_id = self.tokenizer.pad_token_id
        for start in range(0, len(prompts), self.batch_size):
            rows = [
                self.encode(p, c, start + i)
                for i, (p, c) in enumerate(
                    zip(
                        prompts[start : start + self.batch_size],
                        completions[start : start + self.batch_size],
                        strict=True,
                    )
                )
            ]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
            rewards += self.score_ids(ids, mask).tolist()
        return rewards

    def extra_repr(self) -> str:
        kind = "value head" if self.value_head is not None else "sequence classifier"
        return f"{kind}, batch_size={self.batch_size}"


# ------------------------------------------------------------- value networks
class ValueModel(torch.nn.Module):
    """A transformer backbone with a scalar head: ``V(s_t)`` at every completion position.

    ``V(s_t)`` is read from the hidden state that predicts completion token ``t`` (the state
    before the action), through the same prompt/completion layout as the log-prob path.

    Args:
        backbone: the decoder (a ``transformers`` base model, no LM head).
        head: ``Linear(hidden, 1)``.
    """

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_pretrained(
        cls, source: str, dtype: str = "auto", attn_implementation: str | None = None
    ) -> ValueModel:
        """From a reward-model directory (its head is kept; a LoRA adapter is merged) or a causal LM
        (its decoder, with a zero head)."""
        if (
            has_value_head(source)
            or is_adapter_dir(source)
            or is_sequence_classifier(AutoConfig.from_pretrained(source))
        ):
            model: CausalLM
            model, value_head = load_reward_network(source, dtype, attn_implementation, trainable=True)
            if is_peft_model(model):
                model = model.merge_and_unload()
            return cls(*reward_network_parts(model, value_head))
        return cls.from_causal_lm(load_causal_lm(source, dtype, attn_implementation), copy_decoder=False)

    @classmethod
    def from_causal_lm(cls, model: CausalLM, copy_decoder: bool = True) -> ValueModel:
        """A causal LM's decoder (a copy unless ``copy_decoder`` is off) with a zero head."""
        decoder = copy.deepcopy(text_decoder(model)) if copy_decoder else text_decoder(model)
        return cls(decoder, zero_value_head(model))

    def forward(self, batch: CompletionBatch, share_prompt: bool = True) -> Tensor:
        """``[Bc, L]`` float32 values of the completion positions of ``batch`` (0 where masked)."""
        hidden = completion_hidden(
            self.backbone,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            batch["completion_input_ids"],
            batch["completion_attention_mask"],
            share_prompt,
        )
        return values_from_hidden(self.head, hidden, batch["completion_attention_mask"])


def zero_value_head(model: CausalLM) -> torch.nn.Linear:
    """A zero-initialised value head matching a causal LM's hidden width, dtype and device."""
    weight = model.get_output_embeddings().weight
    return new_value_head(weight.shape[1], "zeros", dtype=weight.dtype, device=weight.device)


def values_from_hidden(head: torch.nn.Module, hidden: Tensor, mask: Tensor) -> Tensor:
    """``[B, L]`` float32 values a scalar head reads from hidden states (0 where ``mask`` is unset)."""
    weight = next(head.parameters())
    values = head(hidden.to(weight.dtype)).squeeze(-1).float()
    return torch.where(mask.bool(), values, torch.zeros_like(values))
