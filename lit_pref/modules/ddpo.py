"""DDPO (Black et al. 2023): reinforcement learning of a text-to-image diffusion model against an
image reward, with the DDIM sampler's per-step log-probabilities and PPO's clipping."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_pref.diffusion.module import DiffusionModule
from lit_pref.diffusion.rewards import ImageReward, load_reward, score_images, to_pil
from lit_pref.diffusion.sampling import DiffusionRollout, ddim_step, guided_noise, sample_trajectories
from lit_pref.diffusion.stats import PerPromptStatTracker
from lit_pref.losses.diffusion import ddpo_loss, normalized_advantages
from lit_pref.modules.base import manual_optimizer_step
from lit_pref.modules.online import minibatch_indices
from lit_pref.resume import CHECKPOINT_KEY
from lit_pref.rewards import import_object


class DDPO(DiffusionModule):
    """Denoising Diffusion Policy Optimization (Black et al. 2023), DDPO-IS with clipping.

    One training step takes a batch of prompts and, top to bottom (:meth:`training_step`):

    1. **samples** ``num_images_per_prompt`` images per prompt with DDIM (``num_inference_steps``,
       η = ``eta``, classifier-free guidance ``guidance_scale`` against ``negative_prompt``), in
       chunks of ``sample_batch_size``, recording every step's latents and log-probability;
    2. **rewards** the decoded images (``reward``) and turns rewards into advantages: normalised
       by the prompt's recent mean and std (``per_prompt_stat_tracking``, once a prompt has
       ``stat_min_count`` rewards; the batch's before), or by the batch's;
    3. **optimises** for ``num_inner_epochs`` passes: shuffled mini-batches of
       ``train_batch_size`` images, ``gradient_accumulation_steps`` of them per optimizer step;
       each image trains on a random ``timestep_fraction`` of its denoising steps, each step's
       clipped importance-ratio loss (``clip_range``, advantages clipped to ``adv_clip_max``)
       backpropagated on its own, so memory holds one UNet pass at a time.

    ``trainer.global_step`` counts optimizer steps. The noise of every sample comes from the
    global random stream, which a checkpoint saves and a resume restores, together with the
    stat tracker's buffers. A grid of images sampled from fixed noise for the first
    ``grid_size`` prompts is saved as ``samples_before.png`` (before the first step) and
    ``samples_after.png`` (end of fit) in the trainer's log directory.

    Logged: ``reward`` (mean, ``reward_std``), ``loss``, ``approx_kl``, ``clip_frac``; at
    validation ``val/reward`` of one image per held-out prompt (seeded noise).

    Args:
        reward: ``"pkg.module:fn"`` called as ``fn(images, prompts, metadata)`` (see
            :mod:`lit_pref.diffusion.rewards`), or a callable.
        num_inference_steps: DDIM steps per image.
        eta: DDIM η (> 0: the steps need a likelihood).
        guidance_scale: classifier-free guidance weight (1: none).
        negative_prompt: the unconditional prompt of guidance.
        num_images_per_prompt: images sampled per prompt of a batch.
        sample_batch_size: images per sampling pass (memory, not the algorithm).
        train_batch_size: images per training micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        num_inner_epochs: passes over each batch of samples.
        timestep_fraction: fraction of each image's denoising steps trained on.
        clip_range: ε of the clipped ratio.
        adv_clip_max: advantages are clipped to ``[−adv_clip_max, adv_clip_max]``.
        train_cfg: use guidance in the training passes too (as sampled); off trains the
            conditional prediction alone.
        max_grad_norm: gradient-norm clipping per optimizer step (``None``: off).
        per_prompt_stat_tracking: normalise rewards per prompt (else over the batch).
        stat_buffer_size: rewards remembered per prompt.
        stat_min_count: rewards a prompt needs before its own statistics replace the batch's.
        grid_size: prompts in the before / after grids (0: no grids).
        grid_seed: seed of the grids' noise.
        prompt_fn: ``"pkg.module:fn"`` returning ``(prompt, metadata)`` (TRL's prompt function):
            each step then draws as many prompts from it as the data batch holds, instead of
            the batch's own (draw with python's ``random``: a resume restores its state).
        **kwargs: :class:`~lit_pref.diffusion.module.DiffusionModule` arguments (pipeline,
            resolution, LoRA, optimizer, export).
    """

    data_target = "prompt_only"
    default_lr = 3e-4

    def __init__(
        self,
        reward: str | ImageReward = "lit_pref.diffusion.rewards:jpeg_compressibility",
        num_inference_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        num_images_per_prompt: int = 1,
        sample_batch_size: int = 8,
        train_batch_size: int = 4,
        gradient_accumulation_steps: int = 1,
        num_inner_epochs: int = 1,
        timestep_fraction: float = 1.0,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        train_cfg: bool = True,
        max_grad_norm: float | None = 1.0,
        per_prompt_stat_tracking: bool = True,
        stat_buffer_size: int = 16,
        stat_min_count: int = 16,
        grid_size: int = 8,
        grid_seed: int = 0,
        prompt_fn: str | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (("num_inference_steps", num_inference_steps), ("num_images_per_prompt", num_images_per_prompt),
                            ("sample_batch_size", sample_batch_size), ("train_batch_size", train_batch_size),
                            ("gradient_accumulation_steps", gradient_accumulation_steps),
                            ("num_inner_epochs", num_inner_epochs)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0 (DDPO needs each step's likelihood), got {eta}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {max_grad_norm}")
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.reward_name = reward if isinstance(reward, str) else getattr(reward, "__name__", repr(reward))
        self.reward_fn = load_reward(reward)
        self.num_inference_steps, self.eta, self.guidance_scale = num_inference_steps, eta, guidance_scale
        self.negative_prompt = negative_prompt
        self.num_images_per_prompt, self.sample_batch_size = num_images_per_prompt, sample_batch_size
        self.train_batch_size, self.gradient_accumulation_steps = train_batch_size, gradient_accumulation_steps
        self.num_inner_epochs, self.timestep_fraction = num_inner_epochs, timestep_fraction
        self.clip_range, self.adv_clip_max, self.train_cfg = clip_range, adv_clip_max, train_cfg
        self.max_grad_norm = max_grad_norm
        self.stat_tracker = PerPromptStatTracker(stat_buffer_size, stat_min_count) if per_prompt_stat_tracking else None
        self.grid_size, self.grid_seed = grid_size, grid_seed
        self.grid_prompts: list[str] = []
        self.prompt_fn = None if prompt_fn is None else import_object(prompt_fn)

    # ------------------------------------------------------------------ sampling
    def sample(
        self, prompts: list[str], metadata: list[dict[str, Any]], generator: torch.Generator | None = None
    ) -> DiffusionRollout:
        """One image per prompt (in chunks of ``sample_batch_size``) with its trajectory."""
        chunks = []
        negative = self.encode_prompts([self.negative_prompt])
        for start in range(0, len(prompts), self.sample_batch_size):
            embeds = self.encode_prompts(prompts[start : start + self.sample_batch_size])
            chunks.append((embeds, *sample_trajectories(
                self.policy, self.vae, self.scheduler, embeds, negative.expand_as(embeds),
                num_steps=self.num_inference_steps, eta=self.eta, guidance_scale=self.guidance_scale,
                latent_size=self.latent_size, generator=generator,
            )))  # fmt: skip
        embeds, latents, log_probs, timesteps, images = (torch.cat([c[i] for c in chunks]) for i in range(5))
        steps = timesteps[: self.num_inference_steps]
        return DiffusionRollout(prompts, metadata, embeds, latents, log_probs, steps, negative, images)

    def rewards(self, rollout: DiffusionRollout) -> Tensor:
        """``[N]`` rewards of the rollout's images (on the module's device)."""
        return score_images(self.reward_fn, rollout.images, rollout.prompts, rollout.metadata, self.reward_name).to(
            self.device
        )

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """``[N]`` advantages of this rank's samples, normalised with the statistics of every
        rank's (so the stat tracker holds the same buffers on each)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            every_prompt: list[Any] = [None] * world
            torch.distributed.all_gather_object(every_prompt, prompts)
            all_prompts = [p for rank_prompts in every_prompt for p in rank_prompts]
            gathered = self.all_gather(rewards)
            assert isinstance(gathered, Tensor)
            all_rewards = gathered.reshape(-1)
        else:
            all_prompts, all_rewards = prompts, rewards
        if self.stat_tracker is not None:
            out = self.stat_tracker.advantages(all_prompts, all_rewards)
        else:
            out = normalized_advantages(all_rewards, all_rewards.mean(), all_rewards.std(correction=0))
        rank = self.trainer.global_rank if world > 1 else 0
        return out[rank * len(prompts) : (rank + 1) * len(prompts)]

    def step_log_probs(self, rollout: DiffusionRollout, steps: Tensor) -> Tensor:
        """``[B]`` log p_θ of the step ``steps[i]`` each sample took (with grad)."""
        rows = torch.arange(len(steps), device=steps.device)
        latents, taken = rollout.latents[rows, steps], rollout.latents[rows, steps + 1]
        timesteps = rollout.timesteps[steps]
        negative = rollout.negative.expand_as(rollout.embeds)
        scale = self.guidance_scale if self.train_cfg else 1.0
        eps = guided_noise(self.policy, self.scheduler.scale_model_input(latents, timesteps), timesteps,
                           rollout.embeds, negative, scale)  # fmt: skip
        return ddim_step(self.scheduler, eps, timesteps, latents, self.eta, prev_latents=taken)[1]

    # --------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # manual optimisation
        if self.prompt_fn is not None:
            drawn = [self.prompt_fn() for _ in batch["prompt"]]
            batch = {"prompt": [p for p, _ in drawn], "metadata": [dict(m) for _, m in drawn]}
        k = self.num_images_per_prompt
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        metadata = [m for m in batch["metadata"] for _ in range(k)]
        if not self.grid_prompts and self.grid_size:
            self.grid_prompts = list(dict.fromkeys(batch["prompt"]))[: self.grid_size]
            if self.trainer.global_step == 0 and self.trainer.is_global_zero:
                self.save_grid("samples_before.png")
        self.policy.eval()
        rollout = self.sample(prompts, metadata)
        self.policy.train()
        rewards = self.rewards(rollout)
        advantages = self.advantages(prompts, rewards)
        self.train_metrics.update({"reward": rewards, "reward_std": rewards.std(correction=0)})
        num_steps = rollout.log_probs.shape[1]
        trained = max(1, int(num_steps * self.timestep_fraction))
        count = len(prompts)
        for _ in range(self.num_inner_epochs):
            # Each image trains on its own random subset of steps, in a random order.
            orders = torch.stack([torch.randperm(num_steps) for _ in range(count)]).to(self.device)[:, :trained]
            per_step = self.train_batch_size * self.gradient_accumulation_steps
            for micro_batches in minibatch_indices(count, math.ceil(count / per_step), self.gradient_accumulation_steps):
                size = sum(m.numel() for m in micro_batches)
                for rows in micro_batches:
                    rows = rows.to(self.device)
                    part = rollout.select(rows)
                    for j in range(trained):
                        steps = orders[rows, j]
                        out = ddpo_loss(self.step_log_probs(part, steps), rollout.log_probs[rows, steps],
                                        advantages[rows], self.clip_range, self.adv_clip_max)  # fmt: skip
                        loss = out.loss.mean()
                        self.manual_backward(loss * (rows.numel() / (size * trained)))
                        self.train_metrics.update({"loss": loss.detach(), "approx_kl": out.approx_kl, "clip_frac": out.clipped})
                manual_optimizer_step(self, loss.detach(), self.max_grad_norm)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One image per held-out prompt: ``val/reward``."""
        rollout = self.sample(batch["prompt"], batch["metadata"])
        self.val_metrics.update({"reward": self.rewards(rollout)})

    # ------------------------------------------------------------------- grids
    @torch.no_grad()
    def save_grid(self, name: str) -> Path | None:
        """Sample the grid prompts from fixed noise (a generator of their own: the training
        stream is untouched) and save them side by side as ``name`` in the log directory."""
        from PIL import Image

        if not self.grid_prompts:
            return None
        generator = torch.Generator(self.device).manual_seed(self.grid_seed)
        was_training = self.policy.training
        self.policy.eval()
        images = self.sample(self.grid_prompts, [{} for _ in self.grid_prompts], generator=generator).images
        self.policy.train(was_training)
        rewards = score_images(self.reward_fn, images, self.grid_prompts, [{} for _ in self.grid_prompts], self.reward_name)
        tiles = to_pil(images)
        grid = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height))
        for i, tile in enumerate(tiles):
            grid.paste(tile, (i * tile.width, 0))
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        grid.save(directory / name)
        rank_zero_info(f"saved {directory / name}: mean {self.reward_name} {rewards.mean():.4f}")
        return directory / name

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and self.grid_prompts:
            self.save_grid("samples_after.png")
        super().on_fit_end()

    # -------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["ddpo"] = {
            "stat_tracker": None if self.stat_tracker is None else self.stat_tracker.state_dict(),
            "grid_prompts": self.grid_prompts,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY, {}).get("ddpo", {})
        if self.stat_tracker is not None and saved.get("stat_tracker") is not None:
            self.stat_tracker.load_state_dict(saved["stat_tracker"])
        self.grid_prompts = saved.get("grid_prompts", self.grid_prompts)
