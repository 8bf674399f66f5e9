"""Small generated datasets for the diffusion modules' configs, tests and benchmark (no download)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from PIL import Image

# DDPO's own prompt set for the compressibility task: simple animals (Black et al. 2023, §6.1).
ANIMALS = ("cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat")
HELD_OUT = ("lion", "tiger", "fox", "owl")


def animal_prompts() -> dict[str, list[dict[str, Any]]]:
    """``train``: one prompt per animal of DDPO's list; ``test``: animals never trained on."""
    from datasets import Dataset, DatasetDict

    def rows(names: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{"prompt": f"a photo of a {name}", "animal": name} for name in names]

    return DatasetDict({"train": Dataset.from_list(rows(ANIMALS)), "test": Dataset.from_list(rows(HELD_OUT))})


def random_animal_prompt() -> tuple[str, dict[str, Any]]:
    """A TRL-style prompt function: a random animal of DDPO's list and its metadata."""
    name = random.choice(ANIMALS)
    return f"a photo of a {name}", {"animal": name}


def smooth_vs_noisy_pairs(num_rows: int = 32, size: int = 32, seed: int = 0) -> Any:
    """Image preference pairs with a known preference: a flat-coloured image (chosen) against
    the same colour under heavy pixel noise (rejected), ``train`` and ``test`` splits."""
    from datasets import Dataset, DatasetDict

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_rows):
        colour = rng.integers(40, 216, size=3)
        flat = np.broadcast_to(colour, (size, size, 3)).astype(np.uint8)
        noisy = np.clip(flat + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
        rows.append({"prompt": f"a photo of a {ANIMALS[i % len(ANIMALS)]}", "chosen": Image.fromarray(flat),
                     "rejected": Image.fromarray(noisy)})  # fmt: skip
    split = int(num_rows * 0.75)
    return DatasetDict({"train": Dataset.from_list(rows[:split]), "test": Dataset.from_list(rows[split:])})
