"""Behaviour the tasks' LightningModules share."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tasks.common.sampling import world_size_and_rank

log = logging.getLogger(__name__)


class ChannelsLastMixin:
    """``channels_last`` hyperparameter support for a LightningModule, applied on CUDA devices only.

    On CPU (torch 2.14.1, oneDNN) the backward of a channels-last 1x1 stride-2 convolution with few
    input channels - MobileOne's stem scale branch - corrupts the heap ("corrupted size vs.
    prev_size"), and CPUs gain nothing from the format; it is skipped there with a log line.
    """

    @property
    def uses_channels_last(self) -> bool:
        return bool(self.hparams.channels_last) and self.device.type == "cuda"

    def on_fit_start(self) -> None:
        if self.uses_channels_last:
            self.to(memory_format=torch.channels_last)
        elif self.hparams.channels_last:
            log.warning("channels_last is applied on CUDA devices only; training in contiguous format on %s", self.device)


def _random_states() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) random states, as tensors and plain
    Python values only (so that ``torch.load(weights_only=True)`` reads them back)."""
    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    return {
        "python": [version, list(python_state), gauss],
        "numpy": [torch.from_numpy(numpy_keys.astype(np.int64)), numpy_position, numpy_has_gauss, numpy_gauss],
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_random_states(states: dict[str, Any]) -> None:
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = states["numpy"]
    np.random.set_state(("MT19937", numpy_keys.numpy().astype(np.uint32), numpy_position, numpy_has_gauss, numpy_gauss))
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


def task_name(module_class: type) -> str:
    """The name a task's checkpoints record, e.g. ``tasks.classification.module.ImageClassificationTask``."""
    return f"{module_class.__module__}.{module_class.__qualname__}"


class CheckpointStateMixin:
    """What the tasks add to their checkpoints: the task's class name under ``"task"`` (so that a
    checkpoint given to another task is named as such) and the global random streams of every
    process, restored when training resumes.

    Data order and augmentations do not depend on these streams (``tasks.common.sampling``); what
    does is randomness inside the model (dropout, ...), which then continues as in an
    uninterrupted run. The states are gathered from all processes of a distributed run (the hook
    runs on every rank) and each process gets its own back; they are applied at ``on_train_start``,
    after everything that runs between restoring a checkpoint and training.
    """

    _random_states_to_restore: dict[str, Any] | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["task"] = task_name(type(self))
        states = _random_states()
        world, _ = world_size_and_rank()
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, states)
            checkpoint["random_states"] = gathered
        else:
            checkpoint["random_states"] = [states]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        gathered = checkpoint.get("random_states") or []
        _, rank = world_size_and_rank()
        self._random_states_to_restore = gathered[rank] if rank < len(gathered) else None

    def on_train_start(self) -> None:
        if self._random_states_to_restore is not None:
            _set_random_states(self._random_states_to_restore)
            self._random_states_to_restore = None


@contextlib.contextmanager
def replaced_submodule(module: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    """Inside the context ``module.<name>`` is ``replacement``; the original comes back afterwards."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)
