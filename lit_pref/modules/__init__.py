"""LightningModules, one per algorithm."""

from lit_pref.modules.base import AlignmentModule
from lit_pref.modules.bco import BCO
from lit_pref.modules.cpo import CPO
from lit_pref.modules.ddpo import DDPO
from lit_pref.modules.diffusion_dpo import DiffusionDPO
from lit_pref.modules.dpo import DPO
from lit_pref.modules.grpo import GRPO
from lit_pref.modules.kto import KTO
from lit_pref.modules.online_dpo import OnlineDPO
from lit_pref.modules.orpo import ORPO
from lit_pref.modules.ppo import PPO
from lit_pref.modules.reward import RewardModel
from lit_pref.modules.rft import RFT, IterativeSFT
from lit_pref.modules.sft import SFT

__all__ = [
    "BCO", "CPO", "DDPO", "DPO", "GRPO", "KTO", "ORPO", "PPO", "RFT", "SFT", "AlignmentModule", "DiffusionDPO", "IterativeSFT",
    "OnlineDPO", "RewardModel",
]  # fmt: skip
