"""Image reading and dataset-writing helpers shared by the tasks' data modules."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "list_images",
    "make_loader",
    "read_image",
    "write_dataset_atomically",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded."""


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor (C, H, W); raise ``CorruptImageError`` naming the file."""
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception as torchvision_error:  # formats or variants torchvision's decoders miss: try PIL
        try:
            with Image.open(path) as image:
                return v2.functional.pil_to_tensor(image.convert("RGB"))
        except Exception:
            raise CorruptImageError(f"cannot decode image file {path}: {torchvision_error}") from torchvision_error


def list_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursively, following links), sorted."""
    return sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(directory, followlinks=True)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )


def write_dataset_atomically(root: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(scratch_dir)`` and rename the scratch directory to ``root``.

    An interrupted generation never leaves a half-written dataset at ``root``. ``root`` may exist
    only as an empty directory.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(scratch)
        if root.exists() and not any(root.iterdir()):
            root.rmdir()
        os.rename(scratch, root)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return root


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """The tasks' DataLoader: training loaders shuffle and drop the last partial batch; pinned
    memory only with CUDA; persistent workers only when there are workers."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
    )
