"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022) as one LightningModule."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import AutoConfig

from lit_pref.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_penalty,
    token_rewards,
)
from lit_pref.models import disable_dropout, is_adapter_dir, is_peft_model, load_causal_lm
from lit_pref.modules.reference import ReferenceModule
from lit_pref.ops import _completion_hidden, _decoder_and_head, hidden_logps, masked_mean, masked_whiten
from lit_pref.rewards import RewardSet
from lit_pref.rollout import (
    GenerationSettings,
    Rollout,
    completion_stats,
    generate_rollout,
    map_chunks,
    minibatch_indices,
    optimizer_step,
    reward_metrics,
    sample_rows,
    score_rollout,
)
from lit_pref.scoring import has_value_head, is_sequence_classifier, load_reward_network, reward_network_parts
from lit_pref.types import CompletionLogps


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
            model, value_head = load_reward_network(source, dtype, attn_implementation, trainable=True)
            if is_peft_model(model):
                model = model.merge_and_unload()
            return cls(*reward_network_parts(model, value_head))
        return cls.from_causal_lm(load_causal_lm(source, dtype, attn_implementation), copy_decoder=False)

    @classmethod
    def from_causal_lm(cls, model: torch.nn.Module, copy_decoder: bool = True) -> ValueModel:
        """A causal LM's decoder (a copy unless ``copy_decoder`` is off) with a zero head."""
        decoder = copy.deepcopy(model.get_decoder()) if copy_decoder else model.get_decoder()
        weight = model.get_output_embeddings().weight
        head = torch.nn.Linear(weight.shape[1], 1, bias=False, dtype=weight.dtype, device=weight.device)
        torch.nn.init.zeros_(head.weight)
        return cls(decoder, head)

    def forward(self, batch: dict[str, Tensor], share_prompt: bool = True) -> Tensor:
        """``[Bc, L]`` float32 values of the completion positions of ``batch`` (0 where masked)."""
        share = share_prompt and not getattr(self.backbone, "is_activation_checkpointing", False)
        hidden = _completion_hidden(
            self.backbone,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            batch["completion_input_ids"],
            batch["completion_attention_mask"],
            share,
        )
        return _value_from_hidden(self.head, hidden, batch["completion_attention_mask"])


def _value_from_hidden(head: torch.nn.Module, hidden: Tensor, mask: Tensor) -> Tensor:
    weight = next(head.parameters())
    values = head(hidden.to(weight.dtype)).squeeze(-1).float()
    return torch.where(mask.bool(), values, torch.zeros_like(values))


class PPO(ReferenceModule):
    """Proximal Policy Optimization from a reward signal (Ziegler et al. 2019; Ouyang et al. 2022).

    Each training step takes a batch of prompts and runs one PPO iteration:

    1. **Rollout** — sample one completion per prompt (policy in eval mode, no grad), and score
       the policy's (old), the reference's and the value network's per-token log-probs / values
       through the shared log-prob path, at the sampling temperature.
    2. **Rewards** — the reward sources score each completion; the per-token reward is
       ``−β·KL_t`` on every token plus the score on the last (Ouyang et al. 2022, eq. 2).
    3. **Advantages** — GAE (γ, λ) over completion tokens, then whitened.
    4. **Optimisation** — ``num_ppo_epochs`` passes over ``num_mini_batches`` shuffled
       mini-batches, each one optimizer step (clipped surrogate + ``vf_coef`` × clipped value
       loss) accumulated over ``gradient_accumulation_steps`` micro-batches and clipped to
       ``max_grad_norm``.

    Optimisation is manual, so ``trainer.global_step`` counts optimizer steps:
    ``num_ppo_epochs × num_mini_batches`` per batch of prompts (set ``max_steps`` accordingly).
    Trainer-level ``gradient_clip_val`` and ``accumulate_grad_batches`` are not available under
    manual optimisation; use ``max_grad_norm`` and ``gradient_accumulation_steps``.

    Value network: a separate backbone with a scalar head, initialised from
    ``value_model_name_or_path``, else from the first reward-model directory in ``rewards``,
    else from the policy's weights (with a zero head); or, with ``value_head_on_policy``, a
    scalar head on the policy's own hidden states (one forward pass for both, and with LoRA
    the value shares the adapter). The reference is chosen as in every lit_pref module
    (``reference``: a frozen copy, another model, or — with ``peft`` — the policy with its
    adapter disabled).

    Logged per batch of prompts: ``score`` (mean total reward), ``rewards/<source>`` (with
    several sources), ``rlhf_reward`` (score − β·KL), ``non_score_reward`` (−β·KL), ``kl``
    (per-sequence KL estimate to the reference), ``kl_coef``, ``entropy`` (per-token, under
    the rollout policy), ``completions/{mean,min,max}_length``, ``completions/eos_fraction``,
    ``value/explained_variance``; averaged over the optimizer steps: ``loss``,
    ``policy/loss``, ``policy/approx_kl``, ``policy/clip_frac{,_low,_high}``,
    ``policy/ratio``, ``value/loss``, ``value/clip_frac``.

    Args:
        rewards: reward sources: reward-model directories and/or reward functions
            ``"pkg.module:fn"`` (see :mod:`lit_pref.rewards`).
        reward_weights: one weight per reward source (default all 1).
        missing_eos_penalty: subtracted from the score of completions cut at
            ``max_new_tokens`` without an EOS token.
        max_new_tokens: completion length limit.
        temperature: sampling temperature (also divides the logits when scoring).
        top_p: nucleus sampling (1 disables it).
        top_k: top-k sampling (``None`` or 0 disables it).
        rollout_batch_size: completions per ``generate`` call and per no-grad scoring pass.
        num_ppo_epochs: passes over each rollout.
        num_mini_batches: optimizer steps per pass.
        gradient_accumulation_steps: micro-batches per mini-batch.
        max_grad_norm: gradient-norm clipping per optimizer step (``None``: off).
        kl_coef: β, the per-token KL penalty coefficient (initial value when adaptive).
        kl_estimator: ``k1`` (log-ratio, Ziegler et al.) or ``k3`` (non-negative, unbiased).
        kl_target: enables the adaptive KL controller of Ziegler et al. 2019 (§2.2) steering
            the per-sequence KL towards this target.
        kl_horizon: the adaptive controller's horizon, in samples.
        whiten_rewards: scale the per-token rewards to unit variance before GAE.
        gamma: discount γ.
        lam: GAE λ.
        cliprange: ε of the clipped surrogate.
        cliprange_value: ε of the clipped value loss.
        vf_coef: weight of the value loss.
        value_model_name_or_path: directory to initialise the value network from.
        value_head_on_policy: put the value head on the policy instead of a separate network.
        **kwargs: :class:`~lit_pref.modules.reference.ReferenceModule` arguments (the reference
            choice) and :class:`~lit_pref.modules.base.AlignmentModule` ones (model, LoRA,
            optimizer, export…).
    """

    data_target = "prompt_only"
    default_lr = 3e-6

    def __init__(
        self,
        rewards: str | list[str] | None = None,
        reward_weights: list[float] | None = None,
        missing_eos_penalty: float | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        rollout_batch_size: int = 64,
        num_ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k3"] = "k1",
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        whiten_rewards: bool = False,
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        value_model_name_or_path: str | None = None,
        value_head_on_policy: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("precompute_ref_logps"):
            raise ValueError("precompute_ref_logps does not apply to PPO: completions are sampled online")
        if rewards is None:
            raise ValueError("PPO needs rewards: a reward-model directory and/or a function 'pkg.module:fn'")
        for name, value in (("num_ppo_epochs", num_ppo_epochs), ("num_mini_batches", num_mini_batches),
                            ("gradient_accumulation_steps", gradient_accumulation_steps),
                            ("rollout_batch_size", rollout_batch_size)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {kl_estimator!r}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {max_grad_norm}")
        if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
            raise ValueError(f"gamma and lam must be in [0, 1], got {gamma} and {lam}")
        if cliprange < 0 or cliprange_value < 0 or vf_coef < 0:
            raise ValueError("cliprange, cliprange_value and vf_coef must be >= 0")
        if value_head_on_policy and value_model_name_or_path is not None:
            raise ValueError(
                "value_head_on_policy puts the value head on the policy; drop value_model_name_or_path"
            )
        super().__init__(reference_free=False, **kwargs)
        if self.reference_kind == "none":
            raise ValueError("PPO penalises the KL to a reference; choose a reference other than 'none'")
        self.automatic_optimization = False
        self.reward_set = RewardSet(
            rewards, reward_weights, missing_eos_penalty, batch_size=rollout_batch_size
        )
        self.generation = GenerationSettings(max_new_tokens, temperature, top_p, top_k)
        self.rollout_batch_size = rollout_batch_size
        self.num_ppo_epochs = num_ppo_epochs
        self.num_mini_batches = num_mini_batches
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.kl_estimator = kl_estimator
        self.kl_controller: KLController = (
            FixedKLController(kl_coef)
            if kl_target is None
            else AdaptiveKLController(kl_coef, kl_target, kl_horizon)
        )
        self.whiten_rewards = whiten_rewards
        self.gamma, self.lam = gamma, lam
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.value_source = value_model_name_or_path
        self.value_head_on_policy = value_head_on_policy
        self.value_model: ValueModel | None = None
        self.value_head: torch.nn.Linear | None = None
        self.latest_samples: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- networks
    def configure_model(self) -> None:
        first = self.policy is None
        super().configure_model()
        if not first:
            return
        self.reward_set.load_models(self.tokenizer)
        if self.value_head_on_policy:
            weight = self.policy.get_output_embeddings().weight
            self.value_head = torch.nn.Linear(
                weight.shape[1], 1, bias=False, dtype=weight.dtype, device=weight.device
            )
            torch.nn.init.zeros_(self.value_head.weight)
            rank_zero_info("PPO value: a scalar head on the policy")
            return
        self.value_model = self.load_value_model()
        if self.zero_dropout:
            disable_dropout(self.value_model)
        if self.gradient_checkpointing:
            self.value_model.backbone.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.value_model.train()

    def load_value_model(self) -> ValueModel:
        """The separate value network, from the first source available (see the class docstring)."""
        models = self.reward_set.model_directories
        source = self.value_source or (models[0] if models else None)
        if source is None and isinstance(self.model_source, str):
            if is_adapter_dir(self.model_source):
                raise ValueError(
                    "the policy starts from an adapter directory: set value_model_name_or_path (e.g. the base or "
                    "reward model) or value_head_on_policy: true"
                )
            source = self.model_source
        if source is None:
            rank_zero_info("PPO value: a copy of the policy's decoder with a zero head")
            return ValueModel.from_causal_lm(self.policy)
        rank_zero_info(f"PPO value: a separate network initialised from {source}")
        return ValueModel.from_pretrained(source, self.dtype_name, self.attn_implementation)

    # -------------------------------------------------------------- forward
    def policy_forward(
        self, batch: dict[str, Tensor], with_entropy: bool = False
    ) -> tuple[CompletionLogps, Tensor]:
        """Per-token log-probs (at the sampling temperature) and values of ``batch``."""
        temperature = self.generation.temperature
        if not self.value_head_on_policy:
            logps = self.logps(self.policy, batch, temperature=temperature, with_entropy=with_entropy)
            return logps, self.value_model(batch)
        # One forward through the policy's decoder feeds both the LM head and the value head.
        decoder, head = _decoder_and_head(self.policy)
        share = not getattr(self.policy, "is_activation_checkpointing", False)
        mask = batch["completion_attention_mask"]
        hidden = _completion_hidden(
            decoder,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            batch["completion_input_ids"],
            mask,
            share,
        )
        logps = hidden_logps(
            head, hidden, batch["completion_input_ids"], mask,
            chunk_size=self.chunk_size, temperature=temperature, with_entropy=with_entropy,
        )  # fmt: skip
        return logps, _value_from_hidden(self.value_head, hidden, mask)

    # -------------------------------------------------------------- rollout
    @torch.no_grad()
    def _score_chunk(self, chunk: Rollout) -> dict[str, Tensor]:
        batch = chunk.batch()
        logps, values = self.policy_forward(batch, with_entropy=True)
        ref = self.reference_logps(batch, temperature=self.generation.temperature)
        return {
            "old_logps": logps.token_logps,
            "entropy": logps.entropy,
            "values": values,
            "ref_logps": ref.token_logps,
        }

    def collect_rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample, score under policy / reference / value, and reward one batch of prompts (no grad)."""
        rollout = generate_rollout(
            self.policy, batch, self.generation, self.tokenizer, 1, self.rollout_batch_size
        )
        rollout.data.update(map_chunks(rollout, self.rollout_batch_size, self._score_chunk))
        scores, per_source = score_rollout(
            self.reward_set.to(self.device), rollout, self.tokenizer.pad_token_id
        )
        rollout.data["scores"] = scores
        self.train_metrics.update(reward_metrics(scores, per_source) | completion_stats(rollout))
        self.latest_samples = sample_rows(rollout, scores, per_source, self.tokenizer)
        return rollout

    @torch.no_grad()
    def compute_advantages(self, rollout: Rollout) -> None:
        """KL-shaped per-token rewards, GAE advantages (whitened) and value targets, into ``rollout.data``."""
        data, mask = rollout.data, rollout.mask
        beta = self.kl_controller.value
        kl = torch.where(mask, kl_penalty(data["old_logps"], data["ref_logps"], self.kl_estimator), 0.0)
        rewards = token_rewards(data["scores"], kl, mask, beta)
        if self.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, data["values"], mask, self.gamma, self.lam)
        data["advantages"] = masked_whiten(advantages, mask)
        data["returns"] = returns
        sequence_kl = kl.sum(-1)
        self.train_metrics.update({
            "kl": sequence_kl,
            "kl_coef": torch.tensor(beta, device=kl.device),
            "non_score_reward": -beta * sequence_kl,
            "rlhf_reward": data["scores"] - beta * sequence_kl,
            "entropy": masked_mean(data["entropy"], mask, dim=-1),
            "value/explained_variance": explained_variance(data["values"], returns, mask),
        })  # fmt: skip
        self._rollout_kl = sequence_kl.mean()

    # ----------------------------------------------------------------- losses
    def ppo_loss(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate + ``vf_coef`` × clipped value loss of a (micro-)batch of the rollout."""
        data, mask = rollout.data, rollout.mask
        logps, values = self.policy_forward(rollout.batch())
        policy = clipped_policy_loss(
            logps.token_logps, data["old_logps"], data["advantages"], mask, self.cliprange, self.cliprange
        )
        value = clipped_value_loss(values, data["values"], data["returns"], mask, self.cliprange_value)
        policy_loss = masked_mean(policy.per_token_loss, mask)
        value_loss = masked_mean(value.per_token_loss, mask)
        loss = policy_loss + self.vf_coef * value_loss
        with torch.no_grad():
            ratio = masked_mean(
                torch.exp(torch.where(mask, logps.token_logps - data["old_logps"], 0.0)), mask
            )
        metrics = {
            "loss": loss,
            "policy/loss": policy_loss,
            "policy/approx_kl": policy.approx_kl,
            "policy/clip_frac_low": policy.clip_frac_low,
            "policy/clip_frac_high": policy.clip_frac_high,
            "policy/clip_frac": policy.clip_frac_low + policy.clip_frac_high,
            "policy/ratio": ratio,
            "value/loss": value_loss,
            "value/clip_frac": value.clip_frac,
        }
        return loss, metrics

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.collect_rollout(batch)
        self.compute_advantages(rollout)
        for _ in range(self.num_ppo_epochs):
            for micro_batches in minibatch_indices(
                rollout.num_prompts, self.num_mini_batches, self.gradient_accumulation_steps
            ):
                size = sum(m.numel() for m in micro_batches)
                for rows in micro_batches:
                    loss, metrics = self.ppo_loss(rollout.select(rows))
                    # Each micro-batch weighs by its share of the mini-batch's completions.
                    self.manual_backward(loss * (rows.numel() / size))
                    self.train_metrics.update(metrics)
                optimizer_step(self, self.max_grad_norm)
        n = rollout.num_prompts * self.trainer.world_size
        self.kl_controller.update(float(self.trainer.strategy.reduce(self._rollout_kl, reduce_op="mean")), n)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Score one completion per held-out prompt: ``val/score`` and completion statistics."""
        rollout = generate_rollout(
            self.policy, batch, self.generation, self.tokenizer, 1, self.rollout_batch_size
        )
        scores, per_source = score_rollout(
            self.reward_set.to(self.device), rollout, self.tokenizer.pad_token_id
        )
        self.val_metrics.update(reward_metrics(scores, per_source) | completion_stats(rollout))

    # ------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])
