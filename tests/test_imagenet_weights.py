"""ImageNet classifiers from their weights alone (a class list instead of a training split; predict
writes readable names), and torchvision networks whose BatchNorms were folded (the dequantized
MobileNetV2 release): calibrated at the start of fit like MobileOne's fused files."""

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from test_fused_start import APPLE_S0, IMAGENET_SAMPLE, SHARED, imagenet_batch, require_shared
from torch import nn

from backbones import calibrate_from_fused_, mark_folded_batchnorms_
from backbones.testing import randomize_batchnorm, relative_error
from tasks.classification.__main__ import main
from tasks.classification.data import ImageFolderDataModule, make_demo_dataset, read_class_list
from tasks.common.backbones import classifier_network

CONFIG = str(Path(__file__).parent / "configs" / "classification.yaml")
MOBILENET_V2 = SHARED / "weights" / "mobilenet_v2_imagenet_dequantized.pth"


# Class lists ----------------------------------------------------------------------------------

def test_the_imagenet_class_list_is_imagenet_1k_in_classifier_order():
    folders, names = read_class_list("imagenet")
    assert len(folders) == len(set(folders)) == 1000
    assert folders == sorted(folders), "ImageNet-1k's label order is the sorted wnids"
    assert (folders[0], names[0]) == ("n01440764", "tench, Tinca tinca")
    assert (folders[2], names[2]) == ("n01484850", "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias")
    assert names[-1].startswith("toilet tissue")
    if IMAGENET_SAMPLE.exists():  # the order of the developers' list (Apple's, timm's, torchvision's classifiers)
        assert folders == (IMAGENET_SAMPLE / "classes.txt").read_text().split()


def test_a_class_list_file_gives_folders_and_readable_names_in_line_order(tmp_path):
    listed = tmp_path / "classes.txt"
    listed.write_text("bee\tHoney bee\n\nant\n")
    assert read_class_list(listed) == (["bee", "ant"], ["Honey bee", "ant"])
    listed.write_text("bee\nant\nbee\tagain\n")
    with pytest.raises(ValueError, match=r"classes.txt, line 3: class 'bee' is listed twice"):
        read_class_list(listed)
    listed.write_text("\n\n")
    with pytest.raises(ValueError, match="names no class"):
        read_class_list(listed)
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist: give 'imagenet' or a text file"):
        read_class_list(tmp_path / "missing.txt")


@pytest.fixture()
def val_only(tmp_path) -> Path:
    """The demo set without its training split and without the val folder of one class."""
    root = make_demo_dataset(tmp_path / "shapes", train_per_class=1, val_per_class=2, size=24)
    for folder in ("train", "val/cross"):
        for image in (root / folder).rglob("*.*"):
            image.unlink()
    for folder in (root / "val" / "cross", *(p for p in (root / "train").iterdir()), root / "train"):
        folder.rmdir()
    return root


def test_with_a_class_list_a_split_may_hold_a_subset_and_labels_follow_the_list(val_only, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train does not exist, and without a training split the classes need a list: --data.classes"):
        ImageFolderDataModule(str(val_only), num_workers=0)
    order = ["triangle", "circle", "cross", "square", "stripes"]
    listed = tmp_path / "classes.txt"
    listed.write_text("".join(f"{name}\t{name.title()}\n" for name in order))
    data = ImageFolderDataModule(str(val_only), num_workers=0, classes=str(listed))
    assert data.class_names == [name.title() for name in order] and data.num_classes == 5
    with pytest.warns(UserWarning, match=r"val: 1 class \(cross\) without image files .*: those classes are not evaluated") as record:
        data.setup("validate")
    assert len(record) == 1
    labels = {path.parent.name: label for path, label in data.val_dataset.samples}
    assert labels == {"triangle": 0, "circle": 1, "square": 3, "stripes": 4}
    (val_only / "val" / "hexagon").mkdir()
    with pytest.raises(ValueError, match=r"val: 1 class folder \(hexagon\) not in the class list .*classes.txt"):
        data.setup("validate")
    with pytest.raises(FileNotFoundError, match="train does not exist"):
        data.setup("fit")


def test_validate_predict_and_export_need_no_training_split_with_a_class_list(val_only, tmp_path):
    """A classifier's checkpoint, a class list and validation images: the three subcommands run,
    predict writes index and readable name, the export's model.json names the classes."""
    trained = tmp_path / "trained"
    full = make_demo_dataset(tmp_path / "full", train_per_class=2, val_per_class=1, size=24)
    main(["fit", "--config", CONFIG, "--data.root", str(full), "--trainer.default_root_dir", str(trained), "--trainer.max_steps=1"])
    checkpoint = next(trained.rglob("last.ckpt"))
    listed = tmp_path / "classes.txt"
    listed.write_text("".join(f"{name}\tthe {name}\n" for name in ["circle", "cross", "square", "stripes", "triangle"]))
    common = ["--config", CONFIG, "--data.root", str(val_only), f"--data.classes={listed}", "--trainer.default_root_dir", str(tmp_path / "runs")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the class without validation images
        main(["validate", *common, f"--ckpt_path={checkpoint}"])
        output = tmp_path / "predictions.csv"
        main(["predict", *common, f"--ckpt_path={checkpoint}", f"--data.predict_dir={val_only / 'val' / 'square'}",
              f"--predictions.output={output}"])
        main(["export", *common, f"--ckpt_path={checkpoint}", f"--output={tmp_path / 'exported'}", "--int8=false"])
    with open(output) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and list(rows[0])[:4] == ["path", "index1", "class1", "probability1"]
    for row in rows:
        assert row["class1"] == f"the {['circle', 'cross', 'square', 'stripes', 'triangle'][int(row['index1'])]}"
    metadata = json.loads((tmp_path / "exported" / "model.json").read_text())
    assert metadata["class_names"] == ["the circle", "the cross", "the square", "the stripes", "the triangle"]


# Folded BatchNorms (torchvision's dequantized releases) ---------------------------------------

def folded_mobilenet_v2(path: Path) -> nn.Module:
    """A random MobileNetV2 (10 classes, float64) whose BatchNorms are folded into its convs as in
    torchvision's quantized release: every BatchNorm then has mean 0, var 1 - eps, weight 1 and the
    fused bias. Saved to ``path``; returns the network before folding (the reference function)."""
    reference = randomize_batchnorm(torchvision.models.mobilenet_v2(num_classes=10)).double().eval()
    folded = torchvision.models.mobilenet_v2(num_classes=10).double()
    folded.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for module in folded.modules():
            children = list(module.children()) if isinstance(module, nn.Sequential) else []
            for conv, bn in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
                    conv.weight.mul_(scale.view(-1, 1, 1, 1))
                    bn.bias.sub_(bn.running_mean * scale)
                    bn.running_mean.zero_()
                    bn.running_var.fill_(1 - bn.eps)
                    bn.weight.fill_(1.0)
    torch.save(folded.float().state_dict(), path)
    return reference


def batch_statistics(network: nn.Module) -> nn.Module:
    """``network`` in train mode but for its dropout: what the BatchNorms compute from batch statistics."""
    network.train()
    for module in network.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return network


def test_folded_batchnorms_are_found_and_calibrated_keeping_the_function(tmp_path):
    reference = folded_mobilenet_v2(tmp_path / "folded.pth")
    assert mark_folded_batchnorms_(reference) == 0, "a trained network's BatchNorms are not folded"
    assert mark_folded_batchnorms_(torchvision.models.mobilenet_v2()) == 0, "nor are a fresh network's (running_var 1)"
    network = classifier_network("mobilenet_v2", 10, str(tmp_path / "folded.pth")).double()
    marked = [m for m in network.modules() if getattr(m, "from_fused", False)]
    assert len(marked) == 52 and all(isinstance(m, nn.BatchNorm2d) for m in marked)
    images = torch.randn(16, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(images)
        assert relative_error(network.eval()(images), expected) <= 1e-5
        folded = classifier_network("mobilenet_v2", 10, str(tmp_path / "folded.pth")).double()
        uncalibrated = relative_error(folded(images), expected)  # train mode
    assert calibrate_from_fused_(network, [images[:8], images[8:]]) == 52
    assert not any(getattr(m, "from_fused", False) for m in network.modules())
    with torch.no_grad():
        assert relative_error(network.eval()(images), expected) <= 1e-5, "calibration keeps the eval-mode function"
        calibrated = relative_error(batch_statistics(network)(images), expected)  # the calibration batches' own statistics
    assert uncalibrated > 0.5 and calibrated <= 1e-5, (uncalibrated, calibrated)


def test_torchvision_mobilenet_v2_dequantized_release_calibrates_on_real_images():
    """The real file (../shared/weights): identity BatchNorms carrying the fused biases. Train mode
    destroys it uncalibrated (batch statistics of 32 images: top-1 agreement with eval mode 6%, relative
    error of the logits 0.96); calibrated on 64 other ImageNet images, train mode agrees with eval mode
    on most (measured: 72-84% agreement, relative error 0.44-0.74 with different calibration images;
    S0 the same way: 69%, 0.77), and eval mode is unchanged."""
    require_shared(MOBILENET_V2)
    require_shared(IMAGENET_SAMPLE)
    network = classifier_network("mobilenet_v2", 1000, str(MOBILENET_V2))
    assert sum(getattr(m, "from_fused", False) for m in network.modules()) == 52
    held_out = imagenet_batch(32, offset=64)
    with torch.no_grad():
        expected = network.eval()(held_out)
        uncalibrated = batch_statistics(network)(held_out)
    network = classifier_network("mobilenet_v2", 1000, str(MOBILENET_V2))  # the train-mode pass moved the statistics
    calibration = imagenet_batch(64)
    calibrate_from_fused_(network, [calibration[:32], calibration[32:]])
    with torch.no_grad():
        assert relative_error(network.eval()(held_out), expected) <= 1e-5
        calibrated = batch_statistics(network)(held_out)
    agree = lambda outputs: float((outputs.argmax(1) == expected.argmax(1)).float().mean())  # noqa: E731
    assert agree(uncalibrated) < 0.2 and agree(calibrated) >= 0.6, (agree(uncalibrated), agree(calibrated))
    assert relative_error(calibrated, expected) < relative_error(uncalibrated, expected)


# The real files through the task, no training split ----------------------------------------------

@pytest.mark.parametrize("weights, backbone, top1", [(APPLE_S0, "mobileone_s0", 0.828), (MOBILENET_V2, "mobilenet_v2", 0.844)],
                         ids=["mobileone_s0", "mobilenet_v2"])
def test_imagenet_weights_validate_on_real_images_from_the_weights_alone(weights, backbone, top1, tmp_path):
    """``validate`` of the ImageNet recipe on the 500 real images (500 of the 1000 class folders, no
    train/): the top-1 of torchvision's reference pipeline (Resize 256, CenterCrop 224), README of the data."""
    require_shared(weights)
    require_shared(IMAGENET_SAMPLE)
    config = Path(__file__).resolve().parents[1] / "configs" / "classification" / "mobileone_s0_imagenet.yaml"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 500 classes without images
        cli = main(["validate", "--config", str(config), "--data.root", str(IMAGENET_SAMPLE), f"--model.weights={weights}",
                    f"--model.backbone={backbone}", "--data.batch_size=50", "--data.num_workers=2", "--trainer.precision=32",
                    "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.default_root_dir", str(tmp_path)])
    metrics = cli.trainer.callback_metrics
    assert abs(float(metrics["val/acc1"]) - top1) < 0.0021, float(metrics["val/acc1"])  # 1 image of 500
