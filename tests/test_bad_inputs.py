"""Bad inputs get errors naming the file and what was wrong, or counted warnings: truncated masks,
malformed or unusable COCO json, image sizes that disagree with the json, deep / unusual image modes
in every task's predict dataset, empty class folders, and skipped unreadable images counted across
worker processes. Small generated data in real on-disk formats."""

import json
import struct
import warnings
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from tasks.classification.data import ImageFolderDataModule, make_demo_dataset
from tasks.classification.module import ImageClassificationTask
from tasks.common.data import CorruptImageError, PredictImages, read_image
from tasks.detection.data import CocoAnnotations, DetectionDataModule, InvalidAnnotationError
from tasks.segmentation.data import SegmentationDataModule

# --- helpers ---------------------------------------------------------------------------------------


def write_png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit PNG (grayscale, gray + alpha, RGB or RGBA by the channel count), written by hand:
    PIL writes 16-bit PNGs only for grayscale."""
    if values.ndim == 2:
        values = values[..., None]
    height, width, channels = values.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def deep_and_odd_images(folder: Path) -> dict[str, np.ndarray]:
    """Images in deep and unusual modes, and the 8-bit RGB (H, W, 3) each must read as."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (12, 16), dtype=np.uint8)
    rgba8 = rng.integers(0, 256, (12, 16, 4), dtype=np.uint8)
    as_rgb = lambda gray: np.repeat(gray[..., None], 3, axis=2)  # noqa: E731
    expected = {}
    Image.fromarray(gray8.astype(np.uint16) * 257).save(folder / "gray16.png")  # PIL mode I;16
    expected["gray16.png"] = as_rgb(gray8)
    Image.fromarray(gray8.astype(np.uint16) * 257).save(folder / "gray16.tif")  # I;16, read by PIL
    expected["gray16.tif"] = as_rgb(gray8)
    (folder / "gray16.pgm").write_bytes(b"P5\n16 12\n65535\n" + (gray8.astype(">u2") * 257).tobytes())  # PIL mode I
    expected["gray16.pgm"] = as_rgb(gray8)
    Image.fromarray(gray8.astype(np.float32) / 255).save(folder / "float.tif")  # PIL mode F, 0..1
    expected["float.tif"] = as_rgb(gray8)
    write_png16(folder / "rgb16.png", rgba8[..., :3].astype(np.uint16) * 257)
    expected["rgb16.png"] = rgba8[..., :3]
    write_png16(folder / "rgba16.png", rgba8.astype(np.uint16) * 257)
    expected["rgba16.png"] = rgba8[..., :3]
    write_png16(folder / "gray_alpha16.png", rgba8[..., :2].astype(np.uint16) * 257)
    expected["gray_alpha16.png"] = as_rgb(rgba8[..., 0])
    Image.fromarray(rgba8, "RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = rgba8[..., :3]
    Image.fromarray(rgba8[..., :2], "LA").save(folder / "la.png")
    expected["la.png"] = as_rgb(rgba8[..., 0])
    palette = Image.fromarray(rgba8[..., :3]).quantize(16)
    palette.save(folder / "palette.png")
    expected["palette.png"] = np.asarray(palette.convert("RGB"))
    cmyk = Image.fromarray(rgba8, "CMYK")
    cmyk.save(folder / "cmyk.tif")
    expected["cmyk.tif"] = np.asarray(cmyk.convert("RGB"))
    return expected


def write_coco(root: Path, images: list[dict], annotations: list[dict], sizes: dict[str, tuple[int, int]] | None = None) -> Path:
    """``root/ann.json`` and ``root/imgs/<file_name>`` (PNG, the json's size unless ``sizes`` says otherwise)."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for image in images:
        width, height = (sizes or {}).get(image["file_name"], (image["width"], image["height"]))
        Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(root / "imgs" / image["file_name"])
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}, indent=1))
    return path


def coco_module(ann: Path, strict: bool = False) -> DetectionDataModule:
    return DetectionDataModule(train_ann=str(ann), train_images=str(ann.parent / "imgs"), val_ann=str(ann),
                         val_images=str(ann.parent / "imgs"), num_workers=0, strict=strict)


IMAGES = [{"id": 1, "file_name": "1.png", "width": 40, "height": 30}, {"id": 2, "file_name": "2.png", "width": 40, "height": 30}]


# --- 1. segmentation: truncated mask ---------------------------------------------------------------


def test_truncated_mask_names_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    mask = tmp_path / "masks" / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 3, (64, 64), dtype=np.uint8), mode="L").save(mask)
    mask.write_bytes(mask.read_bytes()[:-40])  # cut inside the image data
    data = SegmentationDataModule(format="folder", images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                                  val_images=str(tmp_path / "images"),
                              val_masks=str(tmp_path / "masks"), num_classes=3, num_workers=0)
    data.setup("validate")
    message = r"cannot decode mask file .*masks/a.png: .*; expected a complete palette or grayscale PNG"
    with pytest.raises(CorruptImageError, match=message) as caught:
        data.val_dataset[0]
    print(caught.value)


# --- 2-6. detection: COCO json ---------------------------------------------------------------------


def test_malformed_json_names_file_line_and_column(tmp_path):
    ann = write_coco(tmp_path, IMAGES, [])
    text = ann.read_text()
    ann.write_text(text.replace('"width": 40,', '"width": 40', 1))  # a missing comma at the end of line 6: the parser stops at line 7
    message = r"ann.json: invalid JSON at line 7, column 4: Expecting ',' delimiter: .*<here>.*expected a COCO-format JSON object"
    for read in (lambda: coco_module(ann), lambda: CocoAnnotations(ann, tmp_path / "imgs")):
        with pytest.raises(InvalidAnnotationError, match=message) as caught:
            read()
    print(caught.value)
    ann.write_text("")
    with pytest.raises(InvalidAnnotationError, match=r"ann.json: the file is empty"):
        coco_module(ann)
    ann.write_text("[]")
    with pytest.raises(InvalidAnnotationError, match=r"ann.json: the top level is a JSON array; expected a COCO-format JSON object"):
        coco_module(ann)


def test_no_usable_training_box_names_the_json_and_counts(tmp_path):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 10, 10], "iscrowd": 0},  # unknown category
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 1},  # crowd only
    ]
    data = coco_module(write_coco(tmp_path, IMAGES, annotations))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InvalidAnnotationError, match=(
            r"ann.json: no image has a usable \(non-crowd\) box to train on \(read 2 images and 2 annotations; kept 2 images "
            r"and 1 boxes \(1 crowd\); dropped 0 annotations with their images; problems: unknown category id: 1\)"
        )) as caught:
            data.setup("fit")
    print(caught.value)


def test_annotation_without_bbox_is_dropped_and_counted_or_raised(tmp_path):
    annotations = [
        {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0},                          # no bbox
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 1, "x", 2], "iscrowd": 0},  # not numbers
        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},
    ]
    ann = write_coco(tmp_path, IMAGES, annotations)
    with pytest.warns(UserWarning, match=r"ann.json: fixed or dropped bad annotations \(missing or malformed bbox: 2\)") as record:
        coco = CocoAnnotations(ann, tmp_path / "imgs")
    print(record[0].message)
    assert [a["box"] for a in coco.images[1]["annotations"]] == [[1.0, 1.0, 11.0, 11.0]]
    with pytest.raises(InvalidAnnotationError, match=r"ann.json: annotation id 7: no bbox; expected bbox \[x, y, width, height\]") as caught:
        CocoAnnotations(ann, tmp_path / "imgs", strict=True)
    print(caught.value)


def test_annotation_of_an_unknown_image_is_counted_or_raised(tmp_path):
    annotations = [
        {"id": 3, "image_id": 99, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},  # no such image
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},
    ]
    ann = write_coco(tmp_path, IMAGES, annotations)
    with pytest.warns(UserWarning, match=r"ann.json: fixed or dropped bad annotations \(unknown image id: 1\)") as record:
        coco = CocoAnnotations(ann, tmp_path / "imgs")
    print(record[0].message)
    assert coco.counts["boxes kept"] == 1
    with pytest.raises(InvalidAnnotationError, match=r"ann.json: annotation id 3: image_id 99 is not the id of any of the 2 images") as caught:
        CocoAnnotations(ann, tmp_path / "imgs", strict=True)
    print(caught.value)


def test_image_size_not_the_jsons_is_an_error_naming_both_sizes(tmp_path):
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},
                   {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0}]
    data = coco_module(write_coco(tmp_path, IMAGES, annotations, sizes={"1.png": (80, 60), "2.png": (30, 40)}))
    data.setup("fit")
    index = {image_id: i for i, image_id in enumerate(data.train_dataset.ids)}
    with pytest.raises(InvalidAnnotationError, match=(
        r"imgs/1.png is 80x60 \(WxH\) but .*ann.json gives image id 1 width 40, height 30; its boxes are in the json's frame"
    )) as caught:
        data.train_dataset[index[1]]
    print(caught.value)
    with pytest.raises(InvalidAnnotationError, match=r"imgs/2.png is 30x40 .*width and height swapped: an EXIF rotation\?"):
        data.val_dataset[index[2]]


# --- 7. one image reader: deep and unusual modes in every task's predict dataset -------------------


def test_read_image_gives_8bit_rgb_for_every_mode(tmp_path):
    expected = deep_and_odd_images(tmp_path)
    for name, rgb in expected.items():
        image = read_image(tmp_path / name)
        assert image.dtype == torch.uint8 and image.shape == (3, 12, 16), name
        assert np.array_equal(image.permute(1, 2, 0).numpy(), rgb), name
    values = np.array([[0, 128, 129, 255, 256, 32767, 65407, 65535]], dtype=np.uint16)  # round(v / 257)
    write_png16(tmp_path / "rounding.png", values)
    assert read_image(tmp_path / "rounding.png")[0].tolist() == [[0, 0, 1, 1, 1, 127, 255, 255]]


def test_every_predict_dataset_reads_deep_images_as_8bit(tmp_path):
    folder = tmp_path / "predict"
    expected = deep_and_odd_images(folder)
    root = tmp_path / "cls"
    (root / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "train" / "a" / "x.png")
    classification = ImageFolderDataModule(str(root), predict_dir=str(folder), eval_resize=12, eval_image_size=12, num_workers=0)
    classification.setup("predict")
    segmentation = SegmentationDataModule(format="folder", images=str(folder), masks=str(folder), num_classes=2, predict_dir=str(folder),
                                          num_workers=0)
    segmentation.setup("predict")
    datasets = {
        "classification": (classification.predict_dataset, classification.eval_transform()),
        "segmentation": (segmentation.predict_dataset, segmentation.eval_transform()),
        "detection": (PredictImages(folder, v2.ToDtype(torch.float32, scale=True)),  # what DetectionDataModule reads predict_dir with
                      lambda image: v2.functional.to_dtype(image, torch.float32, scale=True)),
    }
    for task, (dataset, transform) in datasets.items():
        assert isinstance(dataset, PredictImages) and len(dataset) == len(expected), task
        for index in range(len(dataset)):
            sample = dataset[index]
            name = Path(sample[1]["path"]).name
            assert sample[1]["size"] == expected[name].shape[:2] and sample[1]["input_size"] == tuple(sample[0].shape[-2:]), (task, name)
            want = transform(tv_tensors.Image(torch.from_numpy(expected[name].copy()).permute(2, 0, 1))).as_subclass(torch.Tensor)
            assert torch.equal(sample[0], want), (task, name)


# --- 8-9. classification: empty class folders, skipped images ---------------------------------------


def test_empty_class_folder_is_an_error_in_training_and_a_warning_in_validation(tmp_path):
    root = make_demo_dataset(tmp_path / "shapes", train_per_class=2, val_per_class=1, size=24)
    for image in (root / "val" / "cross").iterdir():
        image.unlink()
    data = ImageFolderDataModule(str(root), num_workers=0)
    message = r"val: 1 class \(cross\) without image files .*: those classes are not evaluated"
    with pytest.warns(UserWarning, match=message) as record:
        data.setup("validate")
    print(record[0].message)
    for name in ("circle", "square", "stripes", "triangle"):  # many empty folders: a count and the first few names
        for image in (root / "val" / name).iterdir():
            image.unlink()
    (root / "val" / "cross" / "one.jpg").write_bytes((root / "train" / "cross").glob("*").__next__().read_bytes())
    with pytest.warns(UserWarning, match=r"val: 4 classes \(circle, square, stripes, triangle\) without") as record:
        data.setup("validate")
    assert len(str(record[0].message)) < 300
    from tasks.classification.data import _count_and_first

    assert _count_and_first([f"n{i:05d}" for i in range(500)], "class folder") == (
        "500 class folders (the first 5: n00000, n00001, n00002, n00003, n00004, ...)")
    for image in (root / "train" / "cross").iterdir():
        image.unlink()
    (root / "train" / "cross" / "notes.txt").write_text("not an image")
    message = r"train: 1 class \(cross\) without image files \(.jpg, .*\); every training class needs images"
    with pytest.raises(FileNotFoundError, match=message) as caught:
        data.setup("fit")
    print(caught.value)


def corrupt(path: Path) -> None:
    path.write_bytes(b"\xff\xd8 not a jpeg")


def test_skipped_images_are_totalled_over_workers_each_epoch(tmp_path):
    root = make_demo_dataset(tmp_path / "shapes", train_per_class=4, val_per_class=2, size=32)
    bad_train = [root / "train" / "circle" / "00000.jpg", root / "train" / "square" / "00001.jpg", root / "train" / "triangle" / "00002.jpg"]
    for path in bad_train + [root / "val" / "cross" / "00000.jpg"]:
        corrupt(path)
    data = ImageFolderDataModule(str(root), batch_size=4, num_workers=2, persistent_workers=False, image_size=32,
                                 eval_resize=32, eval_image_size=32, skip_corrupt=True)
    model = ImageClassificationTask(num_classes=5, lr=0.01)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.warns(UserWarning) as record:
        trainer.fit(model, datamodule=data)
    totals = [str(w.message) for w in record if "unreadable image(s)" in str(w.message)]
    print("\n".join(totals))
    assert len(totals) == 4, totals  # one per epoch and dataset, nothing left for teardown
    for epoch in (0, 1):
        (train,) = [t for t in totals if f"in training epoch {epoch}" in t]
        assert train.startswith(f"{root / 'train'}: skip_corrupt skipped 3 unreadable image(s) in training epoch {epoch}: ")
        assert sorted(train.split(": ")[-1].split(", ")) == sorted(map(str, bad_train))
        (val,) = [t for t in totals if f"in validation (epoch {epoch})" in t]
        bad_val = root / "val" / "cross" / "00000.jpg"
        assert val == f"{root / 'val'}: skip_corrupt skipped 1 unreadable image(s) in validation (epoch {epoch}): {bad_val}"


def test_predict_skips_unreadable_images_and_reports_them(tmp_path):
    root = make_demo_dataset(tmp_path / "shapes", train_per_class=1, val_per_class=1, size=32)
    folder = tmp_path / "predict"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    corrupt(folder / "1.png")
    model = ImageClassificationTask(num_classes=5)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    strict = ImageFolderDataModule(str(root), batch_size=1, num_workers=0, eval_resize=32, eval_image_size=32, predict_dir=str(folder))
    with pytest.raises(CorruptImageError, match=r"1.png"):
        trainer.predict(model, datamodule=strict)
    lenient = ImageFolderDataModule(str(root), batch_size=1, num_workers=0, eval_resize=32, eval_image_size=32,
                                    predict_dir=str(folder), skip_corrupt=True)
    message = r"predict: skip_corrupt skipped 1 unreadable image\(s\) in predict \(left out of the predictions\): .*1.png"
    with pytest.warns(UserWarning, match=message) as record:
        predictions = trainer.predict(model, datamodule=lenient)
    print([str(w.message) for w in record if "unreadable image(s)" in str(w.message)])
    assert [Path(row["path"]).name for batch in predictions for row in batch] == ["0.png", "2.png"]


def _detection_case(tmp_path: Path):
    from tasks.detection.data import make_demo_coco
    from tasks.detection.module import ObjectDetectionTask

    root = make_demo_coco(tmp_path / "coco", train_images=6, val_images=3, size=64)
    bad = [root / "train2017" / sorted(p.name for p in (root / "train2017").iterdir())[1],
           root / "val2017" / sorted(p.name for p in (root / "val2017").iterdir())[0]]

    def data(**kwargs):
        return DetectionDataModule(root=str(root), image_size=64, batch_size=3, val_batch_size=2, num_workers=2,
                             persistent_workers=False, **kwargs)

    def model():
        return ObjectDetectionTask("mobileone_s0", num_classes=4, image_size=64, backbone_kwargs={"num_blocks_per_stage": [1, 1, 1, 1]})
    return bad, data, model


def _segmentation_case(tmp_path: Path):
    from tasks.segmentation.module import SemanticSegmentationTask

    root = tmp_path / "scenes"
    for split, count in (("train", 6), ("val", 3)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            labels = np.zeros((48, 64), dtype=np.uint8)
            labels[16:32] = 1
            Image.fromarray(np.full((48, 64, 3), 40 * i, dtype=np.uint8)).save(root / split / "images" / f"{split}{i}.jpg")
            Image.fromarray(labels, mode="L").save(root / split / "masks" / f"{split}{i}.png")
    (root / "classes.json").write_text(json.dumps(["road", "car"]))
    bad = [root / "train" / "images" / "train1.jpg", root / "val" / "images" / "val0.jpg"]

    def data(**kwargs):
        return SegmentationDataModule(str(root), "folder", crop_size=32, batch_size=3, val_batch_size=2, num_workers=2,
                                  persistent_workers=False, **kwargs)

    def model():
        return SemanticSegmentationTask("mobileone_s0", num_classes=2, backbone_kwargs={"num_blocks_per_stage": [1, 1, 1, 1]})
    return bad, data, model


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_skip_corrupt_is_the_same_policy_in_every_task(task, tmp_path):
    """As in classification: an unreadable image is an error naming it, or with skip_corrupt it is
    left out of training and evaluation and totalled in one warning per epoch and split."""
    # batches of 3: the one holding the bad training image keeps 2 (BatchNorm after a 1x1 pooling needs 2)
    bad, data, model = (_detection_case if task == "detection" else _segmentation_case)(tmp_path)
    for path in bad:
        corrupt(path)

    def trainer():
        return pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(CorruptImageError, match=bad[0].name):
        trainer().fit(model(), datamodule=data())
    with pytest.warns(UserWarning) as record:
        trainer().fit(model(), datamodule=data(skip_corrupt=True))
    totals = [str(w.message) for w in record if "unreadable image(s)" in str(w.message)]
    print("\n".join(totals))
    assert len(totals) == 2, totals
    (train,) = [t for t in totals if "in training epoch 0" in t]
    (val,) = [t for t in totals if "in validation (epoch 0)" in t]
    assert train.endswith(f"skip_corrupt skipped 1 unreadable image(s) in training epoch 0: {bad[0]}")
    assert val.endswith(f"skip_corrupt skipped 1 unreadable image(s) in validation (epoch 0): {bad[1]}")
