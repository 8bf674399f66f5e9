"""lit_pref: preference alignment for language models as PyTorch Lightning modules.

The public API is the names in ``__all__``: they may be imported from ``lit_pref`` directly
(``from lit_pref import DPO``) and subclassed in user code. They are imported lazily, on first
access, so ``import lit_pref`` stays cheap (Lightning and Transformers load only when a module,
the data module or the CLI is first used). Each name also lives at the path given in
``_EXPORTS``, which is where YAML ``class_path`` entries point (``lit_pref.modules.DPO``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("lit-pref")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0+unknown"

# Public name → the module that defines it.
_EXPORTS: dict[str, str] = {
    # LightningModules, one per algorithm, and the bases to build new ones on.
    "AlignmentModule": "lit_pref.modules.base",
    "ReferenceModule": "lit_pref.modules.reference",
    "OfflineReferenceModule": "lit_pref.modules.reference",
    "OnlineRLModule": "lit_pref.modules.online",
    "SFT": "lit_pref.modules.sft",
    "RewardModel": "lit_pref.modules.reward",
    "DPO": "lit_pref.modules.dpo",
    "KTO": "lit_pref.modules.kto",
    "BCO": "lit_pref.modules.bco",
    "CPO": "lit_pref.modules.cpo",
    "ORPO": "lit_pref.modules.orpo",
    "PPO": "lit_pref.modules.ppo",
    "GRPO": "lit_pref.modules.grpo",
    "OnlineDPO": "lit_pref.modules.online_dpo",
    "RFT": "lit_pref.modules.rft",
    "IterativeSFT": "lit_pref.modules.rft",
    "DDPO": "lit_pref.modules.ddpo",
    "DiffusionDPO": "lit_pref.modules.diffusion_dpo",
    # The reference component and the rollout engines.
    "Reference": "lit_pref.reference",
    "RolloutEngine": "lit_pref.engines.base",
    "GenerateEngine": "lit_pref.engines.generate",
    "VLLMEngine": "lit_pref.engines.vllm",
    # Data.
    "PreferenceDataModule": "lit_pref.data.datamodule",
    # Rewards and scoring.
    "RewardScorer": "lit_pref.scoring",
    "RewardSet": "lit_pref.rewards",
    # Callbacks.
    "RefModelSync": "lit_pref.callbacks.ref_sync",
    "RewardPredictionTable": "lit_pref.callbacks.predictions",
    "SampleTable": "lit_pref.callbacks.samples",
    "StopOnDivergence": "lit_pref.callbacks.faults",
    "CheckpointOnSignal": "lit_pref.callbacks.faults",
    "TrainingDiverged": "lit_pref.callbacks.faults",
    # The command line, and the FSDP2 strategy of configs/strategies/fsdp.yaml.
    "LitPrefCLI": "lit_pref.cli",
    "FSDP2Strategy": "lit_pref.distributed",
    # The shared log-prob path and what it returns.
    "completion_logps": "lit_pref.ops",
    "CompletionLogps": "lit_pref.types",
    # Held-out checks and tiny local models.
    "preference_accuracy": "lit_pref.evaluation",
    "generate": "lit_pref.evaluation",
    "mean_score": "lit_pref.evaluation",
    "save_tiny_model": "lit_pref.tiny",
    "save_tiny_vlm": "lit_pref.tiny",
    "save_tiny_diffusion_pipeline": "lit_pref.tiny",
}

# Literal, so static tools read it; a test checks it matches _EXPORTS.
__all__ = [
    "BCO",
    "CPO",
    "DDPO",
    "DPO",
    "GRPO",
    "KTO",
    "ORPO",
    "PPO",
    "RFT",
    "SFT",
    "AlignmentModule",
    "CheckpointOnSignal",
    "CompletionLogps",
    "DiffusionDPO",
    "FSDP2Strategy",
    "GenerateEngine",
    "IterativeSFT",
    "LitPrefCLI",
    "OfflineReferenceModule",
    "OnlineDPO",
    "OnlineRLModule",
    "PreferenceDataModule",
    "RefModelSync",
    "Reference",
    "ReferenceModule",
    "RewardModel",
    "RewardPredictionTable",
    "RewardScorer",
    "RewardSet",
    "RolloutEngine",
    "SampleTable",
    "StopOnDivergence",
    "TrainingDiverged",
    "VLLMEngine",
    "__version__",
    "completion_logps",
    "generate",
    "mean_score",
    "preference_accuracy",
    "save_tiny_diffusion_pipeline",
    "save_tiny_model",
    "save_tiny_vlm",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lit_pref' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from lit_pref.callbacks.faults import CheckpointOnSignal, StopOnDivergence, TrainingDiverged
    from lit_pref.callbacks.predictions import RewardPredictionTable
    from lit_pref.callbacks.ref_sync import RefModelSync
    from lit_pref.callbacks.samples import SampleTable
    from lit_pref.cli import LitPrefCLI
    from lit_pref.data.datamodule import PreferenceDataModule
    from lit_pref.distributed import FSDP2Strategy
    from lit_pref.engines.base import RolloutEngine
    from lit_pref.engines.generate import GenerateEngine
    from lit_pref.engines.vllm import VLLMEngine
    from lit_pref.evaluation import generate, mean_score, preference_accuracy
    from lit_pref.modules.base import AlignmentModule
    from lit_pref.modules.bco import BCO
    from lit_pref.modules.cpo import CPO
    from lit_pref.modules.ddpo import DDPO
    from lit_pref.modules.diffusion_dpo import DiffusionDPO
    from lit_pref.modules.dpo import DPO
    from lit_pref.modules.grpo import GRPO
    from lit_pref.modules.kto import KTO
    from lit_pref.modules.online import OnlineRLModule
    from lit_pref.modules.online_dpo import OnlineDPO
    from lit_pref.modules.orpo import ORPO
    from lit_pref.modules.ppo import PPO
    from lit_pref.modules.reference import OfflineReferenceModule, ReferenceModule
    from lit_pref.modules.reward import RewardModel
    from lit_pref.modules.rft import RFT, IterativeSFT
    from lit_pref.modules.sft import SFT
    from lit_pref.ops import completion_logps
    from lit_pref.reference import Reference
    from lit_pref.rewards import RewardSet
    from lit_pref.scoring import RewardScorer
    from lit_pref.tiny import save_tiny_diffusion_pipeline, save_tiny_model, save_tiny_vlm
    from lit_pref.types import CompletionLogps
