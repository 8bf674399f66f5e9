"""Lightning callbacks: prediction tables, reference-model sync, sample logging, divergence stop,
checkpoint on preemption."""

from lit_pref.callbacks.faults import CheckpointOnSignal, StopOnDivergence, TrainingDiverged
from lit_pref.callbacks.predictions import RewardPredictionTable
from lit_pref.callbacks.ref_sync import RefModelSync
from lit_pref.callbacks.samples import SampleTable

__all__ = [
    "CheckpointOnSignal",
    "RefModelSync",
    "RewardPredictionTable",
    "SampleTable",
    "StopOnDivergence",
    "TrainingDiverged",
]
