"""Every task's ``test`` evaluates the test split its data names, else the validation split (and says so)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tasks.classification.data import ImageFolderDataModule, make_demo_dataset
from tasks.detection.data import DetectionDataModule, make_demo_coco
from tasks.segmentation.data import SegmentationDataModule, make_demo_voc


def classification(root: Path, with_test: bool) -> ImageFolderDataModule:
    make_demo_dataset(root, train_per_class=2, val_per_class=2, size=32)
    shutil.copytree(root / "val", root / "holdout")
    for folder in (root / "holdout").iterdir():  # one image a class
        for extra in sorted(folder.iterdir())[1:]:
            extra.unlink()
    return ImageFolderDataModule(str(root), test_split="holdout" if with_test else None, num_workers=0,
                                 image_size=32, eval_resize=32, eval_image_size=32)


def detection(root: Path, with_test: bool) -> DetectionDataModule:
    make_demo_coco(root, train_images=4, val_images=6, size=64)
    content = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    content["images"] = content["images"][:2]
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] in {i["id"] for i in content["images"]}]
    (root / "annotations" / "holdout.json").write_text(json.dumps(content))
    test = {"test_ann": str(root / "annotations" / "holdout.json"), "test_images": str(root / "val2017")} if with_test else {}
    return DetectionDataModule(str(root), num_workers=0, **test)


def segmentation(root: Path, with_test: bool) -> SegmentationDataModule:
    make_demo_voc(root, train_images=4, val_images=3, size=64)
    split_files = root / "VOC2012" / "ImageSets" / "Segmentation"
    (split_files / "holdout.txt").write_text((split_files / "val.txt").read_text().splitlines()[0] + "\n")
    return SegmentationDataModule(str(root), demo=True, test_split="holdout" if with_test else None, num_workers=0)


@pytest.mark.parametrize("data", [classification, detection, segmentation], ids=lambda data: data.__name__)
def test_test_evaluates_the_named_split_else_validation(data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tasks")
    named = data(tmp_path / "named", with_test=True)
    named.setup("test")
    named.setup("validate")
    assert len(named.test_dataset) < len(named.val_dataset), "the held-out split, not the validation split"
    assert "test evaluates the validation split" not in caplog.text
    fallback = data(tmp_path / "fallback", with_test=False)
    fallback.setup("test")
    fallback.setup("validate")
    assert len(fallback.test_dataset) == len(fallback.val_dataset)
    assert "no test split given: test evaluates the validation split" in caplog.text
