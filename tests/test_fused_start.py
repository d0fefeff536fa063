"""Training from a fused (inference-form) MobileOne file: the train form rebuilt from it computes
the file's function, is calibrated on real inputs, and fuses back to the file's tensors; and an
export refuses a network that computes NaN or inf."""

import logging
import os
from pathlib import Path

import pytest
import torch
from test_classification import image_root  # noqa: F401  (the task tests' data fixtures)
from test_detection import coco_root  # noqa: F401
from test_segmentation import voc_root  # noqa: F401
from torch import nn

from backbones import calibrate_from_fused_, load_checkpoint, mobileone, reparameterize_model
from backbones.testing import randomize_batchnorm, relative_error

SHARED = Path(os.environ.get("MOBILEONE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
APPLE_S0 = SHARED / "weights" / "mobileone_s0.pth.tar"
IMAGENET_SAMPLE = SHARED / "datasets" / "imagenet-sample"


def require_shared(path: Path) -> None:
    """Skip where ``../shared`` is absent (a user's clone); fail instead under ``MOBILEONE_REQUIRE_DATASETS=1`` (CI)."""
    if not path.exists():
        message = f"{path} is absent (../shared beside the repository, or MOBILEONE_SHARED)"
        if os.environ.get("MOBILEONE_REQUIRE_DATASETS") == "1":
            pytest.fail(f"MOBILEONE_REQUIRE_DATASETS=1 but {message}")
        pytest.skip(message)


@pytest.fixture(scope="module")
def fused_file(tmp_path_factory) -> Path:
    """A fused S0 (10 classes) of random weights, BatchNorm statistics averaged over random inputs (as
    a trained network's match its weights), saved as Apple's fused files are."""
    torch.manual_seed(0)
    network = mobileone("s0", num_classes=10).train()
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        for _ in range(3):
            network(torch.randn(8, 3, 64, 64))
    network.eval()
    path = tmp_path_factory.mktemp("fused") / "mobileone_s0_fused.pth.tar"
    torch.save(reparameterize_model(network).state_dict(), path)
    return path


def fused_model(path: Path, **kwargs) -> nn.Module:
    model = mobileone("s0", inference_mode=True, **kwargs)
    load_checkpoint(model, str(path))
    return model.eval()


# The synthetic checks compare in float64: an untrained random network amplifies the float32 rounding
# of the stored BatchNorm values (the pass-through weight sqrt(1 + eps), ~1e-8 each) to ~1e-5 over its
# 43 layers, a wrong construction by far more (uncalibrated train mode: > 1); Apple's real file is
# checked at 1e-5 in float32 below.
EXACT = 1e-4


def test_fused_file_builds_a_train_form_computing_its_function(fused_file):
    fused = fused_model(fused_file, num_classes=10)
    train = mobileone("s0", num_classes=10)
    report = load_checkpoint(train, str(fused_file))
    assert report.from_fused == 43 and all(m.from_fused for m in train.modules() if hasattr(m, "rbr_conv"))
    layer = train.stage1[1]  # a 1x1 layer with 4 conv branches and a skip branch
    assert layer.rbr_skip is not None and float(layer.rbr_skip.weight.detach().abs().max()) == 0.0
    assert all(float(branch.bn.weight.detach().abs().max()) == 0.0 for branch in layer.rbr_conv[1:]), "the other branches start at zero scale"
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = fused.double()(images)
        assert relative_error(train.double().eval()(images), expected) <= EXACT
        uncalibrated = relative_error(train.train()(images), expected)
    calibrated = mobileone("s0", num_classes=10).double()
    load_checkpoint(calibrated, str(fused_file))
    assert calibrate_from_fused_(calibrated, [torch.randn(16, 3, 64, 64, dtype=torch.float64) for _ in range(2)]) == 43
    assert not any(getattr(m, "from_fused", False) for m in calibrated.modules()), "calibrated once"
    with torch.no_grad():
        assert relative_error(calibrated.eval()(images), expected) <= EXACT, "calibration keeps the eval-mode function"
    first = calibrated.stage1[1].rbr_conv[0].bn
    assert float((first.running_var - 1).abs().max()) > 1e-3 and torch.allclose(first.weight, (first.running_var + first.eps).sqrt())
    assert uncalibrated > 0.5, "train mode with placeholder statistics is far off: what calibration is for"
    # fused again (statistics as calibrated: the train-mode pass above moved them, so reload and calibrate again)
    again = mobileone("s0", num_classes=10)
    load_checkpoint(again, str(fused_file))
    calibrate_from_fused_(again, [torch.randn(8, 3, 64, 64)])
    refused = reparameterize_model(again.eval()).state_dict()
    for key, value in torch.load(fused_file, weights_only=True).items():
        assert relative_error(refused[key], value) <= 1e-5, key  # float32 rounding of the calibrated BatchNorms


def test_calibration_keeps_the_function_after_statistics_moved(fused_file):
    """A train-mode forward before calibration moves the pass-through BatchNorms' statistics; the
    calibration keeps whatever eval-mode function the layers then compute."""
    train = mobileone("s0", num_classes=10)
    load_checkpoint(train, str(fused_file))
    train.double()
    with torch.no_grad():
        train.train()(torch.randn(8, 3, 64, 64, dtype=torch.float64))
        images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
        before = train.eval()(images)
    calibrate_from_fused_(train, [torch.randn(8, 3, 64, 64, dtype=torch.float64)])
    with torch.no_grad():
        assert relative_error(train.eval()(images), before) <= EXACT


def test_fused_file_loads_into_a_dilated_feature_extractor(fused_file):
    fused = fused_model(fused_file, out_indices=(3, 4), output_stride=16).double()
    features = mobileone("s0", out_indices=(3, 4), output_stride=16)
    assert load_checkpoint(features, str(fused_file)).from_fused > 0
    images = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        for actual, expected in zip(features.double().eval()(images), fused(images)):
            assert relative_error(actual, expected) <= EXACT


def test_calibration_without_batches_names_the_problem(fused_file):
    train = mobileone("s0", num_classes=10)
    load_checkpoint(train, str(fused_file))
    with pytest.raises(RuntimeError, match="calibration saw 0 of the 43 layers"):
        calibrate_from_fused_(train, [])


def imagenet_batch(count: int, offset: int = 0) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    transform = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    paths = sorted((IMAGENET_SAMPLE / "val").glob("*/*.JPEG"))[offset:offset + count]
    return torch.stack([transform(decode_image(str(p), mode=ImageReadMode.RGB)) for p in paths])


def test_apple_s0_fused_release_starts_a_train_form_with_its_function():
    """Apple's fused S0 release (../shared/weights) on real ImageNet images: the rebuilt train form
    equals it in eval mode; calibrated on 64 images, in train mode (batch statistics of 32 other
    images) it is far closer to it than uncalibrated (measured: relative error of the logits 0.77
    against 6.3, top-1 agreement 69% against ~0%), and it fuses back to the file's tensors."""
    require_shared(APPLE_S0)
    require_shared(IMAGENET_SAMPLE)
    fused = fused_model(APPLE_S0)
    train = mobileone("s0")
    assert load_checkpoint(train, str(APPLE_S0)).from_fused == 43
    held_out = imagenet_batch(32, offset=64)
    with torch.no_grad():
        expected = fused(held_out)
        assert relative_error(train.eval()(held_out), expected) <= 1e-5
    reference = mobileone("s0")
    load_checkpoint(reference, str(APPLE_S0))
    with torch.no_grad():
        uncalibrated = relative_error(reference.train()(held_out), expected)
    calibration = imagenet_batch(64)
    calibrate_from_fused_(train, [calibration[:32], calibration[32:]])
    refused = reparameterize_model(train.eval()).state_dict()
    for key, value in torch.load(APPLE_S0, weights_only=True).items():
        assert relative_error(refused[key], value) <= 1e-5, key
    with torch.no_grad():
        assert relative_error(train.eval()(held_out), expected) <= 1e-5
        in_train_mode = train.train()(held_out)
    error = relative_error(in_train_mode, expected)
    agreement = float((in_train_mode.argmax(1) == expected.argmax(1)).float().mean())
    assert error < 1.0 and error < 0.25 * uncalibrated and agreement >= 0.5, (error, uncalibrated, agreement)


# Tasks: fit from a fused file calibrates at the start ------------------------------------------

@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_fit_from_a_fused_file_calibrates_and_trains_finite(task, fused_file, tmp_path, caplog, request):
    if task == "classification":
        from tasks.classification.__main__ import main

        root = request.getfixturevalue("image_root")
        options = [f"--model.weights={fused_file}"]
    elif task == "detection":
        from tasks.detection.__main__ import main

        root = request.getfixturevalue("coco_root")
        options = [f"--model.backbone_weights={fused_file}", "--model.backbone=mobileone_s0"]
    else:
        from tasks.segmentation.__main__ import main

        root = request.getfixturevalue("voc_root")
        options = [f"--model.backbone_weights={fused_file}", "--model.backbone=mobileone_s0"]
    config = Path(__file__).parent / "configs" / f"{task}.yaml"
    caplog.set_level(logging.INFO, logger="tasks")
    main(["fit", "--config", str(config), "--data.root", str(root), "--trainer.default_root_dir", str(tmp_path),
          "--trainer.max_steps=2", "--trainer.limit_val_batches=1", *options])
    assert any("calibrated the BatchNorm statistics of" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)["state_dict"]
    variances = [v for k, v in checkpoint.items() if k.endswith("rbr_conv.0.bn.running_var")]
    assert variances and all(torch.isfinite(v).all() for v in checkpoint.values() if v.is_floating_point())
    assert any(float((v - 1).abs().max()) > 1e-3 for v in variances), "the statistics are the images', not the placeholders"


# Export refuses non-finite networks -----------------------------------------------------------

def test_export_refuses_a_network_that_overflows(tmp_path):
    from tasks.common.export import fuse_and_export

    torch.manual_seed(0)
    network = randomize_batchnorm(mobileone("s0", num_classes=10)).eval()
    with torch.no_grad():
        for branch in network.stage2[4].rbr_conv:
            branch.conv.weight.mul_(1e37)  # overflows float32 to inf there
    with pytest.raises(RuntimeError, match=r"the trained network computes NaN or inf .* first at module stage2\.4"):
        fuse_and_export(network, torch.randn(4, 3, 64, 64), tmp_path / "out", {})
    assert not (tmp_path / "out").exists(), "nothing was written"
    with torch.no_grad():
        network.stage3[0].rbr_conv[0].conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"first at parameter stage3\.0\.rbr_conv\.0\.conv\.weight"):
        fuse_and_export(network, torch.randn(4, 3, 64, 64), tmp_path / "out", {})
