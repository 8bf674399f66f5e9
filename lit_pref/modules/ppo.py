"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022) as one LightningModule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

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
from lit_pref.models import disable_dropout, enable_activation_checkpointing, is_adapter_dir
from lit_pref.modules.online import OnlineRLModule
from lit_pref.ops import completion_hidden, decoder_and_head, hidden_logps, masked_mean, masked_whiten
from lit_pref.rollout import CompletionTensors, Rollout, score_in_chunks
from lit_pref.scoring import ValueModel, values_from_hidden, zero_value_head
from lit_pref.types import CompletionBatch, CompletionLogps


@dataclass
class RolloutScores(CompletionTensors):
    """What the no-grad scoring pass of a PPO rollout computes, ``[N, L]`` per token.

    Attributes:
        old_logps: log-probs under the rollout policy, at the sampling temperature.
        ref_logps: log-probs under the reference.
        values: value estimates V(s_t) of the rollout's value network.
        entropy: per-token entropy of the rollout policy (a diagnostic).
    """

    old_logps: Tensor
    ref_logps: Tensor
    values: Tensor
    entropy: Tensor


@dataclass
class PPOTensors(RolloutScores):
    """Per-completion tensors of a PPO rollout: its scores, then what PPO derives from them.

    Attributes:
        scores: ``[N]`` total reward of each completion.
        advantages: ``[N, L]`` whitened GAE advantages.
        returns: ``[N, L]`` value targets.
        sequence_kl: ``[N]`` per-sequence KL estimate to the reference.
        sampler_weights: ``[N, L]`` truncated importance weights π_old / π_engine of the
            rollout engine's samples (``rollout_is_cap``; ``None``: not weighted).
    """

    scores: Tensor
    advantages: Tensor
    returns: Tensor
    sequence_kl: Tensor
    sampler_weights: Tensor | None = None


class PPO(OnlineRLModule["PPOTensors"]):
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

    ``trainer.global_step`` counts optimizer steps: ``num_ppo_epochs × num_mini_batches`` per
    batch of prompts (set ``max_steps`` accordingly); see
    :class:`~lit_pref.modules.online.OnlineRLModule`.

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
        num_ppo_epochs: passes over each rollout.
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
        **kwargs: :class:`~lit_pref.modules.online.OnlineRLModule` arguments (rewards, sampling,
            mini-batches, the rollout engine), the reference choice and the model, LoRA,
            optimizer and export arguments every module takes.
    """

    default_lr = 3e-6
    corrects_sampler = True

    def __init__(
        self,
        num_ppo_epochs: int = 4,
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
        if num_ppo_epochs < 1:
            raise ValueError(f"num_ppo_epochs must be >= 1, got {num_ppo_epochs}")
        if kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {kl_estimator!r}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
            raise ValueError(f"gamma and lam must be in [0, 1], got {gamma} and {lam}")
        if cliprange < 0 or cliprange_value < 0 or vf_coef < 0:
            raise ValueError("cliprange, cliprange_value and vf_coef must be >= 0")
        if value_head_on_policy and value_model_name_or_path is not None:
            raise ValueError(
                "value_head_on_policy puts the value head on the policy; drop value_model_name_or_path"
            )
        super().__init__(**kwargs)
        if self.reference.kind == "none":
            raise ValueError("PPO penalises the KL to a reference; choose a reference other than 'none'")
        self.num_epochs = num_ppo_epochs
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
        # The last rollout's mean per-sequence KL over every rank (what the KL controller saw).
        self.rollout_kl = 0.0

    # ----------------------------------------------------------------- networks
    def build_networks(self) -> None:
        super().build_networks()
        if self.value_head_on_policy:
            self.value_head = zero_value_head(self.policy)
            rank_zero_info("PPO value: a scalar head on the policy")
            return
        self.value_model = self.load_value_model()
        if self.zero_dropout:
            disable_dropout(self.value_model)
        if self.gradient_checkpointing:
            enable_activation_checkpointing(self.value_model.backbone)
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
    def policy_forward(self, batch: CompletionBatch, with_entropy: bool = False) -> tuple[CompletionLogps, Tensor]:
        """Per-token log-probs (at the sampling temperature) and values of ``batch``."""
        temperature = self.generation.temperature
        if self.value_model is not None:
            logps = self.logps(self.policy, batch, temperature=temperature, with_entropy=with_entropy)
            return logps, self.value_model(batch)
        assert self.value_head is not None
        # One forward through the policy's decoder feeds both the LM head and the value head.
        decoder, head = decoder_and_head(self.policy)
        mask = batch["completion_attention_mask"]
        hidden = completion_hidden(
            decoder, batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["completion_input_ids"], mask
        )
        logps = hidden_logps(
            head, hidden, batch["completion_input_ids"], mask,
            chunk_size=self.chunk_size, temperature=temperature, with_entropy=with_entropy,
        )  # fmt: skip
        return logps, values_from_hidden(self.value_head, hidden, mask)

    # -------------------------------------------------------------- rollout
    @torch.no_grad()
    def _score_chunk(self, chunk: Rollout) -> RolloutScores:
        batch = chunk.batch()
        logps, values = self.policy_forward(batch, with_entropy=True)
        ref = self.reference_logps(batch, temperature=self.generation.temperature)
        assert logps.entropy is not None
        return RolloutScores(logps.token_logps, ref.token_logps, values, logps.entropy)

    @torch.no_grad()
    def prepare(self, rollout: Rollout) -> PPOTensors:
        """Score under policy / reference / value, reward, then KL-shaped per-token rewards, GAE
        advantages (whitened) and value targets."""
        scored = score_in_chunks(rollout, self.rollout_batch_size, self._score_chunk)
        scores, _ = self.score(rollout)
        mask = rollout.mask
        beta = self.kl_controller.value
        kl = torch.where(mask, kl_penalty(scored.old_logps, scored.ref_logps, self.kl_estimator), 0.0)
        rewards = token_rewards(scores, kl, mask, beta)
        if self.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, scored.values, mask, self.gamma, self.lam)
        sequence_kl = kl.sum(-1)
        self.train_metrics.update({
            "kl": sequence_kl,
            "kl_coef": torch.tensor(beta, device=kl.device),
            "non_score_reward": -beta * sequence_kl,
            "rlhf_reward": scores - beta * sequence_kl,
            "entropy": masked_mean(scored.entropy, mask, dim=-1),
            "value/explained_variance": explained_variance(scored.values, returns, mask),
        })  # fmt: skip
        return PPOTensors(
            scored.old_logps, scored.ref_logps, scored.values, scored.entropy,
            scores, masked_whiten(advantages, mask), returns, sequence_kl,
            self.sampler_correction(rollout, scored.old_logps),
        )  # fmt: skip

    # ----------------------------------------------------------------- losses
    def rollout_loss(
        self, rollout: Rollout, tensors: PPOTensors, num_items: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate + ``vf_coef`` × clipped value loss of a micro-batch of the rollout."""
        mask = rollout.mask
        logps, values = self.policy_forward(rollout.batch())
        policy = clipped_policy_loss(
            logps.token_logps, tensors.old_logps, tensors.advantages, mask, self.cliprange, self.cliprange
        )
        value = clipped_value_loss(values, tensors.values, tensors.returns, mask, self.cliprange_value)
        per_token = policy.per_token_loss
        if tensors.sampler_weights is not None:
            per_token = per_token * tensors.sampler_weights
        policy_loss = masked_mean(per_token, mask)
        value_loss = masked_mean(value.per_token_loss, mask)
        loss = policy_loss + self.vf_coef * value_loss
        with torch.no_grad():
            ratio = masked_mean(torch.exp(torch.where(mask, logps.token_logps - tensors.old_logps, 0.0)), mask)
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

    def after_rollout(self, rollout: Rollout, tensors: PPOTensors) -> None:
        """Adaptive KL: steer β by the rollout's mean per-sequence KL over every rank."""
        n = rollout.num_prompts * self.trainer.world_size
        self.rollout_kl = float(self.trainer.strategy.reduce(tensors.sequence_kl.mean(), reduce_op="mean"))
        self.kl_controller.update(self.rollout_kl, n)

    # ------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])
