"""Reward modelling: a scalar score of (prompt, completion) trained on preference pairs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_pref.data.packing import is_packed
from lit_pref.losses.reward import reward_loss
from lit_pref.models import (
    apply_lora,
    disable_dropout,
    enable_activation_checkpointing,
    is_adapter_dir,
    load_adapter_model,
    load_causal_lm,
)
from lit_pref.modules.base import AlignmentModule
from lit_pref.scoring import (
    has_value_head,
    load_sequence_classifier,
    load_value_head,
    new_value_head,
    reward_network_parts,
    save_value_head,
    sequence_rewards,
)
from lit_pref.types import CausalLM, PairedBatch

RewardHead = Literal["classifier", "value_head"]


class RunningStd(Metric):
    """Population standard deviation of every value seen since the last reset (all ranks)."""

    full_state_update = False
    count: Tensor
    total: Tensor
    total_sq: Tensor

    def __init__(self) -> None:
        super().__init__()
        for name in ("count", "total", "total_sq"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        values = values.detach().double().flatten()
        self.count += values.numel()
        self.total += values.sum()
        self.total_sq += values.square().sum()

    def compute(self) -> Tensor:
        count = self.count.clamp(min=1)
        mean = self.total / count
        return (self.total_sq / count - mean.square()).clamp(min=0).sqrt().float()


class RewardModel(AlignmentModule):
    """A reward model trained with the pairwise Bradley–Terry loss (Ouyang et al. 2022, Eq. 1).

    Chosen and rejected completions are scored in one batched forward pass: each row is the
    left-padded prompt followed by the right-padded completion, and the reward is read at the
    row's last real token (found from the attention mask, so pad == EOS tokenizers are safe).

    The network is either a one-output sequence classifier (``head: classifier``; loaded with
    ``AutoModelForSequenceClassification``, so a causal-LM checkpoint gets a fresh score layer)
    or a causal LM with a scalar value head (``head: value_head``; the head is saved next to the
    model as ``value_head.safetensors``). With LoRA the classifier's score layer is trained in
    full (PEFT ``SEQ_CLS`` task, ``modules_to_save``); the value head always is.

    Logged for train and val: ``loss``, ``rewards/accuracies`` (share of pairs with r_c > r_r),
    ``rewards/margins`` (mean r_c − r_r), ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/mean`` and ``rewards/std`` (over chosen and rejected rewards together). Load the
    saved model for scoring with :class:`lit_pref.scoring.RewardScorer`.

    Args:
        head: ``classifier`` or ``value_head`` (see above).
        center_rewards_coefficient: weight c of the centring term c·(r_c + r_r)² (Eisenstein et
            al. 2023) that keeps rewards near zero mean; ``None`` disables it (0.01 is typical).
        **kwargs: :class:`~lit_pref.modules.base.AlignmentModule` arguments (model, LoRA,
            optimizer, export…). A per-pair ``margin`` column in the data is used automatically
            (Llama 2's margin loss).
    """

    data_target = "paired"
    default_lr = 1e-5
    exported_name = "reward model"
    stuck_loss = math.log(2)

    def __init__(
        self,
        head: RewardHead = "classifier",
        center_rewards_coefficient: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if head not in ("classifier", "value_head"):
            raise ValueError(f"head must be 'classifier' or 'value_head', got {head!r}")
        if center_rewards_coefficient is not None and not (
            math.isfinite(center_rewards_coefficient) and center_rewards_coefficient >= 0
        ):
            raise ValueError(
                f"center_rewards_coefficient must be a finite number >= 0 or null, got {center_rewards_coefficient!r}"
            )
        if self.peft_config is not None and head == "classifier":
            task_type = self.peft_config.get("task_type", "SEQ_CLS")
            if task_type != "SEQ_CLS":
                raise ValueError(
                    f"a classifier reward model trains a SEQ_CLS LoRA adapter, got task_type={task_type!r}"
                )
            self.peft_config = {**self.peft_config, "task_type": "SEQ_CLS"}
        if self.quantization is not None:
            raise ValueError("quantization (QLoRA) is supported for the policy of the generative modules, not for reward models yet")
        self.head_type = head
        self.center_rewards_coefficient = center_rewards_coefficient
        self.value_head: torch.nn.Linear | None = None
        for group in (self.train_metrics, self.val_metrics):
            # MetricGroup keys its metrics by name with "/" spelled "__"; a standard deviation is
            # not a mean, so it gets its own metric under the name it is updated with.
            group.means["rewards__std"] = RunningStd()

    # ----------------------------------------------------------------- networks
    def load_policy(self) -> CausalLM:
        """Load the reward network (the base class calls it ``policy``: the trained network)."""
        source, dtype, attn = self.model_source, self.dtype_name, self.attn_implementation
        model: CausalLM
        if isinstance(source, str) and is_adapter_dir(source):
            if self.peft_config is not None:
                raise ValueError("model_name_or_path is already a PEFT adapter; drop the peft settings")
            model = self._load_adapter(source)
        elif self.head_type == "classifier":
            model = load_sequence_classifier(source, dtype, attn)
        else:
            model = load_causal_lm(source, dtype, attn)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.gradient_checkpointing:
            enable_activation_checkpointing(model)
            model.config.use_cache = False
        if self.peft_config is not None:
            model = apply_lora(model, self.peft_config)
        if self.zero_dropout:
            # After LoRA wrapping, so the adapters' own dropout is zeroed too.
            disable_dropout(model)
        return model.train()

    def _load_adapter(self, source: str) -> torch.nn.Module:
        from peft import PeftConfig, PeftModel

        task_type = PeftConfig.from_pretrained(source).task_type
        task_type = getattr(task_type, "value", task_type)
        if self.head_type == "value_head":
            return load_adapter_model(source, self.dtype_name, self.attn_implementation)
        if task_type != "SEQ_CLS":
            raise ValueError(
                f"{source} holds a {task_type} adapter, which a classifier reward model cannot continue; "
                "save the SFT model merged (merge_lora: true) and start the reward model from it"
            )
        base = load_sequence_classifier(
            PeftConfig.from_pretrained(source).base_model_name_or_path,
            self.dtype_name,
            self.attn_implementation,
        )
        return PeftModel.from_pretrained(base, source, is_trainable=True)

    def build_networks(self) -> None:
        super().build_networks()
        if self.head_type == "value_head":
            source = self.model_source
            if isinstance(source, str) and has_value_head(source):
                self.value_head = load_value_head(source)
            else:
                self.value_head = new_value_head(self.policy.config.get_text_config().hidden_size)
            self.value_head.to(self.device)

    # ------------------------------------------------------------------ rewards
    def rewards(self, batch: PairedBatch) -> Tensor:
        """``[Bc]`` rewards of every completion row (prompt + completion), in one forward pass."""
        prompts, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        completions, completion_mask = batch["completion_input_ids"], batch["completion_attention_mask"]
        k = completions.shape[0] // prompts.shape[0]
        input_ids = torch.cat([prompts.repeat_interleave(k, 0), completions], 1)
        attention_mask = torch.cat([prompt_mask.repeat_interleave(k, 0), completion_mask], 1)
        backbone, head = reward_network_parts(self.policy, self.value_head)
        return sequence_rewards(backbone, head, input_ids, attention_mask)

    def pair_rewards(self, batch: PairedBatch) -> tuple[Tensor, Tensor]:
        """``[B]`` chosen and ``[B]`` rejected rewards of a paired batch."""
        if batch["completion_input_ids"].shape[0] != 2 * batch["prompt_input_ids"].shape[0]:
            raise ValueError(
                "RewardModel trains on paired data: one chosen and one rejected completion per prompt"
            )
        rewards = self.rewards(batch)
        return rewards[0::2], rewards[1::2]

    # ------------------------------------------------------------------- steps
    def shared_step(self, batch: PairedBatch, split: str = "train") -> tuple[Tensor, dict[str, Tensor]]:
        if is_packed(batch):
            raise ValueError("a reward model scores the padded layout: set packing: false in the data module")
        chosen, rejected = self.pair_rewards(batch)
        out = reward_loss(chosen, rejected, batch.get("margin"), self.center_rewards_coefficient)
        both = torch.cat([chosen, rejected]).detach()
        metrics = {
            "loss": out.losses,
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": out.accuracies,
            "rewards/margins": out.margins,
            "rewards/mean": both,
            "rewards/std": both,
        }
        return out.losses.mean(), metrics

    def validation_step(self, batch: PairedBatch, batch_idx: int) -> dict[str, Tensor]:
        loss, metrics = self.shared_step(batch)
        self.val_metrics.update(metrics)
        # The per-pair rewards go to callbacks (RewardPredictionTable) with no second forward.
        return {
            "loss": loss,
            "chosen_rewards": metrics["rewards/chosen"],
            "rejected_rewards": metrics["rewards/rejected"],
        }

    # ------------------------------------------------------------------- export
    def write_export(self, model: CausalLM, directory: Path) -> None:
        """The network and tokenizer (Hugging Face format) and the value head, if any."""
        super().write_export(model, directory)
        if self.value_head is not None:
            save_value_head(self.value_head, directory)
