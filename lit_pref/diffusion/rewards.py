"""Image rewards for DDPO: the paper's JPEG (in)compressibility, and any Python function.

A reward is named ``"pkg.module:fn"`` (or passed as a callable) and called as
``fn(images, prompts, metadata) -> sequence of floats``: ``images`` is a ``[N, 3, H, W]`` float
tensor in [0, 1] on the CPU, ``prompts`` the ``N`` prompt texts, ``metadata`` one dict per image
(the prompt's other dataset columns). TRL's DDPO reward functions return ``(rewards, info)``;
that form is accepted too and ``info`` is ignored.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lit_pref.rewards import import_object

if TYPE_CHECKING:
    from PIL import Image

ImageReward = Callable[[Tensor, list[str], list[dict[str, Any]]], Any]


def to_pil(images: Tensor) -> list[Image.Image]:
    """``[N, 3, H, W]`` in [0, 1] → ``N`` RGB images (rounded to 8 bits)."""
    from PIL import Image  # Pillow comes with the diffusion extra

    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def jpeg_kilobytes(images: Tensor, quality: int = 95) -> list[float]:
    """Each image's size in kB once JPEG-encoded at ``quality`` (the DDPO paper's measure)."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def jpeg_compressibility(images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> list[float]:
    """Black et al. 2023, §6.1: the negative JPEG file size in kB (higher is more compressible)."""
    return [-kb for kb in jpeg_kilobytes(images)]


def jpeg_incompressibility(images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> list[float]:
    """Black et al. 2023, §6.1: the JPEG file size in kB (higher is more detailed)."""
    return jpeg_kilobytes(images)


def load_reward(reward: str | ImageReward) -> ImageReward:
    """The reward function named ``"pkg.module:fn"`` (or ``reward`` itself, when callable)."""
    fn = import_object(reward) if isinstance(reward, str) else reward
    if not callable(fn):
        raise ValueError(f"reward {reward!r} is not callable")
    return fn


def score_images(
    fn: ImageReward, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]], name: str
) -> Tensor:
    """``[N]`` float32 rewards of ``fn``, checked: one finite number per image."""
    out = fn(images.detach().float().cpu(), prompts, metadata)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        out = out[0]
    values: Sequence[Any] = out.tolist() if isinstance(out, Tensor | np.ndarray) else list(out)
    if len(values) != len(prompts):
        raise ValueError(f"reward {name} returned {len(values)} values for {len(prompts)} images")
    rewards = []
    for i, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"reward {name} returned {value!r} for image {i} (prompt {prompts[i]!r}); expected a number") from None
        if not math.isfinite(number):
            raise ValueError(f"reward {name} returned {number} for image {i} (prompt {prompts[i]!r}); rewards must be finite")
        rewards.append(number)
    return torch.tensor(rewards, dtype=torch.float32)
