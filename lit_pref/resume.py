"""What a checkpoint needs beyond weights and optimizer state for a resumed run to be the same run.

Lightning checkpoints hold the weights, the optimizer, the schedulers and the loops' counters;
lit_pref adds the random state of every rank (torch, CUDA, numpy, python: what sampling and
dropout draw from) and the run's identity (so ``ckpt_path: last`` never resumes another run),
under the checkpoint key :data:`CHECKPOINT_KEY`. The training loader's position is saved by the
loader itself (:mod:`lit_pref.data.sampling`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
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


def saved_run(path: str | Path) -> dict[str, Any]:
    """What a lit_pref checkpoint records of its run (``run_identity``, ``loggers``) and its
    ``global_step``; empty when unreadable. Memory-mapped: only the bytes read are loaded."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError):
        return {}
    if not isinstance(checkpoint, dict):
        return {}
    saved = checkpoint.get(CHECKPOINT_KEY)
    return {**(saved if isinstance(saved, dict) else {}), "global_step": checkpoint.get("global_step", 0)}


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
    mine = [p for p in candidates if identity is None or saved_run(p).get("run_identity") == identity]
    if not mine:
        raise FileNotFoundError(
            f"--ckpt_path last: the checkpoints in {where} ({', '.join(p.name for p in candidates[:3])}) were saved "
            "by other runs (another model, data or seed configuration); give this run a checkpoint directory of "
            "its own, or pass the file to resume with --ckpt_path PATH"
        )
    return mine[0]


def logger_records(loggers: list[Any]) -> list[dict[str, Any]]:
    """Where each CSV logger of a run writes (saved in checkpoints, so a resume continues there)."""
    return [
        {"class": type(logger).__name__, "save_dir": str(logger.save_dir), "name": logger.name, "version": logger.version}
        for logger in loggers
        if isinstance(logger, CSVLogger)
    ]


def continued_logger(cls: type, init_args: dict[str, Any], saved: list[dict[str, Any]], step: int) -> Any | None:
    """A CSV logger built from ``init_args`` that continues the saved run's log directory without its
    entries from step ``step`` on (which the resumed run logs again), or ``None`` when ``saved``
    holds no log of this logger (or its version was set explicitly)."""
    if init_args.get("version") is not None or not issubclass(cls, CSVLogger):
        return None
    probe = cls(**init_args)
    match = next(
        (s for s in saved if s["class"] == cls.__name__ and s["save_dir"] == str(probe.save_dir) and s["name"] == probe.name),
        None,
    )
    if match is None:
        return None
    logger = cls(**{**init_args, "version": match["version"]})
    metrics = Path(logger.log_dir) / "metrics.csv"
    rows = []
    if metrics.is_file():
        with metrics.open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) < step]
    with warnings.catch_warnings():
        # Lightning says it deletes the old file (it does); the rows before the resume are written back.
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        experiment = logger.experiment
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}
        experiment.log_metrics(values, int(row["step"]))
    logger.save()
    return logger
