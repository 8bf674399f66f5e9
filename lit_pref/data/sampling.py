"""Training batches that resume mid-epoch: the same order and position after a restart.

A checkpoint taken inside an epoch records where the training loader stands (the epoch and the
batches already trained on); a run resumed from it draws the same permutation and continues at
the next batch, so it sees exactly the batches a straight run would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler


def global_seed() -> int:
    """The seed ``seed_everything`` set (Lightning exports it to every rank), else 0: all ranks
    must agree on the permutation they shard."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class ResumableSampler(DistributedSampler):
    """One rank's share of the dataset, reshuffled every epoch, that can start mid-epoch.

    The epoch is counted by the sampler itself (each pass that trained on something is followed
    by the next epoch), not taken
    from ``set_epoch``: after a resume the trainer may number epochs differently from the
    straight run it continues, and the permutation must not depend on that. Being a
    ``DistributedSampler``, Lightning leaves it in place under DDP / FSDP instead of wrapping it.

    Args:
        dataset: the rows (only its length is used).
        batch_size: rows per batch (positions are counted in batches).
        shuffle: a new permutation per epoch (seeded by ``seed`` and the epoch) or the file order.
        seed: the permutation seed, equal on every rank.
        num_replicas: the number of ranks sharing the data.
        rank: this rank.
        epoch: the epoch of the first pass.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        epoch: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.epoch = epoch
        self.start_batch = 0  # where the current pass began (non-zero only for a resumed pass)
        self.batches_trained = 0  # batches of the current pass already trained on

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the sampler counts its own epochs (see the class docstring)."""

    def __iter__(self) -> Iterator[int]:
        # A pass that trained on nothing is started again, not skipped: resumed at the very end
        # of an epoch, the trainer makes an iterator, finds the epoch done and makes another.
        if self.batches_trained:
            self.epoch += 1
            self.start_batch = 0
        self.batches_trained = 0
        indices = list(super().__iter__())
        # The length (and so the trainer's batches per epoch) stays the full epoch's: a resumed
        # pass ends early, and the trainer takes the end of the iterator as the end of the epoch.
        return iter(indices[self.start_batch * self.batch_size :])

    def batches_per_epoch(self) -> int:
        return -(-super().__len__() // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch": self.start_batch + self.batches_trained,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next pass where ``state`` was taken (the next epoch if it was at its end)."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if state.get("num_replicas", self.num_replicas) != self.num_replicas or state.get("seed", self.seed) != self.seed:
            rank_zero_warn(
                f"the checkpoint's data order was made for {state.get('num_replicas')} rank(s) with seed "
                f"{state.get('seed')}, this run has {self.num_replicas} with seed {self.seed}: the resumed "
                f"run restarts epoch {epoch} from its first batch and does not repeat the straight run exactly"
            )
            batch = 0
        if batch >= self.batches_per_epoch():
            epoch, batch = epoch + 1, 0
        self.epoch, self.start_batch, self.batches_trained = epoch, batch, 0


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position Lightning saves in
    checkpoints and restores on resume (the ``state_dict`` / ``load_state_dict`` interface)."""

    sampler: ResumableSampler

    def __init__(self, dataset: Any, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, **kwargs)

    def batch_trained(self) -> None:
        """Count one batch of the current pass as trained on (called as it reaches the model:
        the trainer fetches ahead, so counting fetched batches would overshoot)."""
        self.sampler.batches_trained += 1

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def resumable_loader(
    dataset: Any, batch_size: int, trainer: Any, shuffle: bool = True, **kwargs: Any
) -> ResumableLoader:
    """A :class:`ResumableLoader` over this rank's shard of ``dataset`` (``trainer`` gives the
    ranks and the starting epoch; ``None`` for one process)."""
    world_size, rank, epoch = (1, 0, 0) if trainer is None else (trainer.world_size, trainer.global_rank, trainer.current_epoch)
    sampler = ResumableSampler(
        dataset, batch_size, shuffle=shuffle, seed=global_seed(), num_replicas=world_size, rank=rank, epoch=epoch
    )
    # A generator of its own: making an iterator each epoch draws a seed (for the workers), and
    # drawing it from the global stream would shift what the model samples after a resume.
    generator = torch.Generator().manual_seed(global_seed())
    return ResumableLoader(dataset, sampler, generator=generator, **kwargs)


def count_trained_batch(trainer: Any) -> None:
    """Advance the training loader's position by one batch (see :meth:`ResumableLoader.batch_trained`)."""
    loader = getattr(trainer, "train_dataloader", None)
    if isinstance(loader, ResumableLoader):
        loader.batch_trained()

