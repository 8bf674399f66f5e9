"""The shipped toy task: write a line in a requested mood, scored by a ground-truth function.

A prompt asks for a ``happy`` or ``sad`` line about a topic; the completion is a handful of words.
The ground-truth score is (#words of the requested mood − #words of the opposite mood) / #words,
in [−1, 1]. Supervised rows are drawn from a slightly mood-aligned word distribution, so an SFT
model is mediocre; preference pairs rank two such completions by the score, so DPO (and any other
preference method) has a clear signal to climb, and generated completions can be scored exactly.

Everything is generated from a seed, so the data is identical on every machine with no download.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, DatasetDict

POSITIVE = ("good", "great", "bright", "kind", "warm", "calm", "joy", "nice", "love", "glad")
NEGATIVE = ("bad", "grim", "dark", "cold", "angry", "gloom", "dull", "pain", "mean", "hate")
NEUTRAL = ("the", "day", "cat", "tree", "road", "blue", "house", "song", "river", "stone")
TOPICS = ("rain", "home", "work", "music", "winter", "friends", "sea", "city")
MOODS = {"happy": (POSITIVE, NEGATIVE), "sad": (NEGATIVE, POSITIVE)}
NUM_WORDS = 6
# The supervised word distribution: aligned / opposite / neutral probabilities.
SFT_MIX = (0.45, 0.25, 0.3)


def make_prompt(mood: str, topic: str) -> str:
    return f"Write a {mood} line about {topic}:"


def parse_mood(prompt: str) -> str:
    """The mood a prompt asks for (``happy`` or ``sad``); plain text or the last user message."""
    return "sad" if " sad " in f" {prompt} " else "happy"


def score(prompt: str, completion: str) -> float:
    """Ground-truth score of ``completion`` for ``prompt``, in [−1, 1]."""
    aligned, opposite = MOODS[parse_mood(prompt)]
    words = [w.strip(".,:;!?").lower() for w in completion.split()]
    if not words:
        return -1.0
    return (sum(w in aligned for w in words) - sum(w in opposite for w in words)) / max(len(words), NUM_WORDS)


def _sample_completion(rng: random.Random, mood: str) -> str:
    aligned, opposite = MOODS[mood]
    pools = rng.choices((aligned, opposite, NEUTRAL), weights=SFT_MIX, k=NUM_WORDS)
    return " ".join(rng.choice(pool) for pool in pools)


def _prompts(rng: random.Random, n: int) -> list[str]:
    return [make_prompt(rng.choice(tuple(MOODS)), rng.choice(TOPICS)) for _ in range(n)]


def _as_messages(prompt: str, completion: str | None = None) -> tuple[list[dict], list[dict] | None]:
    user = [{"role": "user", "content": prompt}]
    return user, None if completion is None else [{"role": "assistant", "content": completion}]


def sft_rows(n: int, seed: int = 0, conversational: bool = False) -> list[dict]:
    """``n`` prompt/completion rows from the mildly aligned supervised distribution."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for prompt in _prompts(rng, n):
        completion = " " + _sample_completion(rng, parse_mood(prompt))
        if conversational:
            prompt_msgs, completion_msgs = _as_messages(prompt, completion.strip())
            rows.append({"prompt": prompt_msgs, "completion": completion_msgs})
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def preference_rows(n: int, seed: int = 0, conversational: bool = False) -> list[dict]:
    """``n`` (prompt, chosen, rejected) rows; chosen scores strictly higher than rejected."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for prompt in _prompts(rng, n):
        mood = parse_mood(prompt)
        while True:
            a, b = _sample_completion(rng, mood), _sample_completion(rng, mood)
            if score(prompt, a) != score(prompt, b):
                break
        chosen, rejected = (a, b) if score(prompt, a) > score(prompt, b) else (b, a)
        if conversational:
            prompt_msgs, chosen_msgs = _as_messages(prompt, chosen)
            rows.append({"prompt": prompt_msgs, "chosen": chosen_msgs, "rejected": _as_messages(prompt, rejected)[1]})
        else:
            rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt-only rows (with the requested mood as an extra column) for online RL."""
    rng = random.Random(seed)
    return [{"prompt": p, "mood": parse_mood(p)} for p in _prompts(rng, n)]


def _split(rows: list[dict], n_val: int) -> DatasetDict:
    return DatasetDict(
        {"train": Dataset.from_list(rows[n_val:]), "test": Dataset.from_list(rows[:n_val])}
    )


def mood_sft(n: int = 512, n_val: int = 64, seed: int = 0, conversational: bool = False) -> DatasetDict:
    """Supervised split of the task (``train`` / ``test``)."""
    return _split(sft_rows(n + n_val, seed, conversational), n_val)


def mood_preferences(n: int = 512, n_val: int = 64, seed: int = 1, conversational: bool = False) -> DatasetDict:
    """Preference split of the task (``train`` / ``test``)."""
    return _split(preference_rows(n + n_val, seed, conversational), n_val)


def mood_prompts(n: int = 256, n_val: int = 32, seed: int = 2) -> DatasetDict:
    """Prompt-only split of the task (``train`` / ``test``)."""
    return _split(prompt_rows(n + n_val, seed), n_val)


def mood_reward(prompts: Sequence[str], completions: Sequence[str], **_: object) -> list[float]:
    """Reward function for PPO/GRPO: the ground-truth score of each completion."""
    return [score(p, c) for p, c in zip(prompts, completions, strict=True)]


def corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from, so task words are single tokens."""
    words = " " + " ".join(POSITIVE + NEGATIVE + NEUTRAL + TOPICS + tuple(MOODS))
    return [words, *(make_prompt(m, t) for m in MOODS for t in TOPICS)] * 8
