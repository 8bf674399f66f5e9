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
import pickle
import random
from pathlib import Path
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


def rng_states_of_all_ranks(state: dict[str, Any]) -> list[dict[str, Any]]:
    """``state`` (this rank's :func:`rng_state`) of every rank, in rank order (a collective under
    torch.distributed: every rank saving a checkpoint calls it)."""
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


def saved_run_identity(path: Path) -> str | None:
    """The run identity a lit_pref checkpoint was saved with (``None``: not recorded). Memory-mapped,
    so only the few bytes read are loaded."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError):
        return None
    saved = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return saved.get("run_identity") if isinstance(saved, dict) else None


def checkpoint_dirs(trainer: Any) -> list[Path]:
    """Where this trainer's checkpoint callbacks write (for one without a ``dirpath``, the version
    directories of its logger, as Lightning places them)."""
    dirs: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath is not None:
            dirs.append(Path(dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
            dirs += sorted(root.glob("*/checkpoints"))
        else:
            dirs.append(Path(trainer.default_root_dir) / "checkpoints")
    return dirs


def find_last_checkpoint(dirs: list[Path], identity: str | None) -> Path:
    """The newest ``last*.ckpt`` in ``dirs`` saved by the run ``identity`` (any, when ``None``).

    Raises:
        FileNotFoundError: there is none; the message names what was found and where.
    """
    where = ", ".join(str(d) for d in dirs) or "no checkpoint directory"
    candidates = sorted({p for d in dirs for p in d.glob("last*.ckpt")}, key=lambda p: p.stat().st_mtime, reverse=True)
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: there is no checkpoint to resume (looked in {where}); leave --ckpt_path out to "
            "start a fresh run"
        )
    mine = [p for p in candidates if identity is None or saved_run_identity(p) == identity]
    if not mine:
        raise FileNotFoundError(
            f"--ckpt_path last: the checkpoints in {where} ({', '.join(p.name for p in candidates[:3])}) were saved "
            "by other runs (another model, data or seed configuration); give this run a checkpoint directory of "
            "its own, or pass the file to resume with --ckpt_path PATH"
        )
    return mine[0]
