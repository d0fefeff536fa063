"""ImageNet / ImageFolder data for classification, and the synthetic demo dataset."""

from __future__ import annotations

import colorsys
import multiprocessing
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate
from torchvision.transforms import v2

from tasks.common.data import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    list_images,
    make_loader,
    read_image,
    write_dataset_atomically,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptImageError",
    "ImageFolderDataModule",
    "make_demo_dataset",
    "read_image",
]

DEMO_CLASSES = ("circle", "cross", "square", "stripes", "triangle")


def layout_help(root: str | os.PathLike, train_split: str, val_split: str) -> str:
    return (
        f"expected an ImageFolder / ImageNet layout under {root}:\n"
        f"  {root}/{train_split}/<class name>/<image>.jpg\n"
        f"  {root}/{val_split}/<class name>/<image>.jpg\n"
        f"(one directory per class, the same class directories in both splits; image extensions {', '.join(IMAGE_EXTENSIONS)})"
    )


def list_classes(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


class SharedImageSize:
    """An int in shared memory: the training image size, readable by (persistent) worker processes."""

    def __init__(self, size: int) -> None:
        self._value = multiprocessing.RawValue("i", size)

    @property
    def value(self) -> int:
        return self._value.value

    @value.setter
    def value(self, size: int) -> None:
        self._value.value = size


class RandomResizedCropToSharedSize(nn.Module):
    """``v2.RandomResizedCrop`` whose output size is read from a ``SharedImageSize`` at every call."""

    def __init__(self, size: SharedImageSize, scale: Sequence[float] = (0.08, 1.0)) -> None:
        super().__init__()
        self.size = size
        self.scale = tuple(scale)
        self._crops: dict[int, v2.RandomResizedCrop] = {}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = self.size.value
        if size not in self._crops:
            self._crops[size] = v2.RandomResizedCrop(size, scale=self.scale, antialias=True)
        return self._crops[size](image)


class LabelledImages(Dataset):
    """(path, label) samples, decoded and transformed on access."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: nn.Module, skip_corrupt: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        try:
            image = read_image(path)
        except CorruptImageError as error:
            if not self.skip_corrupt:
                raise
            self.skipped += 1
            warnings.warn(f"skipped {self.skipped} unreadable image(s) in this process so far; latest: {error}")
            return None
        return self.transform(image), label


class UnlabelledImages(Dataset):
    """All images under a directory, for ``predict``: yields (image, path)."""

    def __init__(self, directory: Path, transform: nn.Module) -> None:
        self.paths = list_images(directory)
        if not self.paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under predict_dir {directory}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.transform(read_image(self.paths[index])), str(self.paths[index])


def collate_skipping_missing(batch: list) -> object:
    """``default_collate`` without the samples a dataset skipped (returned as None)."""
    batch = [sample for sample in batch if sample is not None]
    return default_collate(batch) if batch else None


class ImageFolderDataModule(pl.LightningDataModule):
    """ImageNet or any ImageFolder: ``root/<train_split>/<class>/*`` and ``root/<val_split>/<class>/*``.

    Class names are the sorted directory names of the training split; ``num_classes`` and
    ``class_names`` are linked into the model by the CLI.

    Args:
        root: dataset root.
        train_split / val_split: split directory names under ``root``.
        batch_size: images per device and step.
        num_workers / pin_memory / persistent_workers: DataLoader settings.
        image_size: training crop size (``ProgressiveResolution`` changes it during fit).
        eval_resize / eval_image_size: validation resize of the short side, then centre crop.
        augmentation: ``"crop_flip"`` (random-resized-crop + flip, S0/S1) or ``"autoaugment"``
            (the same plus AutoAugment's ImageNet policy, S2-S4).
        crop_scale: area range of the random-resized crop.
        mean / std: normalization.
        skip_corrupt: skip unreadable images (counted in a warning) instead of raising.
        predict_dir: images to classify with ``predict``.
        demo: generate the synthetic demo dataset into ``root`` on first use (``prepare_data``).
        demo_images_per_class: training images per class of the demo set (a quarter as many for val).
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str = "val",
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        image_size: int = 224,
        eval_resize: int = 256,
        eval_image_size: int = 224,
        augmentation: Literal["crop_flip", "autoaugment"] = "crop_flip",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        skip_corrupt: bool = False,
        predict_dir: str | None = None,
        demo: bool = False,
        demo_images_per_class: int = 160,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.train_split, self.val_split = train_split, val_split
        self.batch_size = batch_size
        self._image_size = SharedImageSize(image_size)
        # set by ProgressiveResolution: the training size of an epoch, applied when a loader is built
        self.train_image_size_for_epoch: Callable[[int], int] | None = None
        if demo:
            self.class_names = list(DEMO_CLASSES)
        else:
            train_dir = self.root / train_split
            if not train_dir.is_dir():
                raise FileNotFoundError(f"{train_dir} does not exist; {layout_help(root, train_split, val_split)}")
            self.class_names = list_classes(train_dir)
            if not self.class_names:
                raise FileNotFoundError(f"{train_dir} holds no class directories; {layout_help(root, train_split, val_split)}")
        self.normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_image_size(self) -> int:
        return self._image_size.value

    @train_image_size.setter
    def train_image_size(self, size: int) -> None:
        self._image_size.value = size

    def train_transform(self) -> nn.Module:
        steps: list[nn.Module] = [RandomResizedCropToSharedSize(self._image_size, self.hparams.crop_scale), v2.RandomHorizontalFlip()]
        if self.hparams.augmentation == "autoaugment":
            steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
        return v2.Compose(steps + self.normalize)

    def eval_transform(self) -> nn.Module:
        return v2.Compose(
            [v2.Resize(self.hparams.eval_resize, antialias=True), v2.CenterCrop(self.hparams.eval_image_size)] + self.normalize
        )

    def prepare_data(self) -> None:
        if self.hparams.demo and not (self.root / self.train_split).is_dir():
            make_demo_dataset(
                self.root, self.hparams.demo_images_per_class, max(8, self.hparams.demo_images_per_class // 4),
                size=max(self.hparams.eval_resize, self.train_image_size), splits=(self.train_split, self.val_split),
            )

    def _samples(self, split: str) -> list[tuple[Path, int]]:
        split_dir = self.root / split
        layout = layout_help(self.root, self.train_split, self.val_split)
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir} does not exist; {layout}")
        found = list_classes(split_dir)
        if found != self.class_names:
            missing = sorted(set(self.class_names) - set(found))
            extra = sorted(set(found) - set(self.class_names))
            raise ValueError(
                f"the classes of {split_dir} differ from the training classes: missing {missing}, unexpected {extra}; {layout}"
            )
        samples = [(path, label) for label, name in enumerate(self.class_names) for path in list_images(split_dir / name)]
        if not samples:
            raise FileNotFoundError(f"{split_dir} holds no images; {layout}")
        return samples

    def setup(self, stage: str) -> None:
        skip = self.hparams.skip_corrupt
        if stage == "fit":
            self.train_dataset = LabelledImages(self._samples(self.train_split), self.train_transform(), skip)
        if stage in ("fit", "validate"):
            self.val_dataset = LabelledImages(self._samples(self.val_split), self.eval_transform(), skip)
        if stage == "test":
            self.test_dataset = LabelledImages(self._samples(self.val_split), self.eval_transform(), skip)
        if stage == "predict":
            if self.hparams.predict_dir is None:
                raise ValueError("predict needs --data.predict_dir: a directory of images to classify")
            self.predict_dataset = UnlabelledImages(Path(self.hparams.predict_dir), self.eval_transform())

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        collate = collate_skipping_missing if hp.skip_corrupt else None
        return make_loader(dataset, self.batch_size, shuffle, hp.num_workers, hp.pin_memory, hp.persistent_workers, collate)

    def train_dataloader(self) -> DataLoader:
        if self.train_image_size_for_epoch is not None and self.trainer is not None:
            self.train_image_size = self.train_image_size_for_epoch(self.trainer.current_epoch)
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, shuffle=False)


def _draw_demo_image(shape: str, size: int, rng: random.Random, hue: float) -> Image.Image:
    """One demo image: a ``shape`` in a colour near ``hue`` (0..1) on a grey background with clutter."""
    grey = rng.randint(30, 220)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(5, 15)):  # clutter: small random dots
        x, y, r = rng.randint(0, size), rng.randint(0, size), rng.randint(1, size // 24 + 1)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    red, green, blue = colorsys.hsv_to_rgb((hue + rng.uniform(-0.04, 0.04)) % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    colour = (int(red * 255), int(green * 255), int(blue * 255))
    extent = rng.uniform(0.35, 0.7) * size
    cx, cy = rng.uniform(extent / 2, size - extent / 2), rng.uniform(extent / 2, size - extent / 2)
    left, top, right, bottom = cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2
    width = max(2, int(extent / 6))
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=colour)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=colour)
    elif shape == "cross":
        draw.line((left, top, right, bottom), fill=colour, width=width)
        draw.line((left, bottom, right, top), fill=colour, width=width)
    elif shape == "stripes":
        for offset in range(0, int(extent), 2 * width):
            draw.rectangle((left, top + offset, right, top + offset + width - 1), fill=colour)
    else:
        raise ValueError(f"unknown demo shape {shape!r}")
    return image


def make_demo_dataset(
    root: str | os.PathLike,
    train_per_class: int = 160,
    val_per_class: int = 40,
    size: int = 72,
    classes: Sequence[str] = DEMO_CLASSES,
    splits: tuple[str, str] = ("train", "val"),
    seed: int = 0,
) -> Path:
    """Write a synthetic ImageFolder dataset to ``root``: one class per drawn shape, each class also
    with its own colour (hue), at random positions and sizes on grey backgrounds with clutter; JPEG files.

    The set is written to a temporary sibling directory and renamed into place, so an interrupted
    run never leaves a half-written dataset behind.
    """
    rng = random.Random(seed)

    def write(scratch: Path) -> None:
        for split, count in zip(splits, (train_per_class, val_per_class)):
            for class_index, name in enumerate(classes):
                (scratch / split / name).mkdir(parents=True)
                hue = class_index / len(classes)
                for index in range(count):
                    _draw_demo_image(name, size, rng, hue).save(scratch / split / name / f"{index:05d}.jpg", quality=90)

    return write_dataset_atomically(root, write)
