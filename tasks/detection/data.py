"""Detection data: COCO-format json (COCO 2017 or any json + image directory), Pascal VOC XML or YOLO txt
(converted to COCO-format dicts by ``tasks.detection.formats``), and the demo set."""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from backbones.atomic import atomic_write_dir
from tasks.common.data import BaseDataModule, ImageFiles, PredictImages, evaluated_split
from tasks.common.demo import draw_clutter, draw_shape, jittered_colour
from tasks.detection.formats import (
    AnnotationReader,
    ConvertedAnnotations,
    InvalidAnnotationError,
    annotation_reader,
    json_type,
    read_categories,
    read_coco_json,
)

__all__ = ["DetectionDataModule", "CocoAnnotations", "InvalidAnnotationError", "make_demo_coco"]

DEMO_CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"})


class CocoAnnotations:
    """COCO-format annotations read and checked once: images, category mapping, cleaned boxes.

    ``annotations`` is a COCO json file, or a COCO-format dict in memory (e.g. ``data`` of a
    ``tasks.detection.formats`` reader, see ``from_converted``) with ``source`` naming where it
    came from in messages; an annotation's optional ``origin`` (e.g. ``"x.xml: object 2 ('apple')"``)
    replaces ``"<source>: annotation id N"`` in them. ``file_name`` is relative to ``image_dir``
    (or absolute). A json file that is not valid JSON raises ``InvalidAnnotationError`` naming the
    file, line and column (``read_coco_json``).

    Category ids map to contiguous labels 1..K (0 is the background) and back. Problems are
    counted per kind and reported in one warning (with ``problems`` counted before, e.g. by a
    format reader), or with ``strict`` raise an error naming the json file (or the origin) and the
    annotation or image id: boxes with zero or negative width or height are dropped; boxes
    reaching outside the image are clipped (dropped if nothing is left); annotations without a
    ``bbox`` of 4 finite numbers, with an unknown category id, or whose ``image_id`` is not among
    the images are dropped; images whose file is missing, or whose entry lacks ``id``,
    ``file_name``, ``width`` or ``height``, are dropped (their annotations with them, not counted
    again). ``counts`` holds the numbers read and kept (``summary()`` in words).
    """

    def __init__(
        self,
        annotations: str | os.PathLike | dict[str, Any],
        image_dir: str | os.PathLike,
        strict: bool = False,
        source: str | None = None,
        problems: Mapping[str, int] | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        if isinstance(annotations, dict):
            self.path = None
            self.source = source or "COCO-format annotations (in memory)"
            data = annotations
        else:
            self.path = Path(annotations)
            self.source = source or str(self.path)
            if not self.path.is_file():
                raise FileNotFoundError(f"annotation file {self.path} does not exist")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory {self.image_dir} does not exist")
        if self.path is not None:
            data = read_coco_json(self.path)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise InvalidAnnotationError(f"{self.source} is not a COCO detection file: no {key!r} key")
            if not isinstance(data[key], list):
                raise InvalidAnnotationError(f"{self.source}: {key!r} is a JSON {json_type(data[key])}, expected an array")
        self.categories = read_categories(data, self.source)
        self.category_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.class_names = [c["name"] for c in self.categories]
        problems = Counter(problems or {})

        def problem(kind: str, where: dict[str, Any], subject: str, detail: str) -> None:
            if strict:
                origin = where.get("origin")
                raise InvalidAnnotationError(f"{origin}: {detail}" if origin else f"{self.source}: {subject}: {detail}")
            problems[kind] += 1

        self.images: dict[int, dict[str, Any]] = {}
        dropped_images = set()
        for number, image in enumerate(data["images"]):
            lacking = [key for key in ("id", "file_name", "width", "height") if key not in image] if isinstance(image, dict) else ["all"]
            if lacking:
                detail = f"no {', '.join(lacking)} in {image!r}"[:300] + "; expected id, file_name, width and height"
                problem("malformed image entry", image if isinstance(image, dict) else {}, f"images[{number}]", detail)
                continue
            if not (self.image_dir / image["file_name"]).is_file():
                problem("missing image file", image, f"image id {image['id']}", f"file {self.image_dir / image['file_name']} is missing")
                dropped_images.add(image["id"])
                continue
            self.images[image["id"]] = {**image, "annotations": []}
        with_dropped_image = 0
        for number, annotation in enumerate(data["annotations"]):
            if not isinstance(annotation, dict):
                problem("malformed annotation entry", {}, f"annotations[{number}]", f"{annotation!r}"[:200] + " is not a JSON object")
                continue
            subject = f"annotation id {annotation['id']}" if "id" in annotation else f"annotations[{number}] (no id)"
            image_id = annotation.get("image_id")
            image = self.images.get(image_id) if isinstance(image_id, (int, str)) else None
            if image is None:
                if isinstance(image_id, (int, str)) and image_id in dropped_images:
                    with_dropped_image += 1
                    continue
                problem("unknown image id", annotation, subject,
                        f"image_id {image_id!r} is not the id of any of the {len(data['images'])} images")
                continue
            category_id = annotation.get("category_id")
            if not isinstance(category_id, (int, str)) or category_id not in self.category_to_label:
                problem("unknown category id", annotation, subject, f"unknown category id {category_id!r}")
                continue
            bbox = annotation.get("bbox")
            try:
                x, y, w, h = (float(v) for v in bbox)
                if not all(math.isfinite(v) for v in (x, y, w, h)):
                    raise ValueError
            except (TypeError, ValueError):
                detail = "no bbox" if bbox is None else f"bbox {bbox!r} is not 4 finite numbers"
                problem("missing or malformed bbox", annotation, subject, f"{detail}; expected bbox [x, y, width, height]")
                continue
            if w <= 0 or h <= 0:
                problem("zero or negative width/height", annotation, subject, f"bbox {annotation['bbox']} has no area")
                continue
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(image["width"]), x + w), min(float(image["height"]), y + h)
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                image_name = f"the {image['width']}x{image['height']} image" if "origin" in annotation else f"image id {image['id']}"
                if x2 <= x1 or y2 <= y1:
                    problem("box outside the image", annotation, subject, f"bbox {annotation['bbox']} lies outside {image_name}")
                    continue
                problem("box clipped to the image", annotation, subject, f"bbox {annotation['bbox']} reaches outside {image_name}")
            image["annotations"].append(
                {
                    "box": [x1, y1, x2, y2],
                    "label": self.category_to_label[category_id],
                    "iscrowd": int(annotation.get("iscrowd", 0)),
                    "area": float(annotation.get("area", (x2 - x1) * (y2 - y1))),
                }
            )
        if problems:
            counts = ", ".join(f"{kind}: {count}" for kind, count in sorted(problems.items()))
            hint = "" if strict else "; pass strict=True to raise instead"
            warnings.warn(f"{self.source}: fixed or dropped bad annotations ({counts}){hint}", stacklevel=2)
        self.problems = dict(problems)
        kept = [a for image in self.images.values() for a in image["annotations"]]
        self.counts = {
            "images read": len(data["images"]),
            "images kept": len(self.images),
            "annotations read": len(data["annotations"]),
            "boxes kept": len(kept),
            "crowd boxes kept": sum(a["iscrowd"] for a in kept),
            "annotations of dropped images": with_dropped_image,
        }

    def summary(self) -> str:
        """The numbers read, kept and dropped, in words (for messages)."""
        c = self.counts
        dropped = ", ".join(f"{kind}: {count}" for kind, count in sorted(self.problems.items())) or "none"
        return (
            f"read {c['images read']} images and {c['annotations read']} annotations; kept {c['images kept']} images "
            f"and {c['boxes kept']} boxes ({c['crowd boxes kept']} crowd); dropped {c['annotations of dropped images']} "
            f"annotations with their images; problems: {dropped}"
        )

    @classmethod
    def from_converted(cls, converted: ConvertedAnnotations, strict: bool = False) -> CocoAnnotations:
        """The annotations a ``tasks.detection.formats`` reader converted, with its problems in the one warning."""
        return cls(converted.data, converted.image_dir, strict, source=converted.source, problems=converted.problems)

    def image_ids(self, with_boxes_only: bool) -> list[int]:
        """Image ids; for training, only images with at least one non-crowd box."""
        return [
            i for i, image in self.images.items()
            if not with_boxes_only or any(not a["iscrowd"] for a in image["annotations"])
        ]


class ShrinkToMaxSize(v2.Transform):
    """Scale an image (and its boxes) down so that its longer side is at most ``max_size``; smaller
    images pass unchanged."""

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        scale = self.max_size / max(height, width)
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))] if scale < 1 else None}

    def transform(self, inpt: Any, params: dict) -> Any:
        return inpt if params["size"] is None else v2.functional.resize(inpt, params["size"], antialias=True)


class CocoImages(ImageFiles):
    """Images and targets: ``(image float [0, 1], {"boxes" xyxy, "labels", "iscrowd", "area", "image_id"})``.

    Training targets leave crowd boxes out; evaluation targets keep them, marked ``iscrowd``. A
    training set without an image with a non-crowd box, or an evaluation set without images, raises
    ``InvalidAnnotationError`` with the numbers read and dropped. An image whose decoded size is not
    the json's ``width`` x ``height`` raises ``InvalidAnnotationError`` naming the file and both
    sizes when it is read (as detectron2 checks; torchvision's ``CocoDetection`` would use the
    boxes as they are): the boxes are in the json's frame, so neither size can be trusted silently.
    """

    def __init__(self, coco: CocoAnnotations, train: bool, transform: v2.Transform, skip_corrupt: bool = False) -> None:
        super().__init__(str(coco.image_dir), skip_corrupt)
        self.coco = coco
        self.train = train
        self.ids = coco.image_ids(with_boxes_only=train)
        self.transform = transform
        if not self.ids and train:
            raise InvalidAnnotationError(f"{coco.source}: no image has a usable (non-crowd) box to train on ({coco.summary()})")
        if not self.ids:
            raise InvalidAnnotationError(f"{coco.source}: no usable image to evaluate on ({coco.summary()})")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        image_info = self.coco.images[self.ids[index]]
        path = self.coco.image_dir / image_info["file_name"]
        image = self.read_or_skip(path)
        if image is None:
            return None
        self.check_size(path, image, image_info)
        annotations = [a for a in image_info["annotations"] if not (self.train and a["iscrowd"])]
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor([a["box"] for a in annotations], dtype=torch.float32).reshape(-1, 4),
                format="XYXY", canvas_size=tuple(image.shape[-2:]),
            ),
            "labels": torch.tensor([a["label"] for a in annotations], dtype=torch.int64),
            "iscrowd": torch.tensor([a["iscrowd"] for a in annotations], dtype=torch.int64),
            "area": torch.tensor([a["area"] for a in annotations], dtype=torch.float32),
        }
        image, target = self.transform(tv_tensors.Image(image), target)
        target = {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
        target["image_id"] = torch.tensor(self.ids[index])
        return image.as_subclass(torch.Tensor), target


    def check_size(self, path: Path, image: torch.Tensor, image_info: dict[str, Any]) -> None:
        """Raise ``InvalidAnnotationError`` if the decoded image's size is not the json's ``width`` x
        ``height``: the boxes were clipped against, and are in the frame of, the json's size."""
        height, width = image.shape[-2:]
        if (width, height) != (image_info["width"], image_info["height"]):
            rotated = (height, width) == (image_info["width"], image_info["height"])
            hint = " (width and height swapped: an EXIF rotation? images are read unrotated)" if rotated else ""
            raise InvalidAnnotationError(
                f"{path} is {width}x{height} (WxH) but {self.coco.source} gives image id {image_info['id']} width "
                f"{image_info['width']}, height {image_info['height']}{hint}; its boxes are in the json's frame: "
                "fix the json's width/height, or use the images it was made for"
            )


def collate_lists(batch: list) -> tuple[list, list]:
    """Detection batches stay lists: images differ in size and targets in box count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class DetectionDataModule(BaseDataModule):
    """Detection data in COCO, Pascal VOC or YOLO format (``format``), and the demo set.

    - ``coco``: COCO 2017 under ``root`` (``annotations/instances_{train,val}2017.json``,
      ``{train,val}2017/``), or any COCO-format json + image directory via ``train_ann`` /
      ``train_images`` / ``val_ann`` / ``val_images``; the categories come from the json.
    - ``voc`` (Pascal VOC XML): the VOC2007/2012 layout if ``root/Annotations`` exists
      (``JPEGImages/<id>.jpg``, ``ImageSets/Main/<train_split|val_split>.txt``); otherwise folders
      of ``<name>.jpg`` + ``<name>.xml`` pairs: ``train_images`` / ``val_images`` if given, else
      ``root/<train_split>/`` and ``root/<val_split>/``. ``difficult`` objects are crowd boxes: left
      out of training targets, ignored by the evaluation.
    - ``yolo``: ``root/images/<split>/<name>.jpg`` + ``root/labels/<split>/<name>.txt`` for the
      splits ``train_split`` / ``val_split``; images without labels are kept as negatives.

    ``test`` evaluates the test split where one is named (coco: ``test_ann`` with ``test_images``,
    default ``root/test2017``; voc and yolo: ``test_split``, or ``test_images`` for a folder of
    pairs), else the validation split.

    For voc and yolo the categories are ``class_names`` if given (ids 1..K in that order; objects
    of other classes are dropped and counted, or an error with ``strict``), else for voc the
    sorted names in the training split's XML files, for yolo ``root/data.yaml``'s ``names`` or
    ``root/classes.txt`` (ids 1..K in class-index order). See ``tasks.detection.formats``.

    Training augmentation (SSD's): photometric distortion (``photometric``), expand (zoom out
    1-``zoom_out``x, 4 in the paper's setup; 1 for none), min-IoU random crop (``iou_crop``),
    resize to ``image_size``, horizontal flip. The first three are on by default: they make a long
    training generalize, but slow a run of a few hundred steps several-fold, and short recipes
    (the demo) turn them off. With
    ``train_max_size``, training images whose longer side exceeds it are first scaled down to it
    (boxes with them), which spares the augmentation work on large photos (a few pixels of detail in
    the tightest crops are the only cost; ``2 * image_size`` or more keeps nearly all). Evaluation
    images keep their size (the model resizes them and maps boxes back).

    Bad input: unusable boxes are dropped and counted in one warning per kind, or with ``strict``
    an error names the file and the object; an unreadable image file is an error naming it, or
    with ``skip_corrupt`` is left out and reported (as in every task: ``BaseDataModule``).

    ``num_classes`` (categories + background) and ``class_names`` are linked into the model.
    """

    def __init__(
        self,
        root: str | None = None,
        train_ann: str | None = None,
        train_images: str | None = None,
        val_ann: str | None = None,
        val_images: str | None = None,
        test_ann: str | None = None,
        test_images: str | None = None,
        format: Literal["coco", "voc", "yolo"] = "coco",
        class_names: list[str] | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        image_size: int = 320,
        zoom_out: float = 4.0,
        iou_crop: bool = True,
        photometric: bool = True,
        train_max_size: int | None = None,
        batch_size: int = 32,
        val_batch_size: int = 8,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        strict: bool = False,
        skip_corrupt: bool = False,
        predict_dir: str | None = None,
        demo: bool = False,
        demo_images: int = 240,
    ) -> None:
        super().__init__(batch_size, val_batch_size, num_workers, pin_memory, persistent_workers, skip_corrupt)
        if demo and format != "coco":
            raise ValueError("demo generates a COCO-format set: it needs format coco")
        self.reader: AnnotationReader = annotation_reader(
            format, root, train_ann, train_images, val_ann, val_images, train_split, val_split, class_names, strict,
            test_split, test_ann, test_images,
        )
        self.root = Path(root) if root else None
        self.image_size = image_size
        if zoom_out < 1.0:
            raise ValueError(f"zoom_out is the largest zoom-out factor, at least 1 (1: none), not {zoom_out}")
        self.zoom_out = zoom_out
        self.iou_crop = iou_crop
        self.photometric = photometric
        self.train_max_size = train_max_size
        self.strict = strict
        self.predict_dir = predict_dir
        self.demo = demo
        self.demo_images = demo_images
        self._annotations: dict[str, CocoAnnotations] = {}
        if demo:  # generated in prepare_data, with these categories
            self.class_names = [category["name"] for category in DEMO_CATEGORIES]
            self.category_ids = {label: category["id"] for label, category in enumerate(DEMO_CATEGORIES, start=1)}
        else:
            self.class_names = self.reader.class_names
            self.category_ids = self.reader.category_ids

    @property
    def num_classes(self) -> int:
        """Categories plus the background class (label 0)."""
        return len(self.class_names) + 1

    def prepare_data(self) -> None:
        if self.demo and not self.reader.files["train"][0].is_file():
            if self.root is None:
                raise ValueError("demo needs root: where to generate the demo dataset")
            make_demo_coco(self.root, self.demo_images, max(16, self.demo_images // 4))

    def train_transform(self) -> v2.Transform:
        steps = [ShrinkToMaxSize(self.train_max_size)] if self.train_max_size else []
        if self.photometric:
            steps.append(v2.RandomPhotometricDistort(p=0.5))
        if self.zoom_out > 1.0:
            steps.append(v2.RandomZoomOut(fill={tv_tensors.Image: (124, 116, 104), "others": 0}, side_range=(1.0, self.zoom_out), p=0.5))
        if self.iou_crop:
            steps.append(v2.RandomIoUCrop())
        return v2.Compose(
            [
                *steps,
                v2.Resize((self.image_size, self.image_size), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.SanitizeBoundingBoxes(labels_getter=lambda inputs: (inputs[1]["labels"], inputs[1]["iscrowd"], inputs[1]["area"])),
                v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            ]
        )

    def eval_transform(self) -> v2.Transform:
        return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_dataset = CocoImages(self.annotations("train"), train=True, transform=self.train_transform(), skip_corrupt=self.skip_corrupt)
        if stage in ("fit", "validate"):
            self.val_dataset = CocoImages(self.annotations("val"), train=False, transform=self.eval_transform(), skip_corrupt=self.skip_corrupt)
        if stage == "test":
            split = evaluated_split("test" if "test" in self.reader.splits else None, "val")
            self.test_dataset = CocoImages(self.annotations(split), train=False, transform=self.eval_transform(), skip_corrupt=self.skip_corrupt)
        if stage == "predict":
            if self.predict_dir is None:
                raise ValueError("predict needs --data.predict_dir: a directory of images")
            self.predict_dataset = PredictImages(self.predict_dir, v2.ToDtype(torch.float32, scale=True), self.skip_corrupt)

    def annotations(self, split: Literal["train", "val", "test"]) -> CocoAnnotations:
        """A split's annotations, read (once a run: kept for later stages) and checked to have the training set's categories."""
        if split not in self._annotations:
            coco = CocoAnnotations.from_converted(self.reader.read(split), self.strict)
            if coco.class_names != self.class_names:
                raise ValueError(f"{coco.source} has categories {coco.class_names}, the training set {self.class_names}")
            self._annotations[split] = coco
        return self._annotations[split]

    def collate_fn(self, dataset: Dataset) -> Callable:
        return collate_lists


def make_demo_coco(root: str | os.PathLike, train_images: int = 240, val_images: int = 60, size: int = 160, seed: int = 0) -> Path:
    """Write a synthetic COCO 2017-layout dataset to ``root``: 2-4 shapes per image (circle, square,
    triangle; each category with its own hue) on cluttered backgrounds, some images without objects
    in validation. Written to a scratch directory and renamed."""
    rng = random.Random(seed)

    def draw_image(objects: int) -> tuple[Image.Image, list[dict]]:
        noise = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 50, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray((noise + np.array([rng.randint(40, 180) for _ in range(3)], dtype=np.uint8)).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        draw_clutter(draw, rng, size, (4, 10), 4)
        boxes = []
        for _ in range(objects):
            category = rng.choice(DEMO_CATEGORIES)
            colour = jittered_colour(rng, (category["id"] - 1) / len(DEMO_CATEGORIES), 0.7)
            extent = rng.uniform(0.25, 0.5) * size
            x1, y1 = rng.uniform(0, size - extent), rng.uniform(0, size - extent)
            draw_shape(draw, category["name"], (x1, y1, x1 + extent, y1 + extent), colour)
            boxes.append({"category_id": category["id"], "bbox": [round(x1, 2), round(y1, 2), round(extent, 2), round(extent, 2)]})
        return image, boxes

    def write(scratch: Path) -> None:
        (scratch / "annotations").mkdir(parents=True)
        annotation_id = 1
        for split, count in (("train", train_images), ("val", val_images)):
            (scratch / f"{split}2017").mkdir()
            images, annotations = [], []
            for index in range(count):
                empty = split == "val" and index % 10 == 9  # images without objects stay in validation
                image, boxes = draw_image(0 if empty else rng.randint(2, 4))
                image_id = index + 1
                file_name = f"{image_id:012d}.jpg"
                image.save(scratch / f"{split}2017" / file_name, quality=92)
                images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
                for box in boxes:
                    annotations.append({**box, "id": annotation_id, "image_id": image_id, "iscrowd": 0, "area": box["bbox"][2] * box["bbox"][3]})
                    annotation_id += 1
            content = {"images": images, "annotations": annotations, "categories": list(DEMO_CATEGORIES)}
            (scratch / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(content))

    return atomic_write_dir(Path(root), write)  # an interrupted generation leaves nothing at root
