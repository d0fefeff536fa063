"""Batches of real images from a task's data module, as export checks and calibration take them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch


def count_images(batches: Iterable[torch.Tensor]) -> int:
    """Images in an iterable of batches."""
    return sum(len(batch) for batch in batches)


def split_loader(datamodule: pl.LightningDataModule | None, split: str) -> Iterable[Any]:
    """The data config's validation loader (``split="validate"``) or training loader (``"fit"``),
    after its ``setup``; export checks and calibrates on real images, so it needs one."""
    if datamodule is None:
        raise ValueError("export checks the fused model on real images: it needs the data config")
    datamodule.setup(split)
    return datamodule.val_dataloader() if split == "validate" else datamodule.train_dataloader()


def first_images(batches: Iterable[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The first ``count`` images of ``batches`` (fewer if they run out), as the batches they came in."""
    taken: list[torch.Tensor] = []
    for batch in batches:
        if count - count_images(taken) <= 0:
            break
        taken.append(batch[: count - count_images(taken)])
    return taken


def same_size_images(batches: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """The first ``count`` images of ``batches`` that have the first one's size, as one batch."""
    taken: list[torch.Tensor] = []
    for batch in batches:
        if taken and batch.shape[1:] != taken[0].shape[1:]:
            continue
        taken.append(batch)
        if count_images(taken) >= count:
            break
    if not taken:
        raise ValueError("no images to check the export on: the validation split is empty")
    return torch.cat(taken)[:count]
