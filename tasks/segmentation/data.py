"""Semantic segmentation data: Pascal VOC 2012 (+SBD), ADE20K, any image/mask folder, and the demo set."""

from __future__ import annotations

import json
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from backbones.atomic import atomic_write_dir
from tasks.common.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BaseDataModule,
    CorruptImageError,
    ImageFiles,
    PredictImages,
    evaluated_split,
    list_images,
)
from tasks.common.demo import draw_shape, jittered_colour

__all__ = [
    "CorruptImageError",
    "VOC_CLASSES",
    "Ade20kPairs",
    "FolderPairs",
    "InvalidMaskError",
    "PairLayout",
    "SegmentationDataModule",
    "VocPairs",
    "make_demo_voc",
    "read_mask",
    "voc_palette",
]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
DEMO_CLASSES = ("background", "circle", "square", "triangle")


class InvalidMaskError(ValueError):
    """A label mask that does not fit its image or holds labels outside the classes."""


def voc_palette() -> list[int]:
    """Pascal VOC's 256-colour palette (flat RGB list), as used by its ``SegmentationClass`` PNGs."""
    palette = []
    for label in range(256):
        r = g = b = 0
        value = label
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [r, g, b]
    return palette


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A label mask as an (H, W) integer array: palette PNGs give their indices, grayscale PNGs their values.

    A file that cannot be decoded (truncated, not an image) raises ``CorruptImageError`` naming it;
    another mode (e.g. RGB) raises ``InvalidMaskError``."""
    try:
        with Image.open(path) as mask:
            mode = mask.mode
            labels = np.array(mask, dtype=np.int64) if mode in ("P", "L", "I", "I;16") else None
    except UnidentifiedImageError:
        raise CorruptImageError(f"cannot decode mask file {path}: not an image; expected a palette or grayscale PNG") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or damaged data
        raise CorruptImageError(f"cannot decode mask file {path}: {error}; expected a complete palette or grayscale PNG") from error
    if labels is None:
        raise InvalidMaskError(f"mask {path} has PIL mode {mode!r}; expected a palette ('P') or grayscale ('L') PNG holding class indices")
    return labels


class SegmentationPairs(ImageFiles):
    """(image, mask) files -> transformed (image tensor, int64 mask) pairs, with validated labels;
    with ``skip_corrupt`` an unreadable image gives None (``ImageFiles``); a mask that cannot be
    read or does not fit its image is always an error naming it (it is the annotation)."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        transform: v2.Transform,
        num_classes: int,
        ignore_index: int,
        label_offset: int = 0,
        skip_corrupt: bool = False,
        source: str = "",
    ) -> None:
        super().__init__(source, skip_corrupt)
        self.pairs = list(pairs)
        self.transform = transform
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_offset = label_offset

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        image_path, mask_path = self.pairs[index]
        image = self.read_or_skip(image_path)
        if image is None:
            return None
        labels = read_mask(mask_path)
        if labels.shape != tuple(image.shape[-2:]):
            raise InvalidMaskError(
                f"mask {mask_path} is {labels.shape[1]}x{labels.shape[0]} (WxH) but its image {image_path} is "
                f"{image.shape[2]}x{image.shape[1]}"
            )
        if self.label_offset:  # ADE20K: 0 = "other" -> ignore, 1..150 -> 0..149
            labels = np.where(labels == 0, self.ignore_index, labels - self.label_offset)
        bad = np.setdiff1d(np.unique(labels), np.r_[np.arange(self.num_classes), self.ignore_index])
        if bad.size:
            raise InvalidMaskError(
                f"mask {mask_path} holds labels {bad.tolist()[:20]} outside [0, {self.num_classes}) and the ignore "
                f"index {self.ignore_index}"
            )
        return image, torch.from_numpy(labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        loaded = self.load(index)
        if loaded is None:
            return None
        image, mask = self.transform(tv_tensors.Image(loaded[0]), tv_tensors.Mask(loaded[1]))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (masks: nearest neighbour, as v2 does for Masks)."""

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale_range = tuple(scale_range)

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        factor = random.uniform(*self.scale_range)
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt, params: dict):
        return v2.functional.resize(inpt, params["size"], antialias=True)


def pad_collate(ignore_index: int):
    """Collate images of different sizes: pad to the largest (images with 0, masks with ``ignore_index``)."""

    def collate(batch: list) -> tuple:
        height = max(sample[0].shape[-2] for sample in batch)
        width = max(sample[0].shape[-1] for sample in batch)
        images, rest = [], []
        for image, other in batch:
            pad = [0, width - image.shape[-1], 0, height - image.shape[-2]]
            images.append(F.pad(image, pad))
            rest.append(F.pad(other, pad, value=ignore_index) if isinstance(other, torch.Tensor) else other)
        second = torch.stack(rest) if isinstance(rest[0], torch.Tensor) else rest
        return torch.stack(images), second

    return collate


class PairLayout(ABC):
    """Where a dataset's (image, mask) pairs are, what its labels name, and the layout expected
    (for messages). ``label_offset``: subtracted from the stored labels (ADE20K's 1..150 -> 0..149)."""

    class_names: list[str]
    label_offset = 0
    layout: str

    @abstractmethod
    def pairs(self, split: str) -> list[tuple[Path, Path]]:
        """The (image, mask) files of ``split``: "train", "val", or the name of another split in the layout."""

    def prepare(self, crop_size: int) -> None:  # noqa: B027 (most layouts generate nothing)
        """Write what the layout generates (the demo set), once."""


def _read_split_file(path: Path, layout: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {layout}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _check_pairs(pairs: list[tuple[Path, Path]], layout: str) -> list[tuple[Path, Path]]:
    for image, mask in pairs:
        for path in (image, mask):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed but missing; {layout}")
    return pairs


class VocPairs(PairLayout):
    """Pascal VOC 2012 under ``root`` (the ``VOCdevkit`` directory): 21 classes, 255 ignored.

    With ``sbd_augmented`` (the usual "VOC-aug" setting) training reads
    ``ImageSets/Segmentation/train_aug.txt`` and ``SegmentationClassAug/*.png`` (grayscale);
    otherwise ``train.txt`` and ``SegmentationClass/*.png`` (palette). Validation is always
    ``val.txt`` with ``SegmentationClass``. ``demo`` generates a small synthetic set in this layout
    into ``root`` on first use (4 classes).
    """

    def __init__(self, root: Path, sbd_augmented: bool = False, demo: bool = False, demo_images: int = 160) -> None:
        self.root, self.sbd_augmented, self.demo, self.demo_images = root, sbd_augmented, demo, demo_images
        self.class_names = list(DEMO_CLASSES if demo else VOC_CLASSES)
        self.voc = root / "VOC2012"
        self.layout = (
            f"expected Pascal VOC under {root}: VOC2012/JPEGImages/<id>.jpg, VOC2012/SegmentationClass/<id>.png, "
            "VOC2012/ImageSets/Segmentation/{train,val}.txt (and for sbd_augmented: VOC2012/SegmentationClassAug/<id>.png, "
            "VOC2012/ImageSets/Segmentation/train_aug.txt)"
        )
        if not demo and not self.voc.is_dir():
            raise FileNotFoundError(f"{self.voc} does not exist; {self.layout}")

    def prepare(self, crop_size: int) -> None:
        if self.demo and not self.voc.is_dir():
            make_demo_voc(self.root, self.demo_images, max(8, self.demo_images // 4), size=max(96, crop_size))

    def pairs(self, split: str) -> list[tuple[Path, Path]]:
        augmented = split == "train" and self.sbd_augmented
        ids = _read_split_file(self.voc / "ImageSets" / "Segmentation" / ("train_aug.txt" if augmented else f"{split}.txt"), self.layout)
        masks = self.voc / ("SegmentationClassAug" if augmented else "SegmentationClass")
        return _check_pairs([(self.voc / "JPEGImages" / f"{i}.jpg", masks / f"{i}.png") for i in ids], self.layout)


class Ade20kPairs(PairLayout):
    """ADE20K scene parsing (``ADEChallengeData2016``): 150 classes; label 0 ("other") is ignored and
    labels 1..150 become 0..149."""

    label_offset = 1

    def __init__(self, root: Path, class_names: list[str] | None = None) -> None:
        self.root = root
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(1, 151)]
        self.layout = f"expected ADE20K under {root}: images/{{training,validation}}/<name>.jpg and annotations/{{training,validation}}/<name>.png"
        if not (root / "images").is_dir():
            raise FileNotFoundError(f"{root / 'images'} does not exist; {self.layout}")

    def pairs(self, split: str) -> list[tuple[Path, Path]]:
        folder = {"train": "training", "val": "validation"}.get(split, split)
        images = list_images(self.root / "images" / folder)
        return _check_pairs([(p, self.root / "annotations" / folder / f"{p.stem}.png") for p in images], self.layout)


class FolderPairs(PairLayout):
    """Images and masks folders with matching file stems (palette or grayscale PNG masks).

    Either ``root`` holding ``train/images``, ``train/masks``, ``val/images``, ``val/masks`` (and
    optionally ``classes.json``, a list of class names in label order), or (taking precedence over
    ``root``) the folders one by one: ``images`` / ``masks``, and for validation ``val_images`` /
    ``val_masks``, else a deterministic ``val_fraction`` of the training pairs. Class names:
    ``class_names``, else ``num_classes`` numbered ones, else ``root/classes.json``'s.
    """

    def __init__(
        self,
        root: Path | None,
        images: str | None = None,
        masks: str | None = None,
        val_images: str | None = None,
        val_masks: str | None = None,
        val_fraction: float = 0.1,
        class_names: list[str] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if root is not None and images is None and masks is None:  # folders given one by one take precedence
            images, masks = str(root / "train" / "images"), str(root / "train" / "masks")
            val_images, val_masks = val_images or str(root / "val" / "images"), val_masks or str(root / "val" / "masks")
            classes_file = root / "classes.json"
            if class_names is None and num_classes is None and classes_file.is_file():
                class_names = json.loads(classes_file.read_text())
                if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
                    raise ValueError(f"{classes_file} must hold a JSON list of class names in label order")
        if images is None or masks is None:
            raise ValueError("format folder needs root, or images and masks")
        if class_names is None and num_classes is None:
            raise ValueError("format folder needs class_names (or num_classes, or root/classes.json)")
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.images, self.masks = Path(images), Path(masks)
        self.val_images = Path(val_images) if val_images else None
        self.val_masks = Path(val_masks) if val_masks else None
        self.val_fraction = val_fraction
        self.root = root
        self.layout = "expected images/<stem>.jpg and masks/<stem>.png"
        for directory in (self.images, self.masks):
            if not directory.is_dir():
                raise FileNotFoundError(f"{directory} does not exist; {self.layout}")

    @staticmethod
    def _match(images: Path, masks: Path) -> list[tuple[Path, Path]]:
        by_stem = {p.stem: p for p in masks.iterdir() if p.suffix.lower() == ".png"}
        pairs = [(p, by_stem.get(p.stem)) for p in list_images(images)]
        unmatched = [str(p) for p, m in pairs if m is None]
        if unmatched:
            raise FileNotFoundError(f"{len(unmatched)} images have no mask <stem>.png in {masks}, e.g. {unmatched[:3]}")
        return pairs

    def pairs(self, split: str) -> list[tuple[Path, Path]]:
        if split not in ("train", "val"):
            if self.root is None:
                raise ValueError(f"the {split!r} split of format folder is root/{split}/{{images,masks}}: give root")
            return self._match(self.root / split / "images", self.root / split / "masks")
        if self.val_images is not None:
            return self._match(*((self.images, self.masks) if split == "train" else (self.val_images, self.val_masks)))
        pairs = self._match(self.images, self.masks)
        held_out = set(random.Random(0).sample(range(len(pairs)), max(1, round(len(pairs) * self.val_fraction))))
        return [p for i, p in enumerate(pairs) if (i in held_out) == (split == "val")]


FORMATS = ("voc", "ade20k", "folder")


class SegmentationDataModule(BaseDataModule):
    """Semantic segmentation data in the Pascal VOC, ADE20K or image/mask folder layout (``format``),
    and the demo set.

    - ``voc``: Pascal VOC 2012 under ``root`` (the ``VOCdevkit`` directory; ``sbd_augmented`` for
      VOC-aug training), 21 classes; ``demo`` generates a small synthetic set in this layout.
    - ``ade20k``: ``ADEChallengeData2016`` under ``root``, 150 classes (names: ``class_names``).
    - ``folder``: ``root/{train,val}/{images,masks}`` (+ ``root/classes.json``), or the folders one
      by one (``images``, ``masks``, ``val_images``, ``val_masks``; else ``val_fraction`` of the
      training pairs); ``class_names`` or ``num_classes`` unless ``classes.json`` names them.

    ``test`` evaluates ``test_split`` where given (voc: ``ImageSets/Segmentation/<test_split>.txt``;
    ade20k: ``images/<test_split>/``, ``annotations/<test_split>/``; folder:
    ``root/<test_split>/{images,masks}``), else the validation split.

    Training: random scale (``scale_range``), random crop ``crop_size`` (padding images with 0 and
    masks with ``ignore_index``), horizontal flip, photometric jitter, normalization. Evaluation and
    ``predict``: the whole image at its original resolution (batches padded, padding ignored), or
    scaled by ``eval_scale`` (images bilinear, masks nearest: the metric is then that of the
    downscaled set; a budget setting, e.g. for CPU runs; 1.0 is the standard protocol).

    Bad input: an unreadable image file is an error naming it, or with ``skip_corrupt`` is left out
    and reported (as in every task: ``BaseDataModule``); a mask that cannot be read, does not match
    its image's size or holds labels outside the classes and ``ignore_index`` is an error naming it.

    ``num_classes``, ``class_names`` and ``ignore_index`` are linked into the model by the CLI.
    """

    def __init__(
        self,
        root: str | None = None,
        format: Literal["voc", "ade20k", "folder"] = "voc",
        class_names: list[str] | None = None,
        num_classes: int | None = None,
        sbd_augmented: bool = False,
        images: str | None = None,
        masks: str | None = None,
        val_images: str | None = None,
        val_masks: str | None = None,
        val_fraction: float = 0.1,
        test_split: str | None = None,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        crop_size: int = 512,
        scale_range: tuple[float, float] = (0.5, 2.0),
        ignore_index: int = 255,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        predict_dir: str | None = None,
        eval_scale: float = 1.0,
        skip_corrupt: bool = False,
        demo: bool = False,
        demo_images: int = 160,
    ) -> None:
        super().__init__(batch_size, val_batch_size, num_workers, pin_memory, persistent_workers, skip_corrupt)
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
        if not 0 < eval_scale <= 1:
            raise ValueError(f"eval_scale must be in (0, 1], got {eval_scale}")
        folder_options = {"images": images, "masks": masks, "val_images": val_images, "val_masks": val_masks}
        given = [name for name, value in {**folder_options, "num_classes": num_classes}.items() if value is not None]
        if format != "folder" and given:
            raise ValueError(f"{', '.join(given)}: options of format folder, not {format}")
        if demo and format != "voc":
            raise ValueError("demo generates a Pascal VOC-layout set: it needs format voc")
        base = Path(root) if root is not None else None
        if format != "folder" and base is None:
            raise ValueError(f"format {format} needs root")
        if format == "voc":
            if class_names is not None:
                raise ValueError("class_names is for format ade20k or folder: Pascal VOC has its 21 classes")
            self.layout: PairLayout = VocPairs(base, sbd_augmented, demo, demo_images)
        elif format == "ade20k":
            self.layout = Ade20kPairs(base, class_names)
        else:
            self.layout = FolderPairs(base, **folder_options, val_fraction=val_fraction, class_names=class_names, num_classes=num_classes)
        self.format = format
        self.class_names = self.layout.class_names
        self.eval_scale = eval_scale
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.ignore_index = ignore_index
        self.mean, self.std = list(mean), list(std)
        self.predict_dir = predict_dir
        self.test_split = test_split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        self.layout.prepare(self.crop_size)

    def pairs(self, split: str) -> list[tuple[Path, Path]]:
        """The (image, mask) files of ``split`` ("train" or "val")."""
        return self.layout.pairs(split)

    def _normalize(self) -> list[v2.Transform]:
        return [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(self.mean, self.std)]

    def train_transform(self) -> v2.Transform:
        return v2.Compose(
            [
                RandomScale(self.scale_range),
                v2.RandomCrop(self.crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: self.ignore_index}),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.02),
                *self._normalize(),
            ]
        )

    def eval_transform(self) -> v2.Transform:
        scale = [RandomScale((self.eval_scale, self.eval_scale))] if self.eval_scale != 1 else []
        return v2.Compose([*scale, *self._normalize()])

    def _dataset(self, split: str, transform: v2.Transform) -> SegmentationPairs:
        pairs = self.pairs(split)
        if not pairs:
            raise FileNotFoundError(f"no (image, mask) pairs found for the {split} split; {self.layout.layout}")
        return SegmentationPairs(pairs, transform, self.num_classes, self.ignore_index, self.layout.label_offset, self.skip_corrupt,
                                 source=f"{self.format} {split} split")

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_dataset = self._dataset("train", self.train_transform())
        if stage in ("fit", "validate"):
            self.val_dataset = self._dataset("val", self.eval_transform())
        if stage == "test":
            self.test_dataset = self._dataset(evaluated_split(self.test_split, "val"), self.eval_transform())
        if stage == "predict":
            if self.predict_dir is None:
                raise ValueError("predict needs --data.predict_dir: a directory of images to segment")
            self.predict_dataset = PredictImages(self.predict_dir, self.eval_transform(), self.skip_corrupt)

    def collate_fn(self, dataset: Dataset) -> Callable:
        return pad_collate(self.ignore_index)


def _textured_background(size: int, rng: random.Random) -> Image.Image:
    noise = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 60, (size, size, 3), dtype=np.uint8)
    base = np.array([rng.randint(40, 200) for _ in range(3)], dtype=np.uint8)
    image = Image.fromarray(np.clip(noise.astype(np.int16) + base - 30, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    period = rng.randint(6, 16)
    stripe = tuple(int(c) for c in np.clip(base.astype(int) + rng.choice([-35, 35]), 0, 255))
    for offset in range(-size, size, period):  # diagonal stripes
        draw.line((offset, 0, offset + size, size), fill=stripe, width=2)
    return image


def make_demo_voc(root: str | os.PathLike, train_images: int = 160, val_images: int = 40, size: int = 128, seed: int = 0) -> Path:
    """Write a synthetic VOC-style dataset to ``root`` (the ``VOCdevkit`` directory).

    Each image holds 1-3 shapes (circle, square, triangle; each class with its own hue) on a
    textured background; masks are VOC palette PNGs with a 1-pixel 255 ("ignore") outline
    around every shape, as VOC's own masks have. Written to a scratch directory and renamed.
    """
    rng = random.Random(seed)
    palette = voc_palette()

    def write(scratch: Path) -> None:
        voc = scratch / "VOC2012"
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (voc / sub).mkdir(parents=True)
        for split, count in (("train", train_images), ("val", val_images)):
            ids = []
            for index in range(count):
                image_id = f"{split}_{index:05d}"
                image = _textured_background(size, rng)
                mask = Image.new("P", (size, size), 0)
                mask.putpalette(palette)
                draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
                for _ in range(rng.randint(1, 3)):
                    label = rng.randint(1, len(DEMO_CLASSES) - 1)
                    rgb = jittered_colour(rng, (label - 1) / (len(DEMO_CLASSES) - 1), 0.7)
                    extent = rng.uniform(0.2, 0.5) * size
                    cx, cy = rng.uniform(extent / 2, size - extent / 2), rng.uniform(extent / 2, size - extent / 2)
                    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
                    draw_shape(draw_image, DEMO_CLASSES[label], box, rgb)
                    draw_shape(draw_mask, DEMO_CLASSES[label], box, label, outline=255)
                image.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=92)
                mask.save(voc / "SegmentationClass" / f"{image_id}.png")
                ids.append(image_id)
            (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")

    return atomic_write_dir(Path(root), write)  # an interrupted generation leaves nothing at root
