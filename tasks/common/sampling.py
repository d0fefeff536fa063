"""Samplers that make training resumable bit for bit and evaluation exact across processes.

Training order and augmentation randomness are pure functions of (seed, epoch, sample index):

- ``SeededShuffleSampler`` draws each epoch's order from ``seed + epoch`` (as torch's
  ``DistributedSampler`` does, split over the processes of a distributed run) and yields
  ``(sample_seed, index)`` pairs;
- ``SeededDataset`` seeds Python's, NumPy's and torch's random generators with ``sample_seed``
  before it reads sample ``index``, so a sample's augmentation does not depend on which worker
  process reads it, nor on what that worker read before.

The sampler asks the ``Trainer`` where training stands (epoch, batches already trained in it) when
an epoch's iteration starts, so a run resumed from any checkpoint - saved at an epoch's end or
mid-epoch, e.g. by ``ModelCheckpoint(every_n_train_steps=...)`` - continues with the batch the
interrupted run would have trained next, with the same augmentations. Together with the RNG
state that ``TaskCheckpoint`` stores in the checkpoint, that makes the resumed run's weights equal
the uninterrupted run's. Loaders draw their worker seeds from a private generator, so creating a
loader does not advance the global random stream either.

Evaluation loaders of a distributed run use Lightning's ``UnrepeatedDistributedSampler``: no
process gets padding duplicates, so metrics summed over processes count each sample once.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import Dataset, DistributedSampler, Sampler, get_worker_info

__all__ = [
    "SeededDataset",
    "SeededShuffleSampler",
    "evaluation_sampler",
    "global_seed",
    "sample_seed",
    "training_position",
    "world_size_and_rank",
]


def global_seed() -> int:
    """The run's seed: ``seed_everything``'s (Lightning exports it as ``PL_GLOBAL_SEED``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch`` (a 63-bit hash of the three)."""
    (state,) = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)
    return int(state >> np.uint64(1))


def world_size_and_rank() -> tuple[int, int]:
    """The number of processes of the run and this one's rank (1, 0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_on_rank_zero(items: list) -> list | None:
    """Every process's ``items`` concatenated in rank order on rank 0, ``None`` on the other ranks
    (a collective: every process must call it); ``items`` itself without distribution."""
    world_size, rank = world_size_and_rank()
    if world_size == 1:
        return items
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part] if rank == 0 else None


def training_position(trainer: pl.Trainer | None) -> tuple[int, int] | None:
    """``(epoch, batches already trained in it)`` of a fitting trainer, else ``None``.

    Read when an epoch's iteration starts: at a fresh epoch's start this is ``(epoch, 0)``, and right
    after a checkpoint was restored it is the position the checkpoint was saved at.
    """
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return None
    return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed


class SeededShuffleSampler(DistributedSampler):
    """Shuffled training order from ``seed + epoch``, yielding ``(sample_seed, index)`` pairs.

    A ``DistributedSampler`` (one shard per process, padded to equal length), so Lightning keeps
    it as is in distributed runs. ``position`` - a callable returning ``(epoch, batches done)`` or
    ``None`` - is asked when an iteration starts; batches already done are skipped and a finished
    epoch moves on to the next one. Without it (or when it returns ``None``) the epoch is the one
    given to ``set_epoch`` and iteration starts at the first batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int | None = None,
        position: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:
        world, rank = world_size_and_rank()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True,
                         seed=global_seed() if seed is None else seed, drop_last=False)
        self.batch_size = batch_size
        self.position = position

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip = 0
        where = self.position() if self.position is not None else None
        if where is not None:
            epoch, batches = where
            if batches >= self.num_samples // self.batch_size:  # that epoch is complete: the next one
                epoch, batches = epoch + 1, 0
            self.epoch, skip = epoch, batches * self.batch_size
        indices = list(super().__iter__())[skip:]
        seed, epoch = self.seed, self.epoch  # seeds drawn as the loader asks, not all up front (~10 us each)
        return ((sample_seed(seed, epoch, index), index) for index in indices)


class SeededDataset(Dataset):
    """Reads ``dataset[index]`` for an ``(sample_seed, index)`` key with Python's, NumPy's and
    torch's global generators seeded by ``sample_seed`` (in a loader worker; read in the training
    process, their states are put back afterwards)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        seed, index = key
        if get_worker_info() is not None:  # a loader worker: its streams serve the data alone
            _seed_all(seed)
            return self.dataset[index]
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:  # read in the training process (no workers): leave its streams as they were
            _seed_all(seed)
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: augmentations run on the CPU


def evaluation_sampler(dataset: Dataset) -> Sampler | None:
    """In a distributed run, a sampler giving every sample to exactly one process, in order;
    ``None`` (the DataLoader's sequential default) otherwise."""
    world, rank = world_size_and_rank()
    if world == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
