"""Lightning callbacks: prediction tables, reference-model sync, sample logging, export."""

from lit_pref.callbacks.predictions import RewardPredictionTable
from lit_pref.callbacks.ref_sync import RefModelSync
from lit_pref.callbacks.samples import SampleTable

__all__ = ["RefModelSync", "RewardPredictionTable", "SampleTable"]
