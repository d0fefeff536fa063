"""Detection annotation readers (COCO json, Pascal VOC XML, YOLO txt) into COCO-format dicts, each file parsed once a run."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tasks.common.data import read_image
from tasks.detection import formats
from tasks.detection.coco_eval import CocoEvaluation
from tasks.detection.data import CocoAnnotations, CocoImages, DetectionDataModule, InvalidAnnotationError
from tasks.detection.formats import VocFolders, VocLayout, YoloLayout, yolo_class_names

DATASETS = Path(os.environ.get("MOBILEONE_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))
FRUITS = DATASETS / "fruits"


def write_image(path: Path, width: int, height: int, seed: int = 0, format: str | None = None) -> np.ndarray:
    """A random RGB image (JPEG for .jpg unless ``format`` says otherwise); returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=format or ("JPEG" if path.suffix == ".jpg" else None))
    return pixels


def write_xml(path: Path, objects: list[tuple], size: tuple[int, int] | None) -> None:
    """Pascal VOC XML; objects are (name, xmin, ymin, xmax, ymax) or (..., difficult)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = ["<annotation>", f"<filename>{path.stem}.jpg</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, xmin, ymin, xmax, ymax, *difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{int(bool(difficult and difficult[0]))}</difficult>"
                     f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    path.write_text("\n".join([*parts, "</annotation>"]))


def boxes_by_file(coco: CocoAnnotations) -> dict[str, tuple[tuple[int, int], list[tuple[str, list[float], int]]]]:
    """file stem -> ((width, height), [(class name, xyxy box, iscrowd)])."""
    return {
        Path(image["file_name"]).stem: (
            (image["width"], image["height"]),
            [(coco.class_names[a["label"] - 1], a["box"], a["iscrowd"]) for a in image["annotations"]],
        )
        for image in coco.images.values()
    }


def read_voc(root: Path, split: str):
    return VocLayout(root, {"train": split}).read("train")


def read_voc_folder(folder: Path, class_names: list[str] | None = None, strict: bool = False):
    return VocFolders({"train": folder}, class_names, strict).read("train")


def read_yolo(root: Path, split: str, class_names: list[str] | None = None, strict: bool = False):
    return YoloLayout(root, {"train": split}, class_names, strict).read("train")


def read(converted, strict: bool = False) -> CocoAnnotations:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoAnnotations.from_converted(converted, strict)


# Pascal VOC --------------------------------------------------------------------------------------

@pytest.fixture
def voc_pairs(tmp_path) -> Path:
    """Pair folders train/ (dog, cat; a difficult cat) and val/ (dog, bird)."""
    root = tmp_path / "voc"
    write_image(root / "train" / "a.jpg", 64, 48, seed=1)
    write_xml(root / "train" / "a.xml", [("dog", 4, 5, 30, 40), ("cat", 10.5, 2, 60, 20, True)], (64, 48))
    write_image(root / "train" / "b.png", 40, 50, seed=2)
    write_xml(root / "train" / "b.xml", [("cat", 0, 0, 40, 50)], (40, 50))
    write_image(root / "val" / "c.jpg", 32, 32, seed=3)
    write_xml(root / "val" / "c.xml", [("dog", 1, 2, 3, 4), ("bird", 5, 5, 9, 9)], (32, 32))
    write_image(root / "val" / "d.jpg", 32, 32, seed=4)
    write_xml(root / "val" / "d.xml", [], (32, 32))
    return root


def test_voc_layout_reads_boxes_labels_sizes(tmp_path):
    root = tmp_path / "VOC2007"
    for name, size, objects in (("000001", (64, 48), [("dog", 4, 5, 30, 40), ("cat", 10, 2, 60, 20)]),
                                ("000002", (40, 50), [("cat", 0, 0, 40, 50)]),
                                ("000003", (32, 32), [("bird", 1, 2, 3, 4)])):
        write_image(root / "JPEGImages" / f"{name}.jpg", *size)
        write_xml(root / "Annotations" / f"{name}.xml", objects, size)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("000003\n")

    converted = read_voc(root, "train")
    assert converted.class_names == ["cat", "dog"], "sorted names of this split's XML"
    assert converted.data["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert [(i["file_name"], i["width"], i["height"]) for i in converted.data["images"]] == [("000001.jpg", 64, 48), ("000002.jpg", 40, 50)]
    assert [a["bbox"] for a in converted.data["annotations"]] == [[4, 5, 26, 35], [10, 2, 50, 18], [0, 0, 40, 50]]
    assert converted.problems == {}
    assert boxes_by_file(read(converted)) == {
        "000001": ((64, 48), [("dog", [4, 5, 30, 40], 0), ("cat", [10, 2, 60, 20], 0)]),
        "000002": ((40, 50), [("cat", [0, 0, 40, 50], 0)]),
    }

    data = DetectionDataModule(root=str(root), format="voc", num_workers=0)
    assert isinstance(data.reader, VocLayout) and data.class_names == ["cat", "dog"] and data.num_classes == 3
    with pytest.warns(UserWarning, match=r"val.txt \(Pascal VOC\): fixed or dropped bad annotations \(unknown class: 1\)"):
        data.setup("validate")
    assert boxes_by_file(data.annotations("val")) == {"000003": ((32, 32), [])}
    assert data.category_ids == {1: 1, 2: 2}


def test_each_annotation_file_is_parsed_once_a_run(tmp_path, voc_pairs, monkeypatch):
    """The class names, fit and a validation after it read each XML and split file once."""
    root = tmp_path / "VOC2007"
    for name in ("000001", "000002", "000003"):
        write_image(root / "JPEGImages" / f"{name}.jpg", 32, 32)
        write_xml(root / "Annotations" / f"{name}.xml", [("cat", 1, 2, 20, 20)], (32, 32))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("000003\n")
    read = []
    monkeypatch.setattr(formats.ET, "parse", lambda path, parse=formats.ET.parse: read.append(Path(path).name) or parse(path))
    monkeypatch.setattr(Path, "read_text", lambda path, *args, text=Path.read_text, **kwargs: read.append(path.name) or text(path, *args, **kwargs))
    for data_root, expected in ((root, ["train.txt", "000001.xml", "000002.xml", "val.txt", "000003.xml"]),
                                (voc_pairs, ["a.xml", "b.xml", "c.xml", "d.xml"])):
        read.clear()
        data = DetectionDataModule(root=str(data_root), format="voc", image_size=32, batch_size=2, num_workers=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for stage in ("fit", "validate"):
                data.setup(stage)
        assert read == expected


def test_voc_pair_folders_and_class_names(voc_pairs):
    converted = read_voc_folder(voc_pairs / "train")
    assert converted.class_names == ["cat", "dog"]
    assert boxes_by_file(read(converted)) == {
        "a": ((64, 48), [("dog", [4, 5, 30, 40], 0), ("cat", [10.5, 2, 60, 20], 1)]),
        "b": ((40, 50), [("cat", [0, 0, 40, 50], 0)]),
    }
    # a user's list: ids 1..K in its order, other classes dropped and counted, or an error naming file and object
    given = read_voc_folder(voc_pairs / "val", class_names=["dog", "cat"])
    assert given.data["categories"] == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]
    assert given.problems == {"unknown class": 1}
    with pytest.warns(UserWarning, match=r"\(unknown class: 1\)") as record:
        coco = CocoAnnotations.from_converted(given)
    assert len(record) == 1
    assert boxes_by_file(coco) == {"c": ((32, 32), [("dog", [1, 2, 3, 4], 0)]), "d": ((32, 32), [])}
    with pytest.raises(InvalidAnnotationError, match=r"val/c.xml: object 2 \('bird'\): unknown class"):
        read_voc_folder(voc_pairs / "val", class_names=["dog", "cat"], strict=True)


def test_voc_difficult_is_crowd(voc_pairs):
    coco = read(read_voc_folder(voc_pairs / "train"))
    identity = lambda image, target: (image, target)  # noqa: E731
    train = {int(t["image_id"]): t for _, t in CocoImages(coco, train=True, transform=identity)}
    evaluation = {int(t["image_id"]): t for _, t in CocoImages(coco, train=False, transform=identity)}
    assert train[1]["iscrowd"].tolist() == [0] and train[1]["boxes"].tolist() == [[4, 5, 30, 40]], "difficult left out of training"
    assert evaluation[1]["iscrowd"].tolist() == [0, 1] and evaluation[1]["boxes"].tolist() == [[4, 5, 30, 40], [10.5, 2, 60, 20]]


def test_voc_size_taken_from_the_image(tmp_path):
    folder = tmp_path / "pairs"
    for name, size in (("missing", None), ("zero", (0, 0)), ("wrong", (100, 100)), ("right", (30, 20))):
        write_image(folder / f"{name}.jpg", 30, 20)
        write_xml(folder / f"{name}.xml", [("a", 25, 2, 29, 19)], size)  # clipped and dropped with the sizes as written
    for strict in (False, True):  # a lossless fix: counted in the warning, never an error
        converted = read_voc_folder(folder, strict=strict)
        assert converted.problems == {"size taken from the image file": 3}
        assert {(i["width"], i["height"]) for i in converted.data["images"]} == {(30, 20)}
        with pytest.warns(UserWarning, match=r"\(size taken from the image file: 3\)"):
            coco = CocoAnnotations.from_converted(converted, strict)
        assert [a["box"] for i in coco.images.values() for a in i["annotations"]] == [[25, 2, 29, 19]] * 4


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_png_named_jpg_reads_as_rgb(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    if mode == "RGBA":
        alpha = np.random.default_rng(1).integers(0, 256, (12, 20, 1), dtype=np.uint8)
        image = Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA")
        expected = rgb  # the stored colours; alpha is dropped (as by torchvision and PIL's convert("RGB"))
    else:
        image = Image.fromarray(rgb).quantize(8)
        expected = np.asarray(image.convert("RGB"))  # the palette's colours
    image.save(tmp_path / "x.jpg", format="PNG")
    write_xml(tmp_path / "x.xml", [("a", 1, 1, 5, 5)], (0, 0))
    tensor = read_image(tmp_path / "x.jpg")
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 12, 20)
    assert np.array_equal(tensor.permute(1, 2, 0).numpy(), expected)
    assert [(i["width"], i["height"]) for i in read_voc_folder(tmp_path).data["images"]] == [(20, 12)]


def test_voc_unreadable_and_unpaired_files(tmp_path):
    folder = tmp_path / "pairs"
    write_image(folder / "good.jpg", 20, 20)
    write_xml(folder / "good.xml", [("a", 1, 1, 5, 5)], (20, 20))
    write_image(folder / "broken.jpg", 20, 20)
    (folder / "broken.xml").write_text("<annotation><object><name>a</name>")
    write_image(folder / "lonely.jpg", 20, 20)
    write_xml(folder / "orphan.xml", [("a", 1, 1, 5, 5)], (20, 20))
    write_image(folder / "odd.jpg", 20, 20)
    write_xml(folder / "odd.xml", [("a", "one", 1, 5, 5), ("a", 2, 2, 6, 6)], (20, 20))
    (folder / "corrupt.jpg").write_bytes(b"not an image")
    write_xml(folder / "corrupt.xml", [("a", 1, 1, 5, 5)], (20, 20))
    converted = read_voc_folder(folder)
    assert converted.problems == {"unreadable XML": 1, "image without annotation file": 1, "missing image file": 1,
                                  "malformed object": 1, "unreadable image file": 1}
    assert sorted(i["file_name"] for i in converted.data["images"]) == ["good.jpg", "odd.jpg"]
    with pytest.raises(InvalidAnnotationError, match=r"broken.xml: unreadable XML"):
        read_voc_folder(folder, strict=True)
    (folder / "broken.xml").unlink()
    (folder / "broken.jpg").unlink()
    with pytest.raises(InvalidAnnotationError, match=r"corrupt.jpg: unreadable image file"):
        read_voc_folder(folder, strict=True)
    (folder / "corrupt.xml").unlink()
    (folder / "corrupt.jpg").unlink()
    with pytest.raises(InvalidAnnotationError, match=r"lonely.jpg: no annotation file .*lonely.xml"):
        read_voc_folder(folder, strict=True)


def test_bad_boxes_one_warning_with_counts(tmp_path):
    folder = tmp_path / "pairs"
    write_image(folder / "x.jpg", 50, 40)
    write_xml(folder / "x.xml", [("a", 10, 10, 10, 20),    # zero width
                                 ("a", 30, 20, 20, 30),    # negative width
                                 ("a", 40, 30, 60, 50),    # partly outside: clipped
                                 ("a", 55, 5, 70, 20),     # fully outside: dropped
                                 ("a", 5, 5, 15, 15)], (50, 40))
    with pytest.warns(UserWarning) as record:
        coco = CocoAnnotations.from_converted(read_voc_folder(folder))
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "(Pascal VOC XML): fixed or dropped bad annotations" in messages[0]
    for kind in ("box clipped to the image: 1", "box outside the image: 1", "zero or negative width/height: 2"):
        assert kind in messages[0]
    assert boxes_by_file(coco)["x"][1] == [("a", [40, 30, 50, 40], 0), ("a", [5, 5, 15, 15], 0)]
    with pytest.raises(InvalidAnnotationError, match=r"x.xml: object 1 \('a'\): bbox \[10.0, 10.0, 0.0, 10.0\] has no area"):
        CocoAnnotations.from_converted(read_voc_folder(folder, strict=True), strict=True)
    write_xml(folder / "x.xml", [("a", 5, 5, 15, 15), ("a", 55, 5, 70, 20)], (50, 40))
    with pytest.raises(InvalidAnnotationError, match=r"x.xml: object 2 \('a'\): bbox .* lies outside the 50x40 image"):
        CocoAnnotations.from_converted(read_voc_folder(folder, strict=True), strict=True)


# YOLO --------------------------------------------------------------------------------------------

def make_yolo(root: Path, names_file: str = "list") -> Path:
    """images/{train,val}, labels/{train,val}; class names as a data.yaml list or dict, or classes.txt."""
    if names_file == "list":
        (root / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
        (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "names": ["cat", "dog"]}))
    elif names_file == "dict":
        (root / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
        (root / "data.yaml").write_text("names:\n  1: dog\n  0: cat\n")
    else:
        (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "classes.txt").write_text("cat\ndog\n\n")
    write_image(root / "images" / "train" / "a.jpg", 64, 32)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n1 0.125 0.25 0.25 0.5\n")
    write_image(root / "images" / "train" / "b.png", 16, 16)
    (root / "labels" / "train" / "b.txt").write_text("1 0.5 0.5 1 1\n")
    write_image(root / "images" / "val" / "c.jpg", 40, 20)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "c.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    write_image(root / "images" / "val" / "empty.jpg", 20, 20)
    (root / "labels" / "val" / "empty.txt").write_text("")
    write_image(root / "images" / "val" / "negative.jpg", 20, 20)  # no label file: no objects
    return root


@pytest.mark.parametrize("names_file", ["list", "dict", "classes.txt"])
def test_yolo_reads_names_and_pixel_boxes(tmp_path, names_file):
    root = make_yolo(tmp_path / "yolo", names_file)
    assert yolo_class_names(root) == ["cat", "dog"]
    converted = read_yolo(root, "train")
    assert converted.data["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert [a["bbox"] for a in converted.data["annotations"]] == [[24.0, 8.0, 16.0, 16.0], [0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 16.0, 16.0]]
    assert boxes_by_file(read(converted)) == {
        "a": ((64, 32), [("cat", [24, 8, 40, 24], 0), ("dog", [0, 0, 16, 16], 0)]),
        "b": ((16, 16), [("dog", [0, 0, 16, 16], 0)]),
    }
    val = read(read_yolo(root, "val", class_names=["cat", "dog"]))
    assert boxes_by_file(val) == {"c": ((40, 20), [("dog", [10, 5, 30, 15], 0)]), "empty": ((20, 20), []), "negative": ((20, 20), [])}
    assert val.problems == {}


def test_yolo_bad_lines_counted_or_raised(tmp_path):
    root = make_yolo(tmp_path / "yolo")
    (root / "labels" / "train" / "a.txt").write_text(
        "0 0.5 0.5 0.25 0.5\n"
        "0 0.5 0.5 0.25\n"        # 4 fields
        "\n"                      # blank lines are skipped
        "1 0.5 x 0.25 0.5\n"      # not a number
        "2 0.5 0.5 0.25 0.5\n"    # class index 2 of 2 names
        "0 0.5 0.5 0 0.5\n"       # zero width: the COCO cleaning drops it
    )
    (root / "labels" / "train" / "gone.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    converted = read_yolo(root, "train")
    assert converted.problems == {"wrong number of fields": 1, "not a number": 1, "unknown class index": 1, "missing image file": 1}
    with pytest.warns(UserWarning) as record:
        coco = CocoAnnotations.from_converted(converted)
    assert len(record) == 1
    assert ("labels/train (YOLO): fixed or dropped bad annotations (missing image file: 1, not a number: 1, unknown class index: 1, "
            "wrong number of fields: 1, zero or negative width/height: 1)") in str(record[0].message)
    assert boxes_by_file(coco)["a"][1] == [("cat", [24, 8, 40, 24], 0)]
    with pytest.raises(InvalidAnnotationError, match=r"labels/train/a.txt line 2: 4 fields, expected 5"):
        read_yolo(root, "train", strict=True)
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n\n\n0 0.5 0.5 0 0.5\n")
    (root / "labels" / "train" / "gone.txt").unlink()
    with pytest.raises(InvalidAnnotationError, match=r"labels/train/a.txt line 4 \('cat'\): bbox .* has no area"):
        CocoAnnotations.from_converted(read_yolo(root, "train", strict=True), strict=True)


# The data module ---------------------------------------------------------------------------------

def check_data_module(data: DetectionDataModule, class_names: list[str]) -> None:
    assert data.class_names == class_names and data.num_classes == len(class_names) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.setup("fit")
    images, targets = next(iter(data.train_dataloader()))
    assert len(images) == 2 and all(i.shape == (3, 32, 32) and i.dtype == torch.float32 for i in images)
    assert all(len(t["boxes"]) == len(t["labels"]) and set(t["labels"].tolist()) <= set(range(1, data.num_classes)) for t in targets)
    val = [data.val_dataset[i][1] for i in range(len(data.val_dataset))]
    assert sum(len(t["boxes"]) for t in val) > 0 and all(t["boxes"].shape[1:] == (4,) for t in val)
    assert data.category_ids == {label: label for label in range(1, data.num_classes)}


def test_data_module_voc_pairs(voc_pairs):
    data = DetectionDataModule(root=str(voc_pairs), format="voc", image_size=32, batch_size=2, num_workers=0)
    check_data_module(data, ["cat", "dog"])
    assert [t["labels"].tolist() for _, t in data.val_dataset] == [[2], []], "bird is not a training class"
    explicit = DetectionDataModule(format="voc", train_images=str(voc_pairs / "train"), val_images=str(voc_pairs / "val"),
                             class_names=["bird", "cat", "dog"], image_size=32, batch_size=2, num_workers=0)
    check_data_module(explicit, ["bird", "cat", "dog"])
    assert [t["labels"].tolist() for _, t in explicit.val_dataset] == [[3, 1], []]


def test_data_module_yolo(tmp_path):
    data = DetectionDataModule(root=str(make_yolo(tmp_path / "yolo", "dict")), format="yolo", image_size=32, batch_size=2, num_workers=0)
    check_data_module(data, ["cat", "dog"])
    assert len(data.val_dataset) == 3, "negatives stay in validation"


def test_wrong_layouts_name_what_is_missing(tmp_path):
    expected = r"voc/train does not exist; expected Pascal VOC under .*Annotations/<id>.xml.*train/ and val/ of <name>.jpg \+ <name>.xml pairs"
    with pytest.raises(FileNotFoundError, match=expected):
        DetectionDataModule(root=str(tmp_path / "voc"), format="voc")
    (tmp_path / "voc2007" / "Annotations").mkdir(parents=True)
    (tmp_path / "voc2007" / "JPEGImages").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/train.txt does not exist; expected the Pascal VOC layout under"):
        DetectionDataModule(root=str(tmp_path / "voc2007"), format="voc")
    with pytest.raises(FileNotFoundError, match=r"yolo/images/train does not exist; expected the YOLO layout under .*labels/<split>/<name>.txt"):
        DetectionDataModule(root=str(tmp_path / "yolo"), format="yolo")
    root = make_yolo(tmp_path / "yolo")
    (root / "data.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither .*data.yaml nor .*classes.txt exists"):
        DetectionDataModule(root=str(root), format="yolo")
    assert DetectionDataModule(root=str(root), format="yolo", class_names=["cat", "dog"]).num_classes == 3
    with pytest.raises(ValueError, match="class_names is for format voc or yolo"):
        DetectionDataModule(root=str(tmp_path), class_names=["a"])


def test_perfect_detections_of_voc_score_one_and_difficult_is_ignored(voc_pairs):
    write_xml(voc_pairs / "val" / "d.xml", [("cat", 2, 2, 20, 20, True), ("cat", 10, 12, 30, 31)], (32, 32))
    data = DetectionDataModule(root=str(voc_pairs), format="voc", num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.setup("validate")
    assert sorted(t["iscrowd"].tolist() for _, t in data.val_dataset) == [[0], [1, 0]]
    for detect_difficult in (False, True):
        metric = CocoEvaluation()
        for _, target in data.val_dataset:
            found = torch.ones_like(target["iscrowd"], dtype=torch.bool) if detect_difficult else target["iscrowd"] == 0
            metric.update([{"boxes": target["boxes"][found], "labels": target["labels"][found], "scores": torch.ones(int(found.sum()))}], [target])
        assert float(metric.compute()["map"]) == 1.0


# Real data ---------------------------------------------------------------------------------------

def test_fruits_voc_as_published_equals_its_coco_conversion():
    """``fruits/voc`` as published (PNG files named .jpg, sizes 0x0) reads into the same images,
    sizes, boxes and labels as ``fruits/coco``, the same set converted. Skipped where the real sets
    are absent (a user's clone), unless ``MOBILEONE_REQUIRE_DATASETS=1`` (CI), which fails instead."""
    if not FRUITS.is_dir():
        message = f"the real data sets are absent: no {FRUITS} (../shared/datasets beside the repository, or MOBILEONE_DATASETS)"
        if os.environ.get("MOBILEONE_REQUIRE_DATASETS") == "1":
            pytest.fail(f"MOBILEONE_REQUIRE_DATASETS=1 but {message}")
        pytest.skip(message)
    data = DetectionDataModule(root=str(FRUITS / "voc"), format="voc", num_workers=0)
    assert data.class_names == ["apple", "banana", "orange"]
    png_as_jpg = 0
    for split in ("train", "val"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            voc = data.annotations(split)
            coco = CocoAnnotations(FRUITS / "coco" / "annotations" / f"instances_{split}.json", FRUITS / "coco" / "images")
        assert set(voc.problems) <= {"size taken from the image file"} and not coco.problems, [str(w.message) for w in caught]
        voc_boxes, coco_boxes = boxes_by_file(voc), boxes_by_file(coco)
        assert sorted(voc_boxes) == sorted(coco_boxes) and len(voc_boxes) == {"train": 240, "val": 60}[split]
        for stem, (size, objects) in coco_boxes.items():
            assert voc_boxes[stem][0] == size, stem
            expected, found = sorted(objects), sorted(voc_boxes[stem][1])
            assert [(name, crowd) for name, _, crowd in found] == [(name, crowd) for name, _, crowd in expected], stem
            assert np.allclose([box for _, box, _ in found], [box for _, box, _ in expected], rtol=0, atol=1e-3), stem
        for image in voc.images.values():
            path = voc.image_dir / image["file_name"]
            with open(path, "rb") as handle:
                if handle.read(8) != b"\x89PNG\r\n\x1a\n":
                    continue
            png_as_jpg += 1
            assert read_image(path).shape == (3, image["height"], image["width"]), path
    assert png_as_jpg > 0, "the published set has PNG files named .jpg"
