"""A backbone registered in ``tasks.common.backbones`` (one ``register_backbone`` call, nothing
else edited) runs through fit, validate and export of all three tasks."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones import FeatureInfo
from tasks.classification.__main__ import main as classification_main
from tasks.classification.data import make_demo_dataset
from tasks.classification.module import ImageClassificationTask
from tasks.common import backbones as registry
from tasks.common.backbones import Backbone, dilate_, get_backbone, register_backbone
from tasks.detection.__main__ import main as detection_main
from tasks.detection.data import make_demo_coco
from tasks.detection.module import ObjectDetectionTask
from tasks.segmentation.__main__ import main as segmentation_main
from tasks.segmentation.data import make_demo_voc
from tasks.segmentation.module import SemanticSegmentationTask

CONFIGS = Path(__file__).parent / "configs"
WIDTHS = (8, 12, 16, 24, 32)  # five stride-2 blocks: C4 after the fourth (stride 16), C5 after the fifth (stride 32)


def _blocks() -> nn.Sequential:
    layers, channels = [], 3
    for width in WIDTHS:
        layers.append(nn.Sequential(nn.Conv2d(channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()))
        channels = width
    return nn.Sequential(*layers)


class ToyFeatures(nn.Module):
    def __init__(self, output_stride: int) -> None:
        super().__init__()
        self.blocks = dilate_(_blocks(), output_stride)
        self.feature_info = FeatureInfo([
            {"num_chs": WIDTHS[3], "reduction": min(16, output_stride), "module": "blocks.3"},
            {"num_chs": WIDTHS[4], "reduction": min(32, output_stride), "module": "blocks.4"},
        ])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c4 = self.blocks[:4](x)
        return [c4, self.blocks[4](c4)]


class ToyClassifier(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.blocks = _blocks()
        self.head = nn.Linear(WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


def _load(network: nn.Module, weights: str | None) -> nn.Module:
    if weights is not None:
        network.load_state_dict(torch.load(weights, weights_only=True))
    return network


@pytest.fixture
def toy(monkeypatch):
    """``--model.backbone toy`` for the duration of a test."""
    monkeypatch.setattr(registry, "BACKBONES", dict(registry.BACKBONES))
    register_backbone("toy", Backbone(
        classifier=lambda backbone, num_classes, weights: _load(ToyClassifier(num_classes), weights),
        features=lambda backbone, output_stride, weights: _load(ToyFeatures(output_stride), weights),
    ))
    return "toy"


def test_registration_is_checked(toy):
    with pytest.raises(ValueError, match="registered already"):
        register_backbone(toy, get_backbone(toy))
    with pytest.raises(ValueError, match=r"unknown backbone 'toy2'.*'toy'"):
        get_backbone("toy2")
    with pytest.raises(ValueError, match=r"backbone_kwargs \['frozen_stages'\]"):
        registry.feature_extractor(toy, backbone_kwargs={"frozen_stages": 1})


def _fit_validate_export(main, common: list[str], workdir: Path, task_class, **export_options: str) -> dict:
    main(["fit", *common, "--model.backbone=toy", f"--trainer.default_root_dir={workdir}"])
    (checkpoint,) = workdir.glob("**/last.ckpt")
    task = task_class.load_from_checkpoint(checkpoint, map_location="cpu")
    assert any(isinstance(m, (ToyFeatures, ToyClassifier)) for m in task.modules()), "the registered builder made the network"
    main(["validate", *common, "--model.backbone=toy", f"--ckpt_path={checkpoint}", f"--trainer.default_root_dir={workdir}"])
    out = workdir / "exported"
    main(["export", *common, "--model.backbone=toy", f"--ckpt_path={checkpoint}", f"--output={out}",
          *(f"--{key}={value}" for key, value in export_options.items())])
    return json.loads((out / "model.json").read_text())


def test_a_registered_backbone_runs_through_classification(toy, tmp_path):
    data = make_demo_dataset(tmp_path / "shapes", train_per_class=4, val_per_class=2, size=32)
    metadata = _fit_validate_export(classification_main, ["--config", str(CONFIGS / "classification.yaml"), f"--data.root={data}"],
                                    tmp_path / "run", ImageClassificationTask)
    assert metadata["architecture"] == "toy"
    assert metadata["build"] == "tasks.common.backbones.classifier_network('toy', 5)"
    assert metadata["onnx_vs_pytorch_relative_error"] < 1e-5


def test_a_registered_backbone_runs_through_detection(toy, tmp_path):
    data = make_demo_coco(tmp_path / "coco", train_images=4, val_images=4, size=96)
    metadata = _fit_validate_export(detection_main, ["--config", str(CONFIGS / "detection.yaml"), f"--data.root={data}"],
                                    tmp_path / "run", ObjectDetectionTask, tolerance="1e-3")
    assert metadata["architecture"] == "ssdlite_toy"
    assert metadata["onnx_vs_pytorch_relative_error"] < 1e-3


def test_a_registered_backbone_runs_through_segmentation(toy, tmp_path):
    data = make_demo_voc(tmp_path / "VOCdevkit", train_images=4, val_images=2, size=64)
    metadata = _fit_validate_export(segmentation_main, ["--config", str(CONFIGS / "segmentation.yaml"), f"--data.root={data}"],
                                    tmp_path / "run", SemanticSegmentationTask)
    assert metadata["architecture"] == "deeplabv3_toy"
    assert metadata["onnx_vs_pytorch_relative_error"] < 1e-5
