"""Detection annotation formats besides COCO json, converted in memory to COCO-format dicts.

Each reader returns ``ConvertedAnnotations``: a COCO-format dict (``images`` with ``id``,
``file_name`` relative to ``image_dir``, ``width``, ``height``; ``annotations`` with ``id``,
``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``area``, ``iscrowd``; ``categories`` with
``id`` 1..K, ``name``), so that ``CocoAnnotations`` cleans the boxes and pycocotools evaluates
every format alike. Each annotation also carries ``origin`` (the file and object or line it came
from), which ``CocoAnnotations`` names in its messages.

The readers count their own problems per kind in ``problems`` (they warn nothing themselves:
``CocoAnnotations`` reports them in its one warning, with the box problems), or with ``strict``
raise ``InvalidAnnotationError`` naming the file and object or line. Image sizes are always read
from the image files' headers (not a full decode).

- Pascal VOC XML (``read_voc``: the VOC2007/2012 layout; ``read_voc_folder``: a folder of
  ``<name>.<ext>`` + ``<name>.xml`` pairs, as LabelImg exports): ``bbox`` is ``[xmin, ymin,
  xmax - xmin, ymax - ymin]`` as written (no -1 shift); ``<difficult>1</difficult>`` becomes
  ``iscrowd: 1`` (left out of training targets, ignored by the evaluation).
- YOLO txt (``read_yolo``): ``images/<split>/<name>.<ext>`` + ``labels/<split>/<name>.txt``, one
  ``class cx cy w h`` line an object, normalized to [0, 1]; an image without a label file, or
  with an empty one, is an image without objects (YOLO's negatives).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from tasks.common.data import IMAGE_EXTENSIONS, list_images

__all__ = [
    "ConvertedAnnotations",
    "InvalidAnnotationError",
    "read_voc",
    "read_voc_folder",
    "read_yolo",
    "voc_annotation_files",
    "voc_class_names",
    "yolo_class_names",
]

VOC_LAYOUT = "Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt (one <id> a line)"
YOLO_LAYOUT = "images/<split>/<name>.jpg, labels/<split>/<name>.txt (class cx cy w h a line), data.yaml (names:) or classes.txt"


class InvalidAnnotationError(ValueError):
    """An annotation that cannot be used (with ``strict=True``), or an annotation file that cannot be
    read at all (e.g. invalid JSON), or an image whose size is not its annotation's; the message names
    the file and the object."""


@dataclass
class ConvertedAnnotations:
    """A COCO-format dict read from another format, the directory its ``file_name``s are relative
    to, a description of the source (for messages), and the problems counted per kind."""

    data: dict[str, list[dict[str, Any]]]
    image_dir: Path
    source: str
    problems: dict[str, int] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in sorted(self.data["categories"], key=lambda c: c["id"])]


class _Problems(Counter):
    """Counts problems per kind, or with ``strict`` raises ``InvalidAnnotationError(detail)``."""

    def __init__(self, strict: bool) -> None:
        super().__init__()
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


# Pascal VOC XML ---------------------------------------------------------------------------------

def voc_annotation_files(root: str | os.PathLike, split: str) -> list[Path]:
    """The XML files of a split of the VOC2007/2012 layout (``ImageSets/Main/<split>.txt``)."""
    return [Path(root) / "Annotations" / f"{name}.xml" for name in _voc_split_ids(Path(root), split)]


def voc_class_names(xml_files: Iterable[str | os.PathLike]) -> list[str]:
    """The sorted union of the objects' ``<name>`` values (unreadable files are skipped: the readers report them)."""
    names = set()
    for path in xml_files:
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            continue
        names.update(name.strip() for name in (o.findtext("name") for o in root.findall("object")) if name and name.strip())
    return sorted(names)


def _voc_split_ids(root: Path, split: str) -> list[str]:
    for required in (root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main" / f"{split}.txt"):
        if not required.exists():
            raise FileNotFoundError(f"{required} does not exist; expected the Pascal VOC layout under {root}: {VOC_LAYOUT}")
    lines = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def read_voc(
    root: str | os.PathLike,
    split: str,
    class_names: Sequence[str] | None = None,
    strict: bool = False,
) -> ConvertedAnnotations:
    """A split of the VOC2007/2012 layout: ``Annotations/<id>.xml``, ``JPEGImages/<id>.<ext>``,
    ``ImageSets/Main/<split>.txt``. See ``read_voc_folder`` for class names and problems."""
    root = Path(root)
    entries = []
    for name in _voc_split_ids(root, split):
        xml = root / "Annotations" / f"{name}.xml"
        entries.append((name, xml if xml.is_file() else None, xml))
    return _read_voc(entries, root / "JPEGImages", f"{root / 'ImageSets' / 'Main' / split}.txt (Pascal VOC)", class_names, strict)


def read_voc_folder(
    folder: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    strict: bool = False,
) -> ConvertedAnnotations:
    """A folder of ``<name>.<ext>`` images and ``<name>.xml`` Pascal VOC files (LabelImg's and
    CVAT's export).

    Categories: ``class_names`` (ids 1..K in that order; an object of another class is a problem,
    "unknown class"), or the sorted names found in these files. Problems, dropped and counted or
    with ``strict`` raised: "unreadable XML" (the image is dropped), "malformed object" (no name or
    no numeric ``bndbox``), "unknown class", "image without annotation file", "missing image
    file", "unreadable image file". An XML whose ``<size>`` is missing, 0x0 or not the image's gets the image file's size,
    counted as "size taken from the image file" (a lossless fix: counted, never raised, also with
    ``strict``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; expected a folder of <name>.jpg + <name>.xml pairs (Pascal VOC XML)")
    stems = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() == ".xml" or path.suffix.lower() in IMAGE_EXTENSIONS:
            stems.setdefault(path.stem, path.with_suffix(".xml"))
    entries = [(stem, xml if xml.is_file() else None, xml) for stem, xml in stems.items()]
    return _read_voc(entries, folder, f"{folder} (Pascal VOC XML)", class_names, strict)


def _read_voc(
    entries: list[tuple[str, Path | None, Path]],
    image_dir: Path,
    source: str,
    class_names: Sequence[str] | None,
    strict: bool,
) -> ConvertedAnnotations:
    """``entries``: (name, its XML file or None, where the XML was expected)."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image directory {image_dir} does not exist")
    if class_names is None:
        class_names = voc_class_names(xml for _, xml, _ in entries if xml is not None)
    category_ids = {name: i + 1 for i, name in enumerate(class_names)}
    builder = _Builder(class_names, image_dir)
    problem = _Problems(strict)
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
        image_id = builder.add_image(image_path, width, height)
        for number, element in enumerate(root.findall("object"), start=1):
            label = (element.findtext("name") or "").strip()
            where = f"{xml}: object {number} ({label!r})"
            try:
                xmin, ymin, xmax, ymax = (float(element.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                problem("malformed object", f"{where}: no numeric <bndbox> xmin, ymin, xmax, ymax")
                continue
            if not label:
                problem("malformed object", f"{where}: no <name>")
                continue
            if label not in category_ids:
                problem("unknown class", f"{where}: unknown class, not one of {list(class_names)}")
                continue
            difficult = (element.findtext("difficult") or "0").strip().lower() in ("1", "true")
            builder.add_box(image_id, category_ids[label], [xmin, ymin, xmax - xmin, ymax - ymin], int(difficult), where)
    return builder.result(source, problem)


def _int(text: str | None) -> int | None:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


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


def read_yolo(
    root: str | os.PathLike,
    split: str,
    class_names: Sequence[str] | None = None,
    strict: bool = False,
) -> ConvertedAnnotations:
    """A split of a YOLO dataset: ``images/<split>/<name>.<ext>`` (also in subfolders) and
    ``labels/<split>/<name>.txt``.

    Categories: ``class_names`` in class-index order, else ``yolo_class_names(root)``; class index
    i is category id i + 1. Boxes become pixels from the image sizes. Problems, dropped and counted
    or with ``strict`` raised naming the file and line: "wrong number of fields", "not a number",
    "unknown class index", "missing image file" (a label file without its image), "unreadable image
    file".
    """
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    for required in (image_dir, label_dir):
        if not required.is_dir():
            raise FileNotFoundError(f"{required} does not exist; expected the YOLO layout under {root}: {YOLO_LAYOUT}")
    if class_names is None:
        class_names = yolo_class_names(root)
    builder = _Builder(class_names, image_dir)
    problem = _Problems(strict)
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
    return builder.result(f"{label_dir} (YOLO)", problem)
