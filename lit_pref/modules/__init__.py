"""LightningModules, one per algorithm."""

from lit_pref.modules.base import AlignmentModule
from lit_pref.modules.dpo import DPO
from lit_pref.modules.sft import SFT

__all__ = ["DPO", "SFT", "AlignmentModule"]
