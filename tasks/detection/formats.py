"""Detection annotation files (COCO json, Pascal VOC XML in its layout or in folders of pairs, YOLO
txt) behind one reader interface, each read into a COCO-format dict in memory.

``annotation_reader(format, ...)`` locates a dataset (errors name what is missing and the layout
expected) and returns an ``AnnotationReader``: its ``class_names`` and ``category_ids`` (contiguous
label 1..K -> the dataset's category id, which predictions are written with) come from the training
split, and ``read(split)`` returns ``ConvertedAnnotations``: a COCO-format dict (``images`` with
``id``, ``file_name`` relative to ``image_dir``, ``width``, ``height``; ``annotations`` with
``id``, ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``area``, ``iscrowd``;
``categories`` with ``id`` and ``name``), so that ``tasks.detection.data.CocoAnnotations`` cleans
the boxes and pycocotools evaluates every format alike. Every annotation file is parsed once per
reader: what finding the class names parsed is kept for that split's ``read``.

The readers of XML and txt files count their own problems per kind in ``problems`` (they warn
nothing themselves: ``CocoAnnotations`` reports them in its one warning, with the box problems), or
with ``strict`` raise ``InvalidAnnotationError`` naming the file and object or line; each of their
annotations carries ``origin`` (the file and object or line it came from) for those messages. Image
sizes are read from the image files' headers (not a full decode).

- COCO json (``CocoFiles``): a json file and an image directory a split; the categories and their
  ids are the training file's.
- Pascal VOC XML (``VocLayout``: the VOC2007/2012 layout; ``VocFolders``: folders of
  ``<name>.<ext>`` + ``<name>.xml`` pairs, as LabelImg exports): ``bbox`` is ``[xmin, ymin,
  xmax - xmin, ymax - ymin]`` as written (no -1 shift); ``<difficult>1</difficult>`` becomes
  ``iscrowd: 1`` (left out of training targets, ignored by the evaluation).
- YOLO txt (``YoloLayout``): ``images/<split>/<name>.<ext>`` + ``labels/<split>/<name>.txt``, one
  ``class cx cy w h`` line an object, normalized to [0, 1]; an image without a label file, or
  with an empty one, is an image without objects (YOLO's negatives).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from tasks.common.data import IMAGE_EXTENSIONS, list_images

__all__ = [
    "AnnotationReader",
    "CocoFiles",
    "ConvertedAnnotations",
    "InvalidAnnotationError",
    "VocFolders",
    "VocLayout",
    "YoloLayout",
    "annotation_reader",
    "read_coco_json",
    "yolo_class_names",
]

COCO_LAYOUT = "annotations/instances_{train,val}2017.json and {train,val}2017/<image>.jpg"
VOC_LAYOUT = "Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt (one <id> a line)"
YOLO_LAYOUT = "images/<split>/<name>.jpg, labels/<split>/<name>.txt (class cx cy w h a line), data.yaml (names:) or classes.txt"
FORMATS = ("coco", "voc", "yolo")


class InvalidAnnotationError(ValueError):
    """An annotation that cannot be used (with ``strict=True``), or an annotation file that cannot be
    read at all (e.g. invalid JSON), or an image whose size is not its annotation's; the message names
    the file and the object."""


@dataclass
class ConvertedAnnotations:
    """A COCO-format dict, the directory its ``file_name``s are relative to, a description of the
    source (for messages), and the problems the reader counted per kind."""

    data: dict[str, Any]
    image_dir: Path
    source: str
    problems: dict[str, int] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in sorted(self.data["categories"], key=lambda c: c["id"])]


class AnnotationReader(ABC):
    """The annotation files of a detection dataset, a split each (``"train"``, ``"val"``, ...).

    ``class_names`` are the given ones (ids 1..K in that order; objects of other classes are
    problems, "unknown class"), else what the training split names (found once, on first use).
    ``read(split)`` parses that split's files, at most once: a split read to find the class names
    is not parsed again.
    """

    def __init__(self, splits: Sequence[str], class_names: Sequence[str] | None = None, strict: bool = False) -> None:
        self.splits = list(splits)
        self.strict = strict
        self._class_names = list(class_names) if class_names is not None else None
        self._parsed: dict[str, Any] = {}

    @property
    def class_names(self) -> list[str]:
        """Category names in label order (label i + 1 is ``class_names[i]``)."""
        if self._class_names is None:
            names = self._find_class_names()
            if not names:
                raise ValueError(f"{self.describe('train')} names no class: pass class_names")
            self._class_names = names
        return self._class_names

    @property
    def category_ids(self) -> dict[int, int]:
        """Label 1..K -> the dataset's category id (written into predictions); 1..K unless the files number them."""
        return {label: label for label in range(1, len(self.class_names) + 1)}

    def read(self, split: str) -> ConvertedAnnotations:
        """The split's annotations as a COCO-format dict with the categories ``class_names``."""
        return self._convert(split, self._take(split))

    def describe(self, split: str) -> str:
        """Where a split's annotations are, for messages."""
        return f"{split} split"

    def _take(self, split: str) -> Any:
        """The split's parse, made now or handed over from an earlier use (then forgotten: a reader keeps no copy)."""
        if split not in self.splits:
            raise ValueError(f"no {split!r} split: this dataset has {self.splits}")
        parsed = self._parsed.pop(split, None)
        return parsed if parsed is not None else self._parse(split)

    def _peek(self, split: str) -> Any:
        """The split's parse, kept for its ``read``."""
        if split not in self._parsed:
            self._parsed[split] = self._parse(split)
        return self._parsed[split]

    @abstractmethod
    def _parse(self, split: str) -> Any:
        """Read a split's files (each once)."""

    @abstractmethod
    def _convert(self, split: str, parsed: Any) -> ConvertedAnnotations:
        """A parse as a COCO-format dict with the categories ``class_names``."""

    @abstractmethod
    def _find_class_names(self) -> list[str]:
        """The class names the training split gives (in label order)."""


class _Problems(Counter):
    """Counts problems per kind, or with ``strict`` raises ``InvalidAnnotationError(detail)``."""

    def __init__(self, strict: bool, counted: Mapping[str, int] | None = None) -> None:
        super().__init__(counted or {})
        self.strict = strict

    def __call__(self, kind: str, detail: str) -> None:
        if self.strict:
            raise InvalidAnnotationError(detail)
        self[kind] += 1


class _Builder:
    """Collects images and annotations into a COCO-format dict with ids from 1."""

    def __init__(self, class_names: Sequence[str], image_dir: Path) -> None:
        self.image_dir = image_dir
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories = [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]

    def add_image(self, path: Path, width: int, height: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": _relative(path, self.image_dir), "width": width, "height": height})
        return image_id

    def add_box(self, image_id: int, category_id: int, bbox: list[float], iscrowd: int, origin: str) -> None:
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": category_id,
                                 "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": iscrowd, "origin": origin})

    def result(self, source: str, problems: Counter) -> ConvertedAnnotations:
        data = {"images": self.images, "annotations": self.annotations, "categories": self.categories}
        return ConvertedAnnotations(data, self.image_dir, source, dict(problems))


def _relative(path: Path, directory: Path) -> str:
    try:
        return path.relative_to(directory).as_posix()
    except ValueError:
        return str(path.resolve())


def _image_size(path: Path, problem: _Problems) -> tuple[int, int] | None:
    """(width, height) from the file's header (PIL identifies the format by content, not by
    extension), or None after counting an "unreadable image file"."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as error:  # PIL.UnidentifiedImageError is an OSError
        problem("unreadable image file", f"{path}: unreadable image file: {error}")
        return None


def _find_image(directory: Path, stem: str, hint: str | None = None) -> Path | None:
    """``directory/<stem><ext>`` for an image extension, else ``directory/hint`` (the XML's ``<filename>``) if it is a file."""
    for extension in IMAGE_EXTENSIONS:
        for candidate in (directory / f"{stem}{extension}", directory / f"{stem}{extension.upper()}"):
            if candidate.is_file():
                return candidate
    if hint and (directory / Path(hint).name).is_file():
        return directory / Path(hint).name
    return None


# COCO json --------------------------------------------------------------------------------------

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (for messages)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """A COCO-format json file as a dict. Invalid JSON raises ``InvalidAnnotationError`` naming the
    file, the line and column, what the parser expected there and the text around it; so does a
    file that is not a JSON object."""
    path = Path(path)
    expected = 'expected a COCO-format JSON object with "images", "annotations" and "categories"'
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise InvalidAnnotationError(f"{path}: not UTF-8 text (byte {error.start} is {byte:#04x}); {expected}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if not text.strip():
            raise InvalidAnnotationError(f"{path}: the file is empty; {expected}") from None
        here = text[max(0, error.pos - 30) : error.pos] + "<here>" + text[error.pos : error.pos + 30]
        raise InvalidAnnotationError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}: {here!r}; {expected}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidAnnotationError(f"{path}: the top level is a JSON {json_type(data)}; {expected}")
    return data


def read_categories(data: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """The ``categories`` of a COCO-format dict sorted by id, each checked to have an ``id`` and a ``name``."""
    categories = data.get("categories")
    if not isinstance(categories, list):
        raise InvalidAnnotationError(f'{source}: "categories" is not a list of {{"id": ..., "name": ...}} objects')
    for number, category in enumerate(categories):
        if not (isinstance(category, dict) and isinstance(category.get("id"), (int, str)) and "name" in category):
            raise InvalidAnnotationError(f'{source}: categories[{number}] is {category!r}; expected {{"id": <int>, "name": <str>}}')
    return sorted(categories, key=lambda c: c["id"])


class CocoFiles(AnnotationReader):
    """COCO-format json files, one a split, each with the image directory its ``file_name``s are
    relative to: ``{"train": (json, images), "val": (json, images)}``. The categories, their names
    and ids are the training file's; ``missing_hint`` ends the error for a json file that does not exist."""

    def __init__(self, files: Mapping[str, tuple[str | os.PathLike, str | os.PathLike]], strict: bool = False, missing_hint: str = "") -> None:
        super().__init__(list(files), None, strict)
        self.files = {split: (Path(json_file), Path(images)) for split, (json_file, images) in files.items()}
        self.missing_hint = missing_hint
        self._train_categories: list[dict[str, Any]] | None = None

    def describe(self, split: str) -> str:
        return str(self.files[split][0])

    @property
    def category_ids(self) -> dict[int, int]:
        return {label: category["id"] for label, category in enumerate(self._categories(), start=1)}

    def _categories(self) -> list[dict[str, Any]]:
        if self._train_categories is None:
            self._peek("train")
        return self._train_categories

    def _parse(self, split: str) -> dict[str, Any]:
        path = self.files[split][0]
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {path} does not exist" + (f"; {self.missing_hint}" if self.missing_hint else ""))
        data = read_coco_json(path)
        if split == "train":
            self._train_categories = read_categories(data, str(path))
        return data

    def _convert(self, split: str, parsed: dict[str, Any]) -> ConvertedAnnotations:
        return ConvertedAnnotations(parsed, self.files[split][1], str(self.files[split][0]))

    def _find_class_names(self) -> list[str]:
        return [category["name"] for category in self._categories()]


# Pascal VOC XML ---------------------------------------------------------------------------------

@dataclass
class _VocParse:
    """The XML files of a split: per image its file, size and objects (name, xywh box, difficult, where);
    the names of all objects (for the class names); the problems counted."""

    images: list[tuple[Path, int, int, list[tuple[str, list[float], int, str]]]]
    names: set[str]
    problems: Counter


def _parse_voc(entries: list[tuple[str, Path | None, Path]], image_dir: Path, strict: bool) -> _VocParse:
    """``entries``: (name, its XML file or None, where the XML was expected). Problems, dropped and
    counted or with ``strict`` raised: "unreadable XML" (the image is dropped), "malformed object"
    (no name or no numeric ``bndbox``), "image without annotation file", "missing image file",
    "unreadable image file". An XML whose ``<size>`` is missing, 0x0 or not the image's gets the
    image file's size, counted as "size taken from the image file" (a lossless fix: counted, never
    raised, also with ``strict``)."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image directory {image_dir} does not exist")
    problem = _Problems(strict)
    images, names = [], set()
    for name, xml, expected in entries:
        if xml is None:
            image = _find_image(image_dir, name)
            problem("image without annotation file", f"{image or image_dir / name}: no annotation file {expected}")
            continue
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as error:
            problem("unreadable XML", f"{xml}: unreadable XML: {error}")
            continue
        if root.tag != "annotation":
            problem("unreadable XML", f"{xml}: not a Pascal VOC annotation (root element <{root.tag}>)")
            continue
        image_path = _find_image(image_dir, name, (root.findtext("filename") or "").strip())
        if image_path is None:
            problem("missing image file", f"{xml}: no image file {image_dir / name}.<jpg, png, ...>")
            continue
        size = _image_size(image_path, problem)
        if size is None:
            continue
        width, height = size
        if (_int(root.findtext("size/width")), _int(root.findtext("size/height"))) != (width, height):
            problem["size taken from the image file"] += 1  # fixed losslessly: counted, never raised
        objects = []
        for number, element in enumerate(root.findall("object"), start=1):
            label = (element.findtext("name") or "").strip()
            names.add(label)
            where = f"{xml}: object {number} ({label!r})"
            try:
                xmin, ymin, xmax, ymax = (float(element.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                problem("malformed object", f"{where}: no numeric <bndbox> xmin, ymin, xmax, ymax")
                continue
            if not label:
                problem("malformed object", f"{where}: no <name>")
                continue
            difficult = (element.findtext("difficult") or "0").strip().lower() in ("1", "true")
            objects.append((label, [xmin, ymin, xmax - xmin, ymax - ymin], int(difficult), where))
        images.append((image_path, width, height, objects))
    names.discard("")
    return _VocParse(images, names, problem)


def _int(text: str | None) -> int | None:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


class _VocReader(AnnotationReader):
    """Pascal VOC XML files: the class names are the sorted names of the training split's objects."""

    @abstractmethod
    def _entries(self, split: str) -> list[tuple[str, Path | None, Path]]:
        """(name, XML file or None, where the XML was expected) of each image of a split."""

    @abstractmethod
    def _image_dir(self, split: str) -> Path:
        """The folder of a split's images."""

    def _parse(self, split: str) -> _VocParse:
        return _parse_voc(self._entries(split), self._image_dir(split), self.strict)

    def _find_class_names(self) -> list[str]:
        return sorted(self._peek("train").names)

    def _convert(self, split: str, parsed: _VocParse) -> ConvertedAnnotations:
        """Objects of classes not in ``class_names`` are "unknown class" problems."""
        class_names = self.class_names
        category_ids = {name: i + 1 for i, name in enumerate(class_names)}
        problem = _Problems(self.strict, parsed.problems)
        builder = _Builder(class_names, self._image_dir(split))
        for path, width, height, objects in parsed.images:
            image_id = builder.add_image(path, width, height)
            for label, box, difficult, where in objects:
                if label not in category_ids:
                    problem("unknown class", f"{where}: unknown class, not one of {class_names}")
                    continue
                builder.add_box(image_id, category_ids[label], box, difficult, where)
        return builder.result(self.describe(split), problem)


class VocLayout(_VocReader):
    """Splits of the VOC2007/2012 layout: ``Annotations/<id>.xml``, ``JPEGImages/<id>.<ext>``,
    ``ImageSets/Main/<name>.txt``; ``splits`` maps a split to its file name (e.g. ``{"train":
    "trainval", "val": "test"}``). The folders and the first split's file must exist."""

    def __init__(
        self,
        root: str | os.PathLike,
        splits: Mapping[str, str] | None = None,
        class_names: Sequence[str] | None = None,
        strict: bool = False,
    ) -> None:
        splits = dict(splits or {"train": "train", "val": "val"})
        super().__init__(list(splits), class_names, strict)
        self.root = Path(root)
        self.split_files = {split: self.root / "ImageSets" / "Main" / f"{name}.txt" for split, name in splits.items()}
        for required in (self.root / "Annotations", self.root / "JPEGImages", self.split_files[self.splits[0]]):
            self._require(required)  # the folders and the first split's file; the others' when read

    def _require(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; expected the Pascal VOC layout under {self.root}: {VOC_LAYOUT}")

    def describe(self, split: str) -> str:
        return f"{self.split_files[split]} (Pascal VOC)"

    def _image_dir(self, split: str) -> Path:
        return self.root / "JPEGImages"

    def _entries(self, split: str) -> list[tuple[str, Path | None, Path]]:
        self._require(self.split_files[split])
        entries = []
        for name in (line.split()[0] for line in self.split_files[split].read_text().splitlines() if line.strip()):
            xml = self.root / "Annotations" / f"{name}.xml"
            entries.append((name, xml if xml.is_file() else None, xml))
        return entries


class VocFolders(_VocReader):
    """Folders of ``<name>.<ext>`` images and ``<name>.xml`` Pascal VOC files (LabelImg's and CVAT's
    export), one a split: ``{"train": folder, "val": folder}``."""

    def __init__(self, folders: Mapping[str, str | os.PathLike], class_names: Sequence[str] | None = None, strict: bool = False) -> None:
        super().__init__(list(folders), class_names, strict)
        self.folders = {split: Path(folder) for split, folder in folders.items()}

    def describe(self, split: str) -> str:
        return f"{self.folders[split]} (Pascal VOC XML)"

    def _image_dir(self, split: str) -> Path:
        return self.folders[split]

    def _entries(self, split: str) -> list[tuple[str, Path | None, Path]]:
        folder = self.folders[split]
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist; expected a folder of <name>.jpg + <name>.xml pairs (Pascal VOC XML)")
        stems = {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() == ".xml" or path.suffix.lower() in IMAGE_EXTENSIONS:
                stems.setdefault(path.stem, path.with_suffix(".xml"))
        return [(stem, xml if xml.is_file() else None, xml) for stem, xml in stems.items()]


# YOLO txt ---------------------------------------------------------------------------------------

def yolo_class_names(root: str | os.PathLike) -> list[str]:
    """Class names of a YOLO dataset, in class-index order: ``data.yaml``'s ``names`` (a list, or
    Ultralytics' ``{index: name}`` dict with indices 0..K-1), else ``classes.txt`` (one a line)."""
    root = Path(root)
    data_yaml, classes_txt = root / "data.yaml", root / "classes.txt"
    if data_yaml.is_file():
        with open(data_yaml) as handle:
            names = (yaml.safe_load(handle) or {}).get("names")
        if isinstance(names, dict):
            by_index = {int(index): str(name) for index, name in names.items()}
            if sorted(by_index) != list(range(len(by_index))):
                raise ValueError(f"{data_yaml}: names must have the indices 0..{len(by_index) - 1}, got {sorted(by_index)}")
            return [by_index[index] for index in range(len(by_index))]
        if isinstance(names, list):
            return [str(name) for name in names]
        raise ValueError(f"{data_yaml} has no names: list or {{index: name}} dict")
    if classes_txt.is_file():
        return [line.strip() for line in classes_txt.read_text().splitlines() if line.strip()]
    raise FileNotFoundError(f"neither {data_yaml} nor {classes_txt} exists: give the class names (class_names)")


class YoloLayout(AnnotationReader):
    """Splits of a YOLO dataset: ``images/<name>/<file>.<ext>`` (also in subfolders) and
    ``labels/<name>/<file>.txt``; ``splits`` maps a split to its folder name. The first split's
    folders must exist.

    Categories: ``class_names`` in class-index order, else ``yolo_class_names(root)``; class index
    i is category id i + 1. Boxes become pixels from the image sizes. Problems, dropped and counted
    or with ``strict`` raised naming the file and line: "wrong number of fields", "not a number",
    "unknown class index", "missing image file" (a label file without its image), "unreadable image
    file".
    """

    def __init__(
        self,
        root: str | os.PathLike,
        splits: Mapping[str, str] | None = None,
        class_names: Sequence[str] | None = None,
        strict: bool = False,
    ) -> None:
        splits = dict(splits or {"train": "train", "val": "val"})
        super().__init__(list(splits), class_names, strict)
        self.root = Path(root)
        self.folders = {split: (self.root / "images" / name, self.root / "labels" / name) for split, name in splits.items()}
        self._check(self.folders[self.splits[0]])  # the first split's folders; the others' when read

    def _check(self, folders: tuple[Path, Path]) -> None:
        for required in folders:
            if not required.is_dir():
                raise FileNotFoundError(f"{required} does not exist; expected the YOLO layout under {self.root}: {YOLO_LAYOUT}")

    def describe(self, split: str) -> str:
        return f"{self.folders[split][1]} (YOLO)"

    def _find_class_names(self) -> list[str]:
        return yolo_class_names(self.root)

    def _convert(self, split: str, parsed: ConvertedAnnotations) -> ConvertedAnnotations:
        return parsed  # the class names are known before the labels are read: one pass

    def _parse(self, split: str) -> ConvertedAnnotations:
        image_dir, label_dir = self.folders[split]
        self._check((image_dir, label_dir))
        class_names = self.class_names
        builder = _Builder(class_names, image_dir)
        problem = _Problems(self.strict)
        images = list_images(image_dir)
        for image_path in images:
            size = _image_size(image_path, problem)
            if size is None:
                continue
            width, height = size
            image_id = builder.add_image(image_path, width, height)
            label_file = (label_dir / image_path.relative_to(image_dir)).with_suffix(".txt")
            if not label_file.is_file():
                continue  # a negative: no objects
            for number, line in enumerate(label_file.read_text().splitlines(), start=1):
                fields = line.split()
                if not fields:
                    continue
                where = f"{label_file} line {number}"
                if len(fields) != 5:
                    problem("wrong number of fields", f"{where}: {len(fields)} fields, expected 5: class cx cy w h")
                    continue
                try:
                    index, cx, cy, w, h = int(fields[0]), *(float(v) for v in fields[1:])
                except ValueError:
                    problem("not a number", f"{where}: not numbers: {line.strip()!r}")
                    continue
                if not 0 <= index < len(class_names):
                    problem("unknown class index", f"{where}: class index {index}, not in 0..{len(class_names) - 1}")
                    continue
                box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
                builder.add_box(image_id, index + 1, box, 0, f"{where} ({class_names[index]!r})")
        stems = {path.relative_to(image_dir).with_suffix("") for path in images}
        for label_file in sorted(label_dir.rglob("*.txt")):
            if label_file.relative_to(label_dir).with_suffix("") not in stems:
                problem("missing image file", f"{label_file}: no image {image_dir / label_file.relative_to(label_dir).with_suffix('')}.<ext>")
        return builder.result(self.describe(split), problem)


# Locating a dataset -----------------------------------------------------------------------------

def annotation_reader(
    format: str,
    root: str | os.PathLike | None = None,
    train_ann: str | os.PathLike | None = None,
    train_images: str | os.PathLike | None = None,
    val_ann: str | os.PathLike | None = None,
    val_images: str | os.PathLike | None = None,
    train_split: str = "train",
    val_split: str = "val",
    class_names: Sequence[str] | None = None,
    strict: bool = False,
    test_split: str | None = None,
    test_ann: str | os.PathLike | None = None,
    test_images: str | os.PathLike | None = None,
) -> AnnotationReader:
    """The reader of a dataset's ``"train"`` and ``"val"`` splits in ``format``, and its ``"test"``
    split where one is named (``test_ann`` [+ ``test_images``] for coco; ``test_split`` for the
    others, or ``test_images`` for voc folders):

    - ``coco``: COCO 2017 under ``root`` (``annotations/instances_{train,val}2017.json``,
      ``{train,val}2017/``), or any json + image directory via ``train_ann`` / ``train_images`` /
      ``val_ann`` / ``val_images`` (each overrides its part of ``root``'s layout).
    - ``voc``: the VOC2007/2012 layout if ``root/Annotations`` exists (``ImageSets/Main/<train_split|
      val_split>.txt``); otherwise folders of pairs: ``train_images`` / ``val_images`` if given,
      else ``root/<train_split>/`` and ``root/<val_split>/``.
    - ``yolo``: ``root/images/<split>/`` + ``root/labels/<split>/`` for ``train_split`` / ``val_split``.

    Errors name what is missing and the layout expected; ``class_names`` is for voc and yolo (COCO
    json files name their categories).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    base = Path(root) if root is not None else None
    splits = {"train": train_split, "val": val_split, **({"test": test_split} if test_split is not None else {})}
    if format == "coco":
        if test_split is not None:
            raise ValueError("test_split names a split of the voc and yolo layouts: give format coco's test split as test_ann / test_images")
        if base is None and (train_ann is None or val_ann is None):
            raise ValueError("give root (COCO 2017 layout) or train_ann/train_images and val_ann/val_images")
        if class_names is not None:
            raise ValueError("class_names is for format voc or yolo: COCO json files name their categories")
        files = {
            "train": (train_ann or base / "annotations" / "instances_train2017.json", train_images or base / "train2017"),
            "val": (val_ann or base / "annotations" / "instances_val2017.json", val_images or base / "val2017"),
        }
        if test_ann is not None:
            if test_images is None and base is None:
                raise ValueError("test_ann needs test_images (or root, whose test2017/ holds the images)")
            files["test"] = (test_ann, test_images or base / "test2017")
        elif test_images is not None:
            raise ValueError("test_images needs test_ann: the COCO json file of the test images")
        hint = f"expected COCO 2017 under {root}: {COCO_LAYOUT}, or pass train_ann / train_images / val_ann / val_images"
        return CocoFiles(files, strict, missing_hint=hint)
    if train_ann is not None or val_ann is not None or test_ann is not None:
        raise ValueError(f"train_ann / val_ann / test_ann are COCO json files; format {format} reads its annotation files from root")
    if format == "yolo":
        if base is None or train_images is not None or val_images is not None or test_images is not None:
            raise ValueError("format yolo needs root (images/<split>/, labels/<split>/) and no train_images / val_images / test_images")
        return YoloLayout(base, splits, class_names, strict)
    if base is not None and (base / "Annotations").is_dir():
        if train_images is not None or val_images is not None or test_images is not None:
            raise ValueError(f"{base} has the Pascal VOC layout (Annotations/): train_images / val_images / test_images are for folders of pairs")
        return VocLayout(base, splits, class_names, strict)
    if base is None and (train_images is None or val_images is None):
        raise ValueError("format voc needs root, or train_images and val_images (folders of <name>.jpg + <name>.xml pairs)")
    train = Path(train_images) if train_images else base / train_split
    val = Path(val_images) if val_images else base / val_split
    if not train.is_dir():
        raise FileNotFoundError(
            f"{train} does not exist; expected Pascal VOC under {base}: the VOC layout ({VOC_LAYOUT}), or folders "
            f"{train_split}/ and {val_split}/ of <name>.jpg + <name>.xml pairs (or pass train_images / val_images)"
            if train_images is None else f"{train} does not exist; expected a folder of <name>.jpg + <name>.xml pairs"
        )
    folders = {"train": train, "val": val}
    if test_images is not None or test_split is not None:
        if test_images is None and base is None:
            raise ValueError("test_split needs root (root/<test_split>/ holds the pairs), or give test_images")
        folders["test"] = Path(test_images) if test_images else base / test_split
    return VocFolders(folders, class_names, strict)
