"""The segmentation task through its real CLI, on generated VOC / ADE20K / folder layouts."""

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import load_config
from deployment import needs_executorch, with_data_batchnorm
from PIL import Image
from torchvision import tv_tensors

from backbones.runtimes import ExecuTorchNetwork, OnnxRuntimeNetwork, cpu_flags, default_int8_scheme, int8_cpu
from backbones.testing import relative_error
from tasks.common.data import IMAGENET_MEAN, IMAGENET_STD
from tasks.segmentation.__main__ import main
from tasks.segmentation.data import InvalidMaskError, SegmentationDataModule, make_demo_voc, read_mask
from tasks.segmentation.deeplabv3 import DeepLabV3
from tasks.segmentation.module import SemanticSegmentationTask, iou_from_confusion

CONFIG = str(Path(__file__).parent / "configs" / "segmentation.yaml")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return make_demo_voc(tmp_path_factory.mktemp("voc") / "VOCdevkit", train_images=6, val_images=3, size=64)


def run(subcommand: str, workdir: Path, *extra: str) -> None:
    main([subcommand, "--config", CONFIG, "--trainer.default_root_dir", str(workdir), *extra])


@pytest.fixture(scope="module")
def trained(voc_root, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("fit")
    run("fit", workdir, f"--data.root={voc_root}")
    (checkpoint,) = workdir.glob("**/last.ckpt")
    return checkpoint


def test_demo_layout_is_voc(voc_root):
    voc = voc_root / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(ids) == 6 and (voc / "JPEGImages" / f"{ids[0]}.jpg").is_file()
    with Image.open(voc / "SegmentationClass" / f"{ids[0]}.png") as mask:
        assert mask.mode == "P"
    labels = set(np.unique(np.concatenate([read_mask(voc / "SegmentationClass" / f"{i}.png").ravel() for i in ids])))
    assert labels <= {0, 1, 2, 3, 255} and 255 in labels and len(labels) >= 3


def test_validate_prints_per_class_table(voc_root, trained, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tasks")
    run("validate", tmp_path, f"--data.root={voc_root}", f"--ckpt_path={trained}")
    table = caplog.text
    for name in ("background", "circle", "square", "triangle", "mIoU", "pixel accuracy"):
        assert name in table


def test_predict_writes_masks_and_overlays(voc_root, trained, tmp_path):
    images = voc_root / "VOC2012" / "JPEGImages"
    out = tmp_path / "predictions"
    run("predict", tmp_path, f"--data.root={voc_root}", f"--ckpt_path={trained}",
        f"--data.predict_dir={images}", f"--predictions.output={out}")
    stems = sorted(p.stem for p in images.glob("*.jpg"))
    assert sorted(p.stem for p in out.glob("*.png")) == stems
    assert sorted(p.name for p in out.glob("*_overlay.jpg")) == [f"{s}_overlay.jpg" for s in stems]
    with Image.open(out / f"{stems[0]}.png") as mask:
        assert mask.mode == "P" and mask.size == (64, 64)
        assert set(np.unique(np.array(mask))) <= {0, 1, 2, 3}


def test_export_matches_and_accepts_any_image_size(voc_root, trained, tmp_path):
    out = tmp_path / "exported"
    run("export", tmp_path, f"--data.root={voc_root}", f"--ckpt_path={trained}", f"--output={out}")
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["fused_vs_unfused_relative_error"] < 1e-5 and metadata["onnx_vs_pytorch_relative_error"] < 1e-5
    assert metadata["fused_vs_unfused_agreement"] > 0.999
    assert metadata["class_names"] == ["background", "circle", "square", "triangle"]
    assert (metadata["mean"], metadata["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))  # the data config's

    task = SemanticSegmentationTask.load_from_checkpoint(trained, map_location="cpu").eval()
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 80, 48)  # another size than the validation images
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = task.model(x)["out"]
    assert logits.shape == (2, 4, 80, 48)
    assert relative_error(torch.from_numpy(logits), expected) < 1e-5


def test_miou_equals_numpy_confusion_over_batches():
    task = SemanticSegmentationTask("mobileone_s0", num_classes=4, ignore_index=255, output_stride=16, aspp_channels=16)
    generator = torch.Generator().manual_seed(0)
    confusion = np.zeros((4, 4), dtype=np.int64)
    for _ in range(3):
        logits = torch.randn(2, 4, 16, 16, generator=generator)
        masks = torch.randint(0, 4, (2, 16, 16), generator=generator)
        masks[masks == 3] = 255  # class 3 never a target: it can still be predicted
        masks[:, :2] = 255
        task.model.forward = lambda images, logits=logits: {"out": logits}
        task.validation_step((torch.zeros(2, 3, 16, 16), masks), 0)
        predictions, targets = logits.argmax(1).numpy().ravel(), masks.numpy().ravel()
        keep = targets != 255
        np.add.at(confusion, (targets[keep], predictions[keep]), 1)
    iou, miou, accuracy = iou_from_confusion(task.confusion.compute())
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    expected_iou = np.diag(confusion) / union
    assert np.allclose(iou.numpy(), expected_iou)
    assert miou == pytest.approx(np.nanmean(np.where(union > 0, expected_iou, np.nan)))
    assert accuracy == pytest.approx(np.diag(confusion).sum() / confusion.sum())
    assert expected_iou[3] == 0.0, "a class only predicted counts with IoU 0"


def test_crop_pads_mask_with_ignore_index(voc_root):
    data = SegmentationDataModule(str(voc_root), demo=True, crop_size=100, scale_range=(1.0, 1.0))
    image, mask = data.train_transform()(tv_tensors.Image(torch.full((3, 64, 64), 200, dtype=torch.uint8)),
                                         tv_tensors.Mask(torch.ones(64, 64, dtype=torch.int64)))
    assert image.shape == (3, 100, 100) and mask.shape == (100, 100)
    assert (mask == 255).sum() == 100 * 100 - 64 * 64 and (mask == 1).sum() == 64 * 64


def _write_ade(root: Path, labels: np.ndarray) -> None:
    for folder in ("training", "validation"):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((40, 48, 3), 30 * i, dtype=np.uint8)).save(root / "images" / folder / f"ADE_{i}.jpg")
            Image.fromarray(labels.astype(np.uint8), mode="L").save(root / "annotations" / folder / f"ADE_{i}.png")


def test_ade20k_ignores_label_zero_and_shifts_labels(tmp_path):
    labels = np.zeros((40, 48), dtype=np.uint8)
    labels[:10], labels[10:20], labels[20:30] = 1, 2, 3
    root = tmp_path / "ADEChallengeData2016"
    _write_ade(root, labels)
    data = SegmentationDataModule(str(root), "ade20k", class_names=["wall", "floor", "sky"], num_workers=0)
    data.setup("validate")
    _, mask = data.val_dataset[0]
    assert mask[:10].unique().tolist() == [0] and mask[20:30].unique().tolist() == [2]
    assert mask[30:].unique().tolist() == [255]
    main(["fit", "--config", CONFIG, "--trainer.default_root_dir", str(tmp_path), "--trainer.fast_dev_run=1",
          "--data.format=ade20k", "--data.demo=false", f"--data.root={root}",
          "--data.class_names=[wall, floor, sky]", "--data.crop_size=32"])


def test_folder_dataset_with_grayscale_and_palette_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(10):
        Image.fromarray(np.full((32, 32, 3), 20 * i, dtype=np.uint8)).save(tmp_path / "images" / f"img{i}.png")
        labels = np.full((32, 32), i % 3, dtype=np.uint8)
        mask = Image.fromarray(labels, mode="L") if i % 2 else Image.fromarray(labels, mode="P")
        mask.save(tmp_path / "masks" / f"img{i}.png")
    data = SegmentationDataModule(format="folder", images=str(tmp_path / "images"), masks=str(tmp_path / "masks"), num_classes=3,
                                  num_workers=0)
    train, val = data.pairs("train"), data.pairs("val")
    assert len(train) == 9 and len(val) == 1 and not set(train) & set(val)
    main(["fit", "--config", CONFIG, "--trainer.default_root_dir", str(tmp_path), "--trainer.fast_dev_run=1",
          "--data.format=folder", "--data.demo=false", f"--data.images={tmp_path / 'images'}",
          f"--data.masks={tmp_path / 'masks'}", "--data.num_classes=3", "--data.crop_size=32"])


def _write_folder_set(root: Path, classes: tuple[str, ...] = ("road", "car", "sky")) -> Path:
    """root/{train,val}/{images,masks} with 60x80 images and label masks, and root/classes.json."""
    for split, count in (("train", 4), ("val", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            labels = np.zeros((60, 80), dtype=np.uint8)
            labels[20:40] = 1 + i % 2
            labels[:2] = 255
            Image.fromarray(np.full((60, 80, 3), 40 * i, dtype=np.uint8)).save(root / split / "images" / f"{split}{i}.jpg")
            Image.fromarray(labels, mode="L").save(root / split / "masks" / f"{split}{i}.png")
    (root / "classes.json").write_text(json.dumps(list(classes)))
    return root


def test_folder_root_with_classes_json_and_eval_scale(tmp_path):
    root = _write_folder_set(tmp_path / "scenes")
    data = SegmentationDataModule(str(root), "folder", num_workers=0, eval_scale=0.5)
    assert data.class_names == ["road", "car", "sky"] and data.num_classes == 3
    assert [p[0].name for p in data.pairs("val")] == ["val0.jpg", "val1.jpg"]
    data.setup("validate")
    image, mask = data.val_dataset[0]
    assert image.shape == (3, 30, 40) and mask.shape == (30, 40), "evaluation at half size"
    assert mask[10:20].unique().tolist() == [1] and mask[0].unique().tolist() == [255], "masks scaled nearest"
    (root / "classes.json").write_text('{"0": "road"}')
    with pytest.raises(ValueError, match=r"classes.json must hold a JSON list"):
        SegmentationDataModule(str(root), "folder")
    with pytest.raises(ValueError, match=r"eval_scale must be in \(0, 1\]"):
        SegmentationDataModule(str(root), "folder", class_names=["a", "b", "c"], eval_scale=2)


def test_folder_root_logs_per_class_iou_and_predicts_at_full_size(tmp_path):
    root = _write_folder_set(tmp_path / "scenes")
    data = ["--data.format=folder", "--data.demo=false", f"--data.root={root}",
            "--data.crop_size=32", "--data.eval_scale=0.5"]
    main(["fit", "--config", CONFIG, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs=1", *data,
          f"--trainer.logger={{class_path: CSVLogger, init_args: {{save_dir: {tmp_path}, name: ''}}}}"])
    (metrics,) = tmp_path.glob("version_*/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"val/IoU/road", "val/mIoU"} <= set(header), header
    (checkpoint,) = tmp_path.glob("**/last.ckpt")
    out = tmp_path / "predictions"
    main(["predict", "--config", CONFIG, "--trainer.default_root_dir", str(tmp_path), *data, f"--ckpt_path={checkpoint}",
          f"--data.predict_dir={root / 'val' / 'images'}", f"--predictions.output={out}"])
    with Image.open(out / "val0.png") as mask:
        assert mask.size == (80, 60), "masks of downscaled evaluation come back at the image's size"
    assert (out / "val0_overlay.jpg").is_file()


def test_bad_masks_are_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((30, 32), dtype=np.uint8), mode="L").save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / "b.png")
    Image.fromarray(np.array([[0, 7], [9, 255]], dtype=np.uint8).repeat(16, 0).repeat(16, 1), mode="L").save(tmp_path / "masks" / "b.png")
    data = SegmentationDataModule(format="folder", images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                                  val_images=str(tmp_path / "images"),
                              val_masks=str(tmp_path / "masks"), num_classes=3, num_workers=0)
    data.setup("validate")
    with pytest.raises(InvalidMaskError, match=r"a.png is 32x30 \(WxH\) but its image .*a.png is 32x32"):
        data.val_dataset[0]
    with pytest.raises(InvalidMaskError, match=r"b.png holds labels \[7, 9\] outside \[0, 3\)"):
        data.val_dataset[1]
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "masks" / "b.png")
    with pytest.raises(InvalidMaskError, match=r"b.png has PIL mode 'RGB'"):
        data.val_dataset[1]


def test_missing_voc_root_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VOC2012 does not exist; expected Pascal VOC"):
        SegmentationDataModule(str(tmp_path / "VOCdevkit"))


@pytest.mark.parametrize("output_stride, rates", [(8, (12, 24, 36)), (16, (6, 12, 18))])
def test_output_stride_shapes_and_rates(output_stride, rates):
    model = DeepLabV3("mobileone_s1", num_classes=5, output_stride=output_stride, aspp_channels=32).eval()
    x = torch.randn(1, 3, 64, 96)
    stage3, stage4 = model.backbone(x)
    assert stage3.shape[-2:] == stage4.shape[-2:] == (64 // output_stride, 96 // output_stride)
    aspp_rates = [m[0].dilation[0] for m in model.head[0].convs[1:4]]
    assert tuple(aspp_rates) == rates
    with torch.no_grad():
        assert model(x)["out"].shape == (1, 5, 64, 96)
    model.train()
    outputs = model(torch.randn(2, 3, 64, 96))
    assert outputs["aux"].shape == outputs["out"].shape == (2, 5, 64, 96)


@pytest.mark.slow
def test_demo_config_learns(tmp_path, monkeypatch):
    """The README's segmentation demo reaches far-above-chance mIoU."""
    import csv

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "segmentation" / "demo.yaml"
    main(["fit", "--config", str(config), "--trainer.enable_progress_bar=false"])
    (metrics,) = tmp_path.glob("outputs/segmentation/demo/version_*/metrics.csv")
    with open(metrics) as handle:
        mious = [float(row["val/mIoU"]) for row in csv.DictReader(handle) if row.get("val/mIoU")]
    assert mious[-1] >= 0.6, mious  # predicting background everywhere scores 0.206


def _add_sbd(voc_root: Path) -> None:
    """Add SBD's files to a VOC tree: grayscale SegmentationClassAug masks and train_aug.txt."""
    voc = voc_root / "VOC2012"
    (voc / "SegmentationClassAug").mkdir(exist_ok=True)
    ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for image_id in ids:
        labels = read_mask(voc / "SegmentationClass" / f"{image_id}.png").astype(np.uint8)
        Image.fromarray(labels, mode="L").save(voc / "SegmentationClassAug" / f"{image_id}.png")
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(ids[:4]) + "\n")


SEGMENTATION_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "segmentation").glob("*.yaml"))


@pytest.mark.parametrize("config", SEGMENTATION_CONFIGS, ids=[p.stem for p in SEGMENTATION_CONFIGS])
def test_every_shipped_config_runs(config, voc_root, tmp_path, monkeypatch, apple_weights_cache):
    """Each recipe / demo config trains a step and validates (CPU, tiny crops, fp32); recipes
    starting from Apple's weights find them in the cache (as placed by hand, offline)."""
    monkeypatch.chdir(tmp_path)
    model = load_config(config).get("model") or {}
    if model.get("backbone_weights") == "apple":
        apple_weights_cache(model["backbone"].removeprefix("mobileone_"))
    _add_sbd(voc_root)
    root = voc_root
    if "ade20k" in config.stem:
        root = tmp_path / "ADEChallengeData2016"
        labels = np.zeros((40, 48), dtype=np.uint8)
        labels[:20] = 7
        _write_ade(root, labels)
    if config.stem == "demo":
        root = tmp_path / "generated" / "VOCdevkit"
    if config.stem.startswith("camvid"):  # an image/mask folder set
        root = _write_folder_set(tmp_path / "scenes")
    main(["fit", "--config", str(config), f"--data.root={root}", "--trainer.fast_dev_run=1",
          "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true", "--data.batch_size=2",
          "--data.num_workers=0", "--data.crop_size=48", "--trainer.enable_progress_bar=false"])
    if config.stem == "demo":  # prepare_data generated the demo set in VOC layout
        assert (root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").is_file()


def test_head_learning_rate_and_poly_schedule(voc_root):
    import lightning.pytorch as pl

    from tasks.common.optim import warmup_poly

    data = SegmentationDataModule(str(voc_root), demo=True, batch_size=2, val_batch_size=2, num_workers=0, crop_size=32)
    task = SemanticSegmentationTask("mobileone_s0", num_classes=4, output_stride=16, aspp_channels=16, lr=0.01, head_lr_multiplier=10)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(task, data)
    groups = trainer.optimizers[0].param_groups
    backbone = {id(p) for p in task.model.backbone.parameters()}
    for group in groups:
        in_backbone = {id(p) in backbone for p in group["params"]}
        assert len(in_backbone) == 1
        assert group["initial_lr"] == pytest.approx(0.01 * 2 / 16 * (1 if in_backbone.pop() else 10))
    factor = warmup_poly(total_steps=100, power=0.9, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1) and factor(10) == 1.0 and factor(100) == 0.0
    assert factor(55) == pytest.approx(0.5**0.9)


@needs_executorch
def test_export_to_int8_and_executorch_takes_any_image_size(voc_root, trained, tmp_path):
    checkpoint = with_data_batchnorm(trained, SemanticSegmentationTask, lambda task: task.model, 64, tmp_path / "settled.ckpt")
    out = tmp_path / "exported"
    run("export", tmp_path, f"--data.root={voc_root}", f"--ckpt_path={checkpoint}", f"--output={out}", "--int8=true",
        "--executorch=true", "--calibration_images=6", "--calibration_method=percentile")
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["int8_calibration"] == {"images": 6, "onnx_method": "percentile", "onnx_scheme": default_int8_scheme(),
                                            "cpu": int8_cpu(), "cpu_flags": cpu_flags(),
                                            "preparation": "equalized activations, weights rounded as weight_rounding says (backbones.quantization)",
                                            "executorch_observer": "HistogramObserver (the XNNPACK quantizer's)",
                                            # 127 levels (s8s8 and XNNPACK): nearest; reduce_range's 64 (CPUs without VNNI): GPTQ-style
                                            "weight_rounding": {"127": "nearest"} if default_int8_scheme() == "s8s8"
                                            else {"64": "output_error", "127": "nearest"}}
    deployed = metadata["deployed"]
    for name in ("model.int8.onnx", "model.int8.pte"):
        comparison = deployed[name]["vs_float32"]
        # relative error of a briefly trained segmenter's logits: 0.40 measured on an AVX-512 VNNI AMD EPYC (2 test processes)
        assert comparison["agreement_count"] == 3 * 64 * 64 and comparison["agreement"] >= 0.8 and comparison["relative_error"] < 0.5

    task = SemanticSegmentationTask.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    data = SegmentationDataModule(root=str(voc_root), batch_size=2, num_workers=0, crop_size=48)
    images = next(task.export_batches(data))
    x = torch.nn.functional.interpolate(images, size=(80, 48), mode="bilinear")  # another size than the validation images
    with torch.no_grad():
        expected = task.model(x)["out"]
    assert deployed["model.pte"]["vs_float32"]["agreement"] > 0.999
    assert deployed["model.pte"]["validation"]["val/mIoU"] == pytest.approx(deployed["model_fused.pt"]["validation"]["val/mIoU"])
    # XNNPACK sums in another order than PyTorch: 7e-5 measured
    runs = {"model.int8.onnx": (OnnxRuntimeNetwork, 0.4), "model.pte": (ExecuTorchNetwork, 1e-4), "model.int8.pte": (ExecuTorchNetwork, 0.4)}
    for name, (runtime, bound) in runs.items():
        logits = runtime((out / name).read_bytes())(x)
        assert logits.shape == (len(x), 4, 80, 48) and relative_error(logits, expected) < bound, name
