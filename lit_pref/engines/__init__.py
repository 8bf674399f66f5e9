"""Rollout engines behind one small interface (:class:`RolloutEngine`).

``VLLMEngine`` (:mod:`lit_pref.engines.vllm`) is imported on first access, so lit_pref works
without vLLM installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from lit_pref.engines.base import GenerationSettings, RolloutEngine, Samples
from lit_pref.engines.generate import GenerateEngine

if TYPE_CHECKING:
    from lit_pref.engines.vllm import VLLMEngine

# The engines a module's ``rollout_engine`` may name instead of configuring one.
EngineName = Literal["generate", "vllm"]

__all__ = ["EngineName", "GenerateEngine", "GenerationSettings", "RolloutEngine", "Samples", "VLLMEngine", "engine_from_name"]


def engine_from_name(name: str, completions_per_call: int | None = None) -> RolloutEngine:
    """The engine ``name`` with its default settings (``generate`` calls ``generate`` with at most
    ``completions_per_call`` completions)."""
    if name == "generate":
        return GenerateEngine(completions_per_call)
    if name == "vllm":
        from lit_pref.engines.vllm import VLLMEngine

        return VLLMEngine()
    raise ValueError(f"unknown rollout engine {name!r}; expected generate, vllm or a RolloutEngine object")


def __getattr__(name: str) -> Any:
    if name == "VLLMEngine":
        from lit_pref.engines.vllm import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
