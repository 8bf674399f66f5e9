"""Diffusion alignment's pure parts: the losses, the DDIM step's log-probability, stat tracking,
rewards and image rows."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("diffusers")

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from lit_pref.data.formats import DataFormatError
from lit_pref.diffusion.data import ImageRows
from lit_pref.diffusion.rewards import jpeg_compressibility, jpeg_incompressibility, load_reward, score_images
from lit_pref.diffusion.sampling import ddim_step
from lit_pref.diffusion.stats import PerPromptStatTracker
from lit_pref.losses.diffusion import ddpo_loss, diffusion_dpo_loss


# ------------------------------------------------------------------ Diffusion-DPO
def test_diffusion_dpo_is_ln2_when_the_policy_is_the_reference():
    mse = torch.tensor([0.3, 1.2, 0.7])
    out = diffusion_dpo_loss(mse, mse + 0.1, mse, mse + 0.1, beta=5000.0)
    torch.testing.assert_close(out.loss, torch.full((3,), math.log(2.0)))
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0


def test_diffusion_dpo_matches_eq_14_by_hand():
    # Chosen error down by 0.001 and rejected error up by 0.002 against the reference, β = 1000:
    # inside = −β/2 (−0.001 − 0.002) = 1.5, loss = −log σ(1.5) = log(1 + e^−1.5).
    out = diffusion_dpo_loss(
        torch.tensor([0.499]), torch.tensor([0.502]), torch.tensor([0.5]), torch.tensor([0.5]), beta=1000.0
    )
    torch.testing.assert_close(out.loss, torch.tensor([math.log1p(math.exp(-1.5))]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5]), atol=1e-5, rtol=0)


def test_denoising_the_chosen_image_better_lowers_the_diffusion_dpo_loss():
    policy_chosen = torch.tensor([0.5], requires_grad=True)
    loss = diffusion_dpo_loss(policy_chosen, torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.5]), 100.0).loss
    loss.sum().backward()
    assert policy_chosen.grad is not None and policy_chosen.grad.item() > 0  # lower error → lower loss
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(policy_chosen, policy_chosen, policy_chosen, policy_chosen, 0.0)


# ---------------------------------------------------------------------- DDPO loss
def test_ddpo_loss_at_ratio_one_is_minus_the_clipped_advantage_with_reinforce_gradient():
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    adv = torch.tensor([2.0, -8.0, 0.5])
    out = ddpo_loss(logp, logp.detach(), adv, clip_range=1e-4, adv_clip_max=5.0)
    torch.testing.assert_close(out.loss, torch.tensor([-2.0, 5.0, -0.5]))
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-2.0, 5.0, -0.5]))  # d(−ρÂ)/dlogp = −Â at ρ = 1
    assert out.clipped.sum() == 0 and out.approx_kl.abs().max() == 0


def test_ddpo_loss_stops_the_gradient_outside_the_trust_region():
    old = torch.zeros(2)
    logp = torch.tensor([0.1, -0.1], requires_grad=True)  # ρ = e^±0.1, far beyond ε = 0.01
    out = ddpo_loss(logp, old, torch.tensor([1.0, -1.0]), clip_range=0.01, adv_clip_max=5.0)
    out.loss.sum().backward()
    assert logp.grad is not None and logp.grad.abs().max() == 0
    assert out.clipped.tolist() == [1.0, 1.0]
    torch.testing.assert_close(out.loss, torch.tensor([-1.01, 0.99]))


# ---------------------------------------------------------------------- DDIM step
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_matches_diffusers_and_scores_its_gaussian(eta):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = scheduler.timesteps[4]
    noise = torch.randn(3, 4, 8, 8)
    expected = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    # The same step from ddim_step, its noise drawn from the same stream position.
    generator = torch.Generator().manual_seed(0)
    torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    prev, log_prob = ddim_step(scheduler, eps, t, x, eta, generator=generator)
    torch.testing.assert_close(prev, expected, atol=1e-5, rtol=1e-5)
    # Its log-probability is the Gaussian's, averaged over elements; scoring it again agrees.
    alpha = scheduler.alphas_cumprod
    prev_t = int(t) - 1000 // 10
    variance = (1 - alpha[prev_t]) / (1 - alpha[t]) * (1 - alpha[t] / alpha[prev_t])
    mean = expected - eta * variance.sqrt() * noise
    gaussian = torch.distributions.Normal(mean, eta * variance.sqrt()).log_prob(expected).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, gaussian, atol=1e-4, rtol=1e-5)
    _, rescored = ddim_step(scheduler, eps, torch.full((3,), int(t)), x, eta, prev_latents=prev)
    torch.testing.assert_close(rescored, log_prob)


def test_ddim_step_needs_a_positive_eta():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(scheduler, torch.zeros(1, 4, 2, 2), scheduler.timesteps[0], torch.zeros(1, 4, 2, 2), 0.0)


# ---------------------------------------------------------------- stat tracking
def test_stat_tracker_falls_back_to_the_batch_until_a_prompt_has_enough_rewards():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.advantages(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 10.0, 12.0]))
    batch = torch.tensor([1.0, 3.0, 10.0, 12.0])
    torch.testing.assert_close(first, (batch - batch.mean()) / (batch.std(correction=0) + 1e-6))
    second = tracker.advantages(["a", "a"], torch.tensor([2.0, 2.0]))  # "a" now has 4 rewards: its own stats
    seen = torch.tensor([1.0, 3.0, 2.0, 2.0])
    torch.testing.assert_close(second, (torch.tensor([2.0, 2.0]) - seen.mean()) / (seen.std(correction=0) + 1e-6))
    restored = PerPromptStatTracker(buffer_size=4, min_count=3)
    restored.load_state_dict(tracker.state_dict())
    assert list(restored.buffers["a"]) == [1.0, 3.0, 2.0, 2.0]


# ------------------------------------------------------------------------ rewards
def test_jpeg_rewards_prefer_flat_images_for_compressibility():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    compress = jpeg_compressibility(images, ["p", "p"], [{}, {}])
    incompress = jpeg_incompressibility(images, ["p", "p"], [{}, {}])
    assert compress[0] > compress[1] and incompress[1] > incompress[0]
    assert compress == [-v for v in incompress]


def test_reward_functions_load_by_path_and_bad_values_are_errors():
    fn = load_reward("lit_pref.diffusion.rewards:jpeg_compressibility")
    assert fn is jpeg_compressibility
    images = torch.zeros(2, 3, 8, 8)
    trl_style = score_images(lambda i, p, m: ([1.0, 2.0], {}), images, ["a", "b"], [{}, {}], "trl")
    assert trl_style.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="finite"):
        score_images(lambda i, p, m: [1.0, float("nan")], images, ["a", "b"], [{}, {}], "bad")
    with pytest.raises(ValueError, match="returned 1 values for 2 images"):
        score_images(lambda i, p, m: [1.0], images, ["a", "b"], [{}, {}], "short")


# ---------------------------------------------------------------------- image rows
def test_image_pair_rows_collate_to_pixels_in_minus_one_one():
    from datasets import Dataset

    white = Image.fromarray(np.full((40, 60, 3), 255, np.uint8))
    black = np.zeros((16, 16, 3), np.uint8)
    rows = ImageRows("image_pairs", resolution=16)
    ds = rows.build_split("train", Dataset.from_list([{"prompt": "a cat", "chosen": white, "rejected": white, "_row": 0}]))
    assert "_row" not in ds.column_names
    batch = rows([{**ds.with_format(None)[0], "rejected": black}])
    assert batch["prompt"] == ["a cat"]
    assert batch["chosen_pixels"].shape == (1, 3, 16, 16) and batch["chosen_pixels"].min() == 1.0
    assert batch["rejected_pixels"].max() == -1.0
    with pytest.raises(DataFormatError, match="missing \\['rejected'\\]"):
        rows.build_split("train", Dataset.from_list([{"prompt": "a", "chosen": white}]))


def test_prompt_rows_keep_their_other_columns_as_metadata():
    batch = ImageRows("prompt_only")([{"prompt": "a cat", "animal": "cat"}])
    assert batch == {"prompt": ["a cat"], "metadata": [{"animal": "cat"}]}
