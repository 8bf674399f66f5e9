"""Rollout engines behind one small interface (:class:`RolloutEngine`)."""

from lit_pref.engines.base import GenerationSettings, RolloutEngine, Samples
from lit_pref.engines.generate import GenerateEngine

__all__ = ["GenerateEngine", "GenerationSettings", "RolloutEngine", "Samples"]
