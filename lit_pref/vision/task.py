"""The shipped visual task: name the colour of the shape in a small generated image.

Each image is 16×16 pixels: a square of one of four colours (with a little per-pixel noise) at a
random place on a dark background of random shade. The prompt asks for the colour; the chosen
answer names it, the rejected one names another colour. The ground truth is the colour drawn, so
preference accuracy and generated answers are scored exactly. Everything comes from a seed: the
data is the same on every machine, with no download.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, DatasetDict
from PIL import Image

COLOURS = {"red": (215, 40, 35), "green": (40, 190, 50), "blue": (45, 70, 225), "yellow": (225, 210, 40)}
QUESTION = "What colour is the shape?"
SIZE = 16


def answer(colour: str) -> str:
    return f"It is {colour}."


def corpus() -> list[str]:
    """Text for the tiny tokenizer's merges (keeps the task's sequences short)."""
    return [QUESTION, *(answer(c) for c in COLOURS)] * 4


def draw(colour: str, rng: random.Random) -> Image.Image:
    """A ``SIZE``×``SIZE`` image of a ``colour`` square on a dark background."""
    shade = rng.randrange(0, 60)
    image = Image.new("RGB", (SIZE, SIZE), (shade, shade, shade))
    side = rng.randrange(6, 11)
    left, top = rng.randrange(0, SIZE - side + 1), rng.randrange(0, SIZE - side + 1)
    pixels = image.load()
    assert pixels is not None
    for x in range(left, left + side):
        for y in range(top, top + side):
            pixels[x, y] = tuple(min(255, max(0, c + rng.randrange(-20, 21))) for c in COLOURS[colour])
    return image


def prompt() -> list[dict[str, Any]]:
    """The conversational prompt: the image, then the question."""
    return [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": QUESTION}]}
    ]


def named_colour(completion: Any) -> str | None:
    """The colour a completion names (text or the last message); ``None`` when it names none or several."""
    content = completion[-1]["content"] if isinstance(completion, list) else completion
    text = (
        " ".join(p["text"] for p in content if p.get("type") == "text")
        if isinstance(content, list)
        else str(content)
    )
    words = {w.strip(".,!?;:").lower() for w in text.split()}
    named = [c for c in COLOURS if c in words]
    return named[0] if len(named) == 1 else None


def score(completion: Any, colour: str) -> float:
    """Ground truth: 1 when ``completion`` names exactly ``colour``, else 0."""
    return float(named_colour(completion) == colour)


def colour_reward(
    prompts: Sequence[Any], completions: Sequence[Any], colour: Sequence[str], **_: Any
) -> list[float]:
    """A reward function (GRPO): :func:`score` against each row's ``colour`` column."""
    return [score(c, truth) for c, truth in zip(completions, colour, strict=True)]


def _rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour = rng.choice(tuple(COLOURS))
        other = rng.choice([c for c in COLOURS if c != colour])
        rows.append(
            {"colour": colour, "other": other, "image": draw(colour, rng), "desirable": rng.random() < 0.5}
        )
    return rows


def _splits(make: Any, train: int, test: int, seed: int) -> DatasetDict:
    return DatasetDict(
        {
            "train": Dataset.from_list([make(r) for r in _rows(train, seed)]),
            "test": Dataset.from_list([make(r) for r in _rows(test, seed + 1)]),
        }
    )


def _turn(text: str) -> list[dict[str, Any]]:
    # Content as a list of parts in every message, as TRL's vision datasets store it (one Arrow type).
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def colour_preferences(train: int = 256, test: int = 64, seed: int = 0) -> DatasetDict:
    """Paired rows (DPO, ORPO…): ``prompt``, ``images``, ``chosen`` names the colour, ``rejected`` another."""
    return _splits(
        lambda r: {
            "prompt": prompt(),
            "images": [r["image"]],
            "chosen": _turn(answer(r["colour"])),
            "rejected": _turn(answer(r["other"])),
            "colour": r["colour"],
        },
        train,
        test,
        seed,
    )


def colour_feedback(train: int = 256, test: int = 64, seed: int = 0) -> DatasetDict:
    """Unpaired rows (KTO, BCO): the right colour labelled desirable, half of the rows a wrong one."""
    return _splits(
        lambda r: {
            "prompt": prompt(),
            "images": [r["image"]],
            "completion": _turn(answer(r["colour"] if r["desirable"] else r["other"])),
            "label": r["desirable"],
            "colour": r["colour"],
        },
        train,
        test,
        seed,
    )


def colour_sft(train: int = 256, test: int = 64, seed: int = 0) -> DatasetDict:
    """Prompt / completion rows (SFT) with the right answer."""
    return _splits(
        lambda r: {
            "prompt": prompt(),
            "images": [r["image"]],
            "completion": _turn(answer(r["colour"])),
            "colour": r["colour"],
        },
        train,
        test,
        seed,
    )


def colour_prompts(train: int = 256, test: int = 64, seed: int = 0) -> DatasetDict:
    """Prompt-only rows (GRPO) with the ground-truth ``colour`` for :func:`colour_reward`."""
    return _splits(
        lambda r: {"prompt": prompt(), "images": [r["image"]], "colour": r["colour"]}, train, test, seed
    )
