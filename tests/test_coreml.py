"""CoreML conversion of the fused model (optional extra: pip install -e ".[coreml]").

coremltools converts on Linux but predicts only on macOS, so these tests check what a Linux
machine can: the conversion succeeds, the program's inputs, outputs and op types, the compute
precision (through the weight file's size) and the atomic ``.mlpackage`` writing. Skipped when
coremltools is absent, unless ``MOBILEONE_REQUIRE_COREML=1`` (then they fail).
"""

import json
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("MOBILEONE_REQUIRE_COREML"):
    import coremltools as ct  # CI installs the extra: a missing coremltools is an error there, not a skip
else:
    ct = pytest.importorskip("coremltools", reason='coremltools is not installed (pip install -e ".[coreml]")')

from backbones import coreml_op_types, fuse_for_deployment, mobileone, save_mlpackage, to_coreml  # noqa: E402
from backbones.testing import randomize_batchnorm  # noqa: E402

pytestmark = [
    pytest.mark.coreml,
    # coremltools' own noise: its torch.export frontend calls a deprecated registry method, and a
    # converted model keeps a temporary package directory that is removed on garbage collection
    pytest.mark.filterwarnings("ignore:Function _TORCH_OPS_REGISTRY:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Implicitly cleaning up:ResourceWarning"),
]
FLOAT32 = 65568  # ArrayFeatureType.FLOAT32 in the Core ML specification
SPEC_VERSION_IOS16 = 7


@pytest.fixture(scope="module")
def fused_s0():
    torch.manual_seed(0)
    return fuse_for_deployment(randomize_batchnorm(mobileone("s0", num_classes=10)))


def _weights_size(package: Path) -> int:
    return sum(f.stat().st_size for f in (package / "Data").rglob("*.bin"))


@pytest.mark.parametrize("source", ["torchscript", "torch.export"])
def test_fused_s0_converts_to_an_ml_program(fused_s0, source, tmp_path):
    mlmodel = to_coreml(fused_s0, torch.randn(2, 3, 64, 64), output_names=["logits"], source=source, precision="float32")
    spec = mlmodel.get_spec()
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion == SPEC_VERSION_IOS16
    (image,), (logits,) = spec.description.input, spec.description.output
    assert image.name == "images" and list(image.type.multiArrayType.shape) == [1, 3, 64, 64]
    assert image.type.multiArrayType.dataType == FLOAT32
    assert logits.name == "logits" and list(logits.type.multiArrayType.shape) == [1, 10]
    assert logits.type.multiArrayType.dataType == FLOAT32
    ops = coreml_op_types(mlmodel)
    assert "conv" in ops and "batch_norm" not in ops, ops
    path = save_mlpackage(mlmodel, tmp_path / "s0.mlpackage")
    reloaded = ct.models.MLModel(str(path), skip_model_load=True)  # loading for prediction needs macOS
    assert [o.name for o in reloaded.get_spec().description.output] == ["logits"]
    assert coreml_op_types(reloaded) == ops


def test_float16_precision_halves_the_weights(fused_s0, tmp_path):
    x = torch.randn(1, 3, 64, 64)
    sizes = {
        precision: _weights_size(save_mlpackage(to_coreml(fused_s0, x, precision=precision), tmp_path / f"{precision}.mlpackage"))
        for precision in ("float16", "float32")
    }
    parameters = sum(p.numel() for p in fused_s0.parameters())
    assert 2 * parameters <= sizes["float16"] < 0.55 * sizes["float32"] and sizes["float32"] >= 4 * parameters, sizes
    with pytest.raises(ValueError, match=r"precision='bfloat16'"):
        to_coreml(fused_s0, x, precision="bfloat16")


def test_image_input_normalizes_inside(fused_s0):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    mlmodel = to_coreml(fused_s0, torch.randn(1, 3, 48, 64), image_normalization=(mean, std))
    (image,) = mlmodel.get_spec().description.input
    assert image.name == "images" and image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.height, image.type.imageType.width) == (48, 64)
    assert image.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert {"sub", "mul", "conv"} <= coreml_op_types(mlmodel), "pixels / 255, then (x - mean) / std, in the program"


def test_unfused_models_are_refused(fused_s0):
    unfused = randomize_batchnorm(mobileone("s0", num_classes=10)).eval()
    for source in ("torchscript", "torch.export"):
        with pytest.raises(ValueError, match=r"batch_norm.*fuse_for_deployment"):
            to_coreml(unfused, torch.randn(1, 3, 32, 32), source=source)
    with pytest.raises(ValueError, match=r"minimum_deployment_target='iOS99'"):
        to_coreml(fused_s0, torch.randn(1, 3, 32, 32), minimum_deployment_target="iOS99")
    with pytest.raises(ValueError, match=r"names 2 outputs, the model returns 1"):
        to_coreml(fused_s0, torch.randn(1, 3, 32, 32), output_names=["a", "b"])


def test_mlpackage_is_replaced_atomically(fused_s0, tmp_path):
    mlmodel = to_coreml(fused_s0, torch.randn(1, 3, 32, 32))
    target = tmp_path / "model.mlpackage"
    target.mkdir()
    (target / "stale").write_text("from an older export")
    save_mlpackage(mlmodel, target)
    assert not (target / "stale").exists() and (target / "Manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"], "no temporary directory is left behind"

    class Failing:
        def save(self, path: str) -> None:
            Path(path).mkdir()
            (Path(path) / "half").write_text("half-written")
            raise OSError("disk full")

    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    with pytest.raises(OSError, match="disk full"):
        save_mlpackage(Failing(), target)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before, "the old package is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"]
    with pytest.raises(ValueError, match=r"\.mlpackage"):
        save_mlpackage(mlmodel, tmp_path / "model.mlmodel")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # clamp(max=)'s lower bound -FLT_MAX is -inf in float16
def test_dense_networks_convert(tmp_path):
    """A segmenter (bilinear upsampling, ASPP pooling) and a detector (two outputs) convert with
    their heads' BatchNorms folded."""
    from tasks.detection.ssdlite import SSDRawOutputs, ssdlite
    from tasks.segmentation.deeplabv3 import DeepLabV3, DeepLabV3Logits

    segmenter = DeepLabV3Logits(DeepLabV3("mobileone_s0", num_classes=5, output_stride=16, aspp_channels=16, aux_head=False))
    mlmodel = to_coreml(fuse_for_deployment(randomize_batchnorm(segmenter)), torch.randn(1, 3, 64, 96))
    (output,) = mlmodel.get_spec().description.output
    assert list(output.type.multiArrayType.shape) == [1, 5, 64, 96]
    assert {"conv", "upsample_bilinear"} <= coreml_op_types(mlmodel) and "batch_norm" not in coreml_op_types(mlmodel)

    detector = SSDRawOutputs(randomize_batchnorm(ssdlite("mobileone_s0", num_classes=4, image_size=96)).eval(), 96)
    mlmodel = to_coreml(fuse_for_deployment(detector), torch.randn(1, 3, 96, 96), output_names=["boxes", "scores"])
    shapes = {o.name: list(o.type.multiArrayType.shape) for o in mlmodel.get_spec().description.output}
    with torch.no_grad():
        boxes, scores = detector(torch.randn(1, 3, 96, 96))
    assert shapes == {"boxes": list(boxes.shape), "scores": list(scores.shape)}
    assert "batch_norm" not in coreml_op_types(mlmodel)


def test_export_cli_writes_mlpackage(tmp_path):
    """``export --coreml true --coreml_image_input true`` through the classification CLI."""
    from tasks.classification.__main__ import main
    from tasks.classification.data import make_demo_dataset

    root = make_demo_dataset(tmp_path / "shapes", train_per_class=2, val_per_class=2, size=40)
    out = tmp_path / "exported"
    config = str(Path(__file__).parent / "configs" / "classification.yaml")
    args = ["export", "--config", config, "--data.root", str(root), "--trainer.default_root_dir", str(tmp_path), "--output", str(out)]
    main([*args, "--onnx", "false", "--coreml", "true", "--coreml_image_input", "true"])
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.mlpackage", "model_fused.pt"]
    info = json.loads((out / "model.json").read_text())["coreml"]
    assert info["precision"] == "float16" and info["minimum_deployment_target"] == "iOS16"
    assert info["input"]["name"] == "images" and info["input"]["shape"] == [1, 3, 32, 32] and "image" in info["input"]["type"]
    assert info["outputs"] == [{"name": "output", "shape": [1, 5]}]
    assert "conv" in info["op_types"] and "batch_norm" not in info["op_types"]
    spec = ct.models.MLModel(str(out / "model.mlpackage"), skip_model_load=True).get_spec()
    assert spec.description.input[0].type.WhichOneof("Type") == "imageType"
