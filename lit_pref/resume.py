"""What a checkpoint needs beyond weights and optimizer state for a resumed run to be the same run.

Lightning checkpoints hold the weights, the optimizer, the schedulers and the loops' counters;
lit_pref adds the random state of every rank (torch, CUDA, numpy, python: what sampling and
dropout draw from) and the run's identity (so ``ckpt_path: last`` never resumes another run),
under the checkpoint key :data:`CHECKPOINT_KEY`. The training loader's position is saved by the
loader itself (:mod:`lit_pref.data.sampling`).
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

CHECKPOINT_KEY = "lit_pref"


def rng_state() -> dict[str, Any]:
    """Every random state this process draws from, in types a ``weights_only`` load accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states_of_all_ranks() -> list[dict[str, Any]]:
    """:func:`rng_state` of every rank, in rank order (a collective under torch.distributed:
    every rank saving a checkpoint calls it)."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rank_rng(states: list[dict[str, Any]], rank: int) -> None:
    """Restore this rank's saved random state (a warning when the run has more ranks than saved)."""
    if rank >= len(states):
        rank_zero_warn(
            f"the checkpoint holds the random state of {len(states)} rank(s) and this run has more: rank {rank} "
            f"continues from rank {rank % len(states)}'s, so sampling does not repeat the straight run"
        )
    set_rng_state(states[rank % len(states)])


def seed_all(seed: int) -> None:
    """Seed torch (every device), numpy and python with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def run_identity(config: dict[str, Any]) -> str:
    """A short hash of what makes a run this run (model, data, seed), the same for its resumes."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
