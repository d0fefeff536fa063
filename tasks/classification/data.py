"""ImageNet / ImageFolder data for classification, and the synthetic demo dataset."""

from __future__ import annotations

import multiprocessing
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from backbones.atomic import atomic_write_dir
from tasks.common.data import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BaseDataModule,
    ImageFiles,
    PredictImages,
    collate_predict_batch,
    evaluated_split,
    list_images,
)
from tasks.common.demo import draw_clutter, draw_shape, jittered_colour

__all__ = ["IMAGENET_CLASSES", "ImageFolderDataModule", "make_demo_dataset", "read_class_list"]

DEMO_CLASSES = ("circle", "cross", "square", "stripes", "triangle")
IMAGENET_CLASSES = Path(__file__).with_name("imagenet_classes.txt")  # ImageNet-1k: wnid<TAB>WordNet lemmas, in label order


def read_class_list(source: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The (folder names, readable names) of a class list, in label order: ``"imagenet"`` for
    ImageNet-1k's 1000 classes (the order of ImageNet classifiers: Apple's, timm's, torchvision's),
    or a text file with one class per line, ``<folder name>`` or ``<folder name><TAB><readable name>``
    (line i is label i; blank lines are skipped)."""
    path = IMAGENET_CLASSES if str(source) == "imagenet" else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"class list {source} does not exist: give 'imagenet' or a text file, one class folder name per line")
    folders, names = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        folder, _, name = line.partition("\t")
        folder = folder.strip()
        if folder in folders:
            raise ValueError(f"{path}, line {number}: class {folder!r} is listed twice "
                             f"(first on line {folders.index(folder) + 1} of the non-blank lines)")
        folders.append(folder)
        names.append(name.strip() or folder)
    if not folders:
        raise ValueError(f"class list {path} names no class: one class folder name per line")
    return folders, names


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


class LabelledImages(ImageFiles):
    """(path, label) samples, decoded and transformed on access; with ``skip_corrupt`` an unreadable
    image gives None (``ImageFiles``). ``source`` names the split directory in messages."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: nn.Module, skip_corrupt: bool = False, source: str = "") -> None:
        super().__init__(source, skip_corrupt)
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        image = self.read_or_skip(path)
        return None if image is None else (self.transform(image), label)


def _count_and_first(names: list[str], what: str, shown: int = 5) -> str:
    """``"2 class folders (a, b)"``, or with more than ``shown`` names ``"500 class folders (the first 5: a, ...)"``."""
    listed = ", ".join(names[:shown])
    plural = what if len(names) == 1 else (what + "es" if what.endswith("s") else what + "s")
    return f"{len(names)} {plural} ({listed})" if len(names) <= shown else f"{len(names)} {plural} (the first {shown}: {listed}, ...)"


class ImageFolderDataModule(BaseDataModule):
    """ImageNet or any ImageFolder: ``root/<train_split>/<class>/*`` and ``root/<val_split>/<class>/*``.

    The classes are the sorted directory names of the training split, or those of a class list
    (``classes``); ``num_classes`` and ``class_names`` are linked into the model by the CLI.

    Args:
        root: dataset root.
        train_split / val_split: split directory names under ``root``.
        test_split: the split ``test`` evaluates (a directory under ``root`` in the same layout);
            default: the validation split.
        batch_size: images per device and training step.
        val_batch_size: images per device and step of validation, test and predict (default: ``batch_size``).
        num_workers / pin_memory / persistent_workers: DataLoader settings.
        image_size: training crop size (``ProgressiveResolution`` changes it during fit).
        eval_resize / eval_image_size: validation resize of the short side, then centre crop.
        augmentation: ``"crop_flip"`` (random-resized-crop + flip, S0/S1) or ``"autoaugment"``
            (the same plus AutoAugment's ImageNet policy, S2-S4).
        crop_scale: area range of the random-resized crop.
        mean / std: normalization.
        classes: the classes in label order, instead of the training split's folders: ``"imagenet"``
            (ImageNet-1k's 1000 wnids in the order of ImageNet classifiers, named by their WordNet
            lemmas in ``class_names``: what ``predict`` writes) or a text file, one class per line,
            ``<folder name>`` or ``<folder name><TAB><readable name>`` (``read_class_list``). Then
            ``validate``, ``test``, ``predict`` and ``export`` need no training split, and a split may
            hold a subset of the class folders (the others are not evaluated).
        skip_corrupt: skip unreadable images instead of raising, also in ``predict`` (no prediction for
            them): one warning per epoch and split gives the exact total over all worker processes
            and the first names. A class folder without images is an error in the training split and
            a warning in the validation split, with or without it.
        predict_dir: images to classify with ``predict``.
        demo: generate the synthetic demo dataset into ``root`` on first use (``prepare_data``).
        demo_images_per_class: training images per class of the demo set (a quarter as many for val).
        unlabelled_train: read every image under the training split (at any depth) without a label
            (``-1``), for training that needs none (``tasks.classification.qat``'s distillation):
            the classes then come from ``classes`` and the training split may hold any folders.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
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
        classes: str | None = None,
        skip_corrupt: bool = False,
        predict_dir: str | None = None,
        demo: bool = False,
        demo_images_per_class: int = 160,
        unlabelled_train: bool = False,
    ) -> None:
        super().__init__(batch_size, val_batch_size or batch_size, num_workers, pin_memory, persistent_workers, skip_corrupt)
        self.save_hyperparameters()
        self.root = Path(root)
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self._image_size = SharedImageSize(image_size)
        if demo:
            self.class_folders = list(DEMO_CLASSES)
            self.class_names = list(DEMO_CLASSES)
        elif classes is not None:
            self.class_folders, self.class_names = read_class_list(classes)
        elif unlabelled_train:
            raise ValueError("unlabelled_train: the training images name no class, so the classes need a list: "
                             "--data.classes imagenet (ImageNet-1k) or a text file")
        else:
            train_dir = self.root / train_split
            if not train_dir.is_dir():
                raise FileNotFoundError(
                    f"{train_dir} does not exist, and without a training split the classes need a list: "
                    f"--data.classes imagenet (ImageNet-1k, for ImageNet weights) or a text file; {layout_help(root, train_split, val_split)}"
                )
            self.class_folders = list_classes(train_dir)
            self.class_names = list(self.class_folders)
            if not self.class_folders:
                raise FileNotFoundError(f"{train_dir} holds no class directories; {layout_help(root, train_split, val_split)}")
        self.mean, self.std = list(mean), list(std)
        self.normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

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
        """The (image, label) files of ``split``. A class folder without images is an error in the
        training split (as torchvision's ``ImageFolder`` raises: the class could not be learnt), a
        warning naming it in the other splits (the class is then not evaluated)."""
        split_dir = self.root / split
        layout = layout_help(self.root, self.train_split, self.val_split)
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir} does not exist; {layout}")
        if split == self.train_split and self.hparams.unlabelled_train:
            paths = list_images(split_dir)
            if not paths:
                raise FileNotFoundError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) at any depth (unlabelled_train)")
            return [(path, -1) for path in paths]
        found = list_classes(split_dir)
        if self.hparams.classes is None and found != self.class_folders:
            missing = sorted(set(self.class_folders) - set(found))
            extra = sorted(set(found) - set(self.class_folders))
            raise ValueError(
                f"the classes of {split_dir} differ from the training classes: missing {missing}, unexpected {extra}; {layout}"
            )
        unknown = sorted(set(found) - set(self.class_folders))
        if unknown:
            raise ValueError(f"{split_dir}: {_count_and_first(unknown, 'class folder')} not in the class list {self.hparams.classes}")
        present = set(found)
        per_class = [list_images(split_dir / name) if name in present else [] for name in self.class_folders]
        samples = [(path, label) for label, paths in enumerate(per_class) for path in paths]
        if not samples:
            raise FileNotFoundError(f"{split_dir} holds no images; {layout}")
        empty = [name for name, paths in zip(self.class_folders, per_class) if not paths]
        if empty and split == self.train_split:
            raise FileNotFoundError(
                f"{split_dir}: {_count_and_first(empty, 'class')} without image files "
                f"({', '.join(IMAGE_EXTENSIONS)}); every training class needs images: add some or remove the class "
                f"(from every split, or from the class list); {layout}"
            )
        if empty:
            warnings.warn(
                f"{split_dir}: {_count_and_first(empty, 'class')} without image files "
                f"({', '.join(IMAGE_EXTENSIONS)}): those classes are not evaluated", stacklevel=2
            )
        return samples

    def setup(self, stage: str) -> None:
        skip = self.skip_corrupt
        train, val = self.train_split, self.val_split
        if stage == "fit":
            self.train_dataset = LabelledImages(self._samples(train), self.train_transform(), skip, str(self.root / train))
        if stage in ("fit", "validate"):
            self.val_dataset = LabelledImages(self._samples(val), self.eval_transform(), skip, str(self.root / val))
        if stage == "test":
            test = evaluated_split(self.test_split, val)
            self.test_dataset = LabelledImages(self._samples(test), self.eval_transform(), skip, str(self.root / test))
        if stage == "predict":
            if self.hparams.predict_dir is None:
                raise ValueError("predict needs --data.predict_dir: a directory of images to classify")
            self.predict_dataset = PredictImages(self.hparams.predict_dir, self.eval_transform(), skip)

    def collate_fn(self, dataset: Dataset) -> Callable | None:
        return collate_predict_batch if isinstance(dataset, PredictImages) else None


def _draw_demo_image(shape: str, size: int, rng: random.Random, hue: float) -> Image.Image:
    """One demo image: a ``shape`` in a colour near ``hue`` (0..1) on a grey background with clutter."""
    grey = rng.randint(30, 220)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    draw_clutter(draw, rng, size, (5, 15), size // 24 + 1)
    colour = jittered_colour(rng, hue, 0.6)
    extent = rng.uniform(0.35, 0.7) * size
    cx, cy = rng.uniform(extent / 2, size - extent / 2), rng.uniform(extent / 2, size - extent / 2)
    draw_shape(draw, shape, (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2), colour, line_width=max(2, int(extent / 6)))
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

    return atomic_write_dir(Path(root), write)  # an interrupted generation leaves nothing at root
