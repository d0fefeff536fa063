"""Baseline backbones (torchvision's mobile networks, timm) under the tasks' heads, and their export."""

import json
from pathlib import Path

import onnx
import pytest
import torch
import torchvision

from backbones.testing import randomize_batchnorm, relative_error
from tasks.common.backbones import BASELINE_BACKBONES, classifier_network, feature_extractor

# C4 (last block at stride 16) and C5 (last block) channels of torchvision's networks
CHANNELS = {"mobilenet_v2": [96, 1280], "mobilenet_v3_large": [112, 960], "efficientnet_b0": [112, 1280]}


@pytest.mark.parametrize("name", BASELINE_BACKBONES)
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_feature_levels_and_output_stride(name, output_stride):
    network = feature_extractor(name, output_stride=output_stride).eval()
    with torch.no_grad():
        c4, c5 = network(torch.randn(1, 3, 64, 64))
    assert network.feature_info.channels() == CHANNELS[name] == [c4.shape[1], c5.shape[1]]
    assert network.feature_info.reduction() == [min(16, output_stride), output_stride]
    assert c4.shape[-1] == 64 // min(16, output_stride) and c5.shape[-1] == 64 // output_stride


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilation_computes_the_strided_network_densely(output_stride):
    """A trous: with strides turned into dilation, every (32 / OS)-th output position is exactly
    the stride-32 network's output (MobileNetV2 has no global pooling inside, so this is exact)."""
    strided = randomize_batchnorm(feature_extractor("mobilenet_v2")).eval()
    dilated = feature_extractor("mobilenet_v2", output_stride=output_stride).eval()
    dilated.load_state_dict(strided.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        (c4, c5), (c4_dense, c5_dense) = strided(x), dilated(x)
    step4, step5 = 16 // min(16, output_stride), 32 // output_stride
    assert relative_error(c5_dense[..., ::step5, ::step5], c5) < 1e-5
    assert relative_error(c4_dense[..., ::step4, ::step4], c4) < 1e-5


def test_torchvision_weights_load_into_features_and_classifier(tmp_path):
    reference = randomize_batchnorm(torchvision.models.mobilenet_v2(num_classes=1000)).eval()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)
    x = torch.randn(1, 3, 64, 64)
    features = feature_extractor("mobilenet_v2", weights=str(path)).eval()
    with torch.no_grad():
        expected = [reference.features[:14](x), reference.features(x)]
        assert all(relative_error(a, b) < 1e-6 for a, b in zip(features(x), expected))
        classifier = classifier_network("mobilenet_v2", num_classes=5, weights=str(path)).eval()
        assert classifier.classifier[-1].out_features == 5, "another class count: fresh classifier"
        assert relative_error(classifier.features(x), reference.features(x)) < 1e-6


def test_bad_backbone_names_and_options():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet50'.*'mobilenet_v2'.*timm:<model name>"):
        feature_extractor("resnet50")
    with pytest.raises(ValueError, match=r"backbone_kwargs \['frozen_stages'\] apply to MobileOne only"):
        feature_extractor("mobilenet_v2", backbone_kwargs={"frozen_stages": 1})
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        feature_extractor("mobilenet_v2", weights="nowhere.pth")


def test_timm_features_only():
    pytest.importorskip("timm")
    network = feature_extractor("timm:mobilenetv2_100", output_stride=8).eval()
    with torch.no_grad():
        c4, c5 = network(torch.randn(1, 3, 64, 64))
    assert network.feature_info.reduction() == [8, 8] and c4.shape[-1] == c5.shape[-1] == 8
    assert network.feature_info.channels() == [c4.shape[1], c5.shape[1]] == [96, 320]


def _exported(out: Path) -> dict:
    metadata = json.loads((out / "model.json").read_text())
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert metadata["fused_vs_unfused_relative_error"] < 1e-4 and metadata["onnx_vs_pytorch_relative_error"] < 1e-4
    return metadata


def test_classification_with_mobilenet_v2_trains_and_exports(tmp_path):
    from tasks.classification.__main__ import main
    from tasks.classification.data import make_demo_dataset

    root = make_demo_dataset(tmp_path / "shapes", train_per_class=4, val_per_class=2, size=40)
    config = str(Path(__file__).parent / "configs" / "classification.yaml")
    common = ["--config", config, "--data.root", str(root), "--trainer.default_root_dir", str(tmp_path), "--model.backbone=mobilenet_v2"]
    main(["fit", *common])
    (checkpoint,) = tmp_path.glob("**/last.ckpt")
    main(["export", *common, f"--ckpt_path={checkpoint}", f"--output={tmp_path / 'out'}"])
    metadata = _exported(tmp_path / "out")
    assert metadata["architecture"] == "mobilenet_v2" and "classifier_network('mobilenet_v2'" in metadata["build"]
    fused = torch.load(tmp_path / "out" / "model_fused.pt", weights_only=True)
    assert not any("running_var" in key for key in fused), "BatchNorms are folded into the convolutions"


def test_detection_with_mobilenet_v3_trains_and_exports(tmp_path):
    from tasks.detection.__main__ import main
    from tasks.detection.data import make_demo_coco

    root = make_demo_coco(tmp_path / "coco", train_images=4, val_images=4, size=96)
    config = str(Path(__file__).parent / "configs" / "detection.yaml")
    common = ["--config", config, "--data.root", str(root), "--trainer.default_root_dir", str(tmp_path),
              "--model.backbone=mobilenet_v3_large"]
    main(["fit", *common])
    (checkpoint,) = tmp_path.glob("**/last.ckpt")
    main(["export", *common, f"--ckpt_path={checkpoint}", f"--output={tmp_path / 'out'}", "--tolerance=1e-3"])
    assert _exported(tmp_path / "out")["architecture"] == "ssdlite_mobilenet_v3_large"


def test_segmentation_with_efficientnet_trains_and_exports(tmp_path):
    from tasks.segmentation.__main__ import main
    from tasks.segmentation.data import make_demo_voc

    root = make_demo_voc(tmp_path / "VOCdevkit", train_images=4, val_images=2, size=64)
    config = str(Path(__file__).parent / "configs" / "segmentation.yaml")
    common = ["--config", config, f"--data.root={root}", "--trainer.default_root_dir", str(tmp_path),
              "--model.backbone=efficientnet_b0"]
    main(["fit", *common])
    (checkpoint,) = tmp_path.glob("**/last.ckpt")
    main(["export", *common, f"--ckpt_path={checkpoint}", f"--output={tmp_path / 'out'}"])
    assert _exported(tmp_path / "out")["architecture"] == "deeplabv3_efficientnet_b0"


def test_mobileone_classifier_network_loads_weights_and_resets_other_class_count(tmp_path):
    from backbones import mobileone

    reference = mobileone("s0", num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "s0.pth")
    network = classifier_network("mobileone_s0", num_classes=5, weights=str(tmp_path / "s0.pth"))
    assert torch.equal(network.stage0.rbr_conv[0].conv.weight, reference.stage0.rbr_conv[0].conv.weight)
    assert network.linear.out_features == 5
