"""The detection task: anchors vs mmdetection, COCO mAP vs pycocotools, data checks, the CLI end to end."""

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import load_config
from deployment import needs_executorch, with_data_batchnorm
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.image_list import ImageList

from tasks.common.data import IMAGENET_MEAN, IMAGENET_STD
from tasks.detection import formats
from tasks.detection.__main__ import DetectionCLI, main
from tasks.detection.data import CocoAnnotations, DetectionDataModule, InvalidAnnotationError, collate_lists, make_demo_coco
from tasks.detection.module import ObjectDetectionTask
from tasks.detection.ssdlite import ssdlite

CONFIG = str(Path(__file__).parent / "configs" / "detection.yaml")

# mmdetection's SSDLite anchor settings (configs/ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py)
MMDET_STRIDES = [16, 32, 64, 107, 160, 320]
MMDET_MIN_SIZES = [48, 100, 150, 202, 253, 304]
MMDET_MAX_SIZES = [100, 150, 202, 253, 304, 320]


def test_anchors_match_mmdetection():
    model = ssdlite("mobileone_s0", num_classes=4).eval()
    features = list(model.backbone(torch.zeros(1, 3, 320, 320)).values())
    anchors = model.anchor_generator(ImageList(torch.zeros(1, 3, 320, 320), [(320, 320)]), features)[0]
    sizes = [f.shape[-1] for f in features]
    assert sizes == [20, 10, 5, 3, 2, 1]
    counts = [6 * s * s for s in sizes]
    assert len(anchors) == sum(counts) == 3234
    start = 0
    for level, (size, count) in enumerate(zip(sizes, counts)):
        level_anchors = anchors[start:start + count].double()
        start += count
        lo, hi, stride = MMDET_MIN_SIZES[level], MMDET_MAX_SIZES[level], MMDET_STRIDES[level]
        # mmdetection: scales {1, sqrt(max/min)} at ratio 1, then ratios 1/2, 2, 1/3, 3 at scale 1; h/w = ratio
        expected_wh = {(lo, lo), (math.sqrt(lo * hi),) * 2}
        for ratio in (2, 3):
            expected_wh |= {(lo / math.sqrt(ratio), lo * math.sqrt(ratio)), (lo * math.sqrt(ratio), lo / math.sqrt(ratio))}
        wh = level_anchors[:, 2:] - level_anchors[:, :2]
        found = {tuple(round(v, 2) for v in pair) for pair in wh.tolist()}
        assert found == {tuple(round(v, 2) for v in pair) for pair in expected_wh}, level
        centres = (((level_anchors[:, :2] + level_anchors[:, 2:]) / 2) * 100).round().unique(dim=0) / 100
        grid = torch.tensor([(j + 0.5) * stride for j in range(size)], dtype=torch.float64)
        expected_centres = torch.cartesian_prod(grid, grid)
        assert torch.allclose(centres, (expected_centres * 100).round().unique(dim=0) / 100), level


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_demo_coco(tmp_path_factory.mktemp("coco") / "coco", train_images=8, val_images=10, size=96)


def run(subcommand: str, root: Path, workdir: Path, *extra: str) -> None:
    main([subcommand, "--config", CONFIG, "--data.root", str(root), "--trainer.default_root_dir", str(workdir), *extra])


@pytest.fixture(scope="module")
def trained(coco_root, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("fit")
    run("fit", coco_root, workdir)
    (checkpoint,) = workdir.glob("**/last.ckpt")
    return checkpoint


def test_demo_layout_is_coco(coco_root):
    coco = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    assert len(coco.getImgIds()) == 10 and [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square", "triangle"]
    assert any(not coco.getAnnIds(imgIds=[i]) for i in coco.getImgIds()), "some validation images have no objects"


def test_validate_prints_coco_table(coco_root, trained, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tasks")
    run("validate", coco_root, tmp_path, f"--ckpt_path={trained}")
    table = caplog.text
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in table
    assert table.count("Average Recall") == 6


def test_predict_writes_results_json_and_drawings(coco_root, trained, tmp_path):
    out = tmp_path / "predictions"
    run("predict", coco_root, tmp_path, f"--ckpt_path={trained}", f"--data.predict_dir={coco_root / 'val2017'}",
        f"--predictions.output={out}", "--predictions.draw_threshold=0.0")
    results = json.loads((out / "detections.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 3}
    assert all(len(r["bbox"]) == 4 and 0 <= r["score"] <= 1 for r in results)
    assert len(list(out.glob("*.jpg"))) == 10
    with Image.open(next(out.glob("*.jpg"))) as drawn:
        assert drawn.size == (96, 96)


def test_predictions_carry_the_datasets_category_ids_without_reading_validation(coco_root, trained, tmp_path, monkeypatch):
    """COCO's category ids have gaps: the writer gives the dataset's ids (linked into the model from
    the training json, the one annotation file ``predict`` parses) instead of the labels 1..K."""
    renumbered = {1: 11, 2: 22, 3: 33}
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        content = json.loads((coco_root / "annotations" / f"instances_{split}2017.json").read_text())
        content["categories"] = [{**c, "id": renumbered[c["id"]]} for c in content["categories"]]
        content["annotations"] = [{**a, "category_id": renumbered[a["category_id"]]} for a in content["annotations"]]
        (tmp_path / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(content))
        (tmp_path / f"{split}2017").symlink_to(coco_root / f"{split}2017")
    parsed = []
    monkeypatch.setattr(formats, "read_coco_json", lambda path, read=formats.read_coco_json: parsed.append(Path(path).name) or read(path))
    out = tmp_path / "predictions"
    run("predict", tmp_path, tmp_path, f"--ckpt_path={trained}", f"--data.predict_dir={coco_root / 'val2017'}",
        f"--predictions.output={out}", "--predictions.draw_threshold=0.0")
    assert parsed == ["instances_train2017.json"]
    results = json.loads((out / "detections.json").read_text())
    assert results and {r["category_id"] for r in results} <= {11, 22, 33}


def test_export_matches_detections(coco_root, trained, tmp_path):
    """A detector trained for 4 steps is numerically ill-conditioned (BN statistics still far from
    the activations): float32 rounding of fused weights moves its raw outputs by ~5e-5, hence the
    looser tolerance here; exactness is tested in float64 below, trained models reach ~1e-6."""
    out = tmp_path / "exported"
    run("export", coco_root, tmp_path, f"--ckpt_path={trained}", f"--output={out}", "--tolerance=1e-3")
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["fused_vs_unfused_relative_error"] < 1e-3 and metadata["onnx_vs_pytorch_relative_error"] < 1e-3
    # compared on every detection the detector keeps (score >= 0.02 after NMS, up to 200 per image)
    assert metadata["fused_vs_unfused_agreement_count"] >= 10
    assert metadata["fused_vs_unfused_agreement"] >= 0.99
    assert metadata["category_ids"] == {"1": 1, "2": 2, "3": 3}
    assert (metadata["mean"], metadata["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))  # the SSD transform's
    import onnx

    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    boxes, scores = session.run(None, {session.get_inputs()[0].name: np.random.randn(3, 3, 128, 128).astype(np.float32)})
    assert boxes.shape[0] == scores.shape[0] == 3 and boxes.shape[2] == 4 and scores.shape[2] == 4
    assert np.allclose(scores.sum(-1), 1, atol=1e-4)


def test_detector_fuses_exactly_in_float64():
    """Reparameterized backbone + folded conv-BN pairs of neck and head = the same function."""
    from backbones.export import fuse_for_deployment
    from backbones.testing import randomize_batchnorm, relative_error
    from tasks.detection.ssdlite import SSDRawOutputs

    network = SSDRawOutputs(randomize_batchnorm(ssdlite("mobileone_s1", num_classes=5, image_size=128)).eval(), 128).double()
    fused = fuse_for_deployment(network)
    assert not [m for m in fused.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        for actual, expected in zip(fused(x), network(x)):
            assert relative_error(actual, expected) < 1e-10


def _write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict], missing=()) -> Path:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for image in images:
        if image["file_name"] not in missing:
            Image.fromarray(np.zeros((image["height"], image["width"], 3), dtype=np.uint8)).save(root / "imgs" / image["file_name"])
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_map_equals_pycocotools(tmp_path):
    """Non-contiguous category ids, crowd boxes, an image without objects: our metric, fed through
    our data pipeline batch by batch, gives the numbers of pycocotools' COCOeval run on the json.
    (torchmetrics' MeanAveragePrecision does not: 0.2408 vs 0.2419 mAP@.5 here, from crowd boxes.)"""
    rng = np.random.default_rng(0)
    categories = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 12, "name": "c"}]
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 160} for i in range(1, 7)]
    annotations, detections = [], []
    for image in images[:-1]:  # the last image has no objects
        for _ in range(rng.integers(1, 6)):
            # quarter-pixel coordinates: exact in float32 as in float64, so IoUs are the same in both
            x, y, w, h = (float(np.round(v * 4) / 4) for v in (rng.uniform(0, 120), rng.uniform(0, 90), rng.uniform(8, 80), rng.uniform(8, 70)))
            category = int(rng.choice([3, 7, 12]))
            crowd = int(rng.random() < 0.15)
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h * 0.8, "iscrowd": crowd})
            for _ in range(2):  # a good and a noisy detection, sometimes of the wrong class
                jitter = np.round(rng.normal(0, 6, 4) * 4) / 4
                detections.append({"image_id": image["id"], "category_id": category if rng.random() < 0.8 else 7,
                                   "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                                   "score": float(rng.random())})
    detections.append({"image_id": 6, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9})
    ann = _write_coco(tmp_path, images, annotations, categories)

    reference = COCO(str(ann))
    evaluation = COCOeval(reference, reference.loadRes(detections), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()

    data = DetectionDataModule(train_ann=str(ann), train_images=str(tmp_path / "imgs"), val_ann=str(ann), val_images=str(tmp_path / "imgs"),
                               num_workers=0)
    data.setup("validate")
    task = ObjectDetectionTask("mobileone_s0", num_classes=4)
    labels = {cid: label for label, cid in data.category_ids.items()}
    for index in range(len(data.val_dataset)):
        images_, targets = collate_lists([data.val_dataset[index]])
        image_id = int(targets[0]["image_id"])
        mine = [d for d in detections if d["image_id"] == image_id]
        boxes = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]] for d in mine]).reshape(-1, 4)
        prediction = {"boxes": boxes, "scores": torch.tensor([d["score"] for d in mine]),
                      "labels": torch.tensor([labels[d["category_id"]] for d in mine], dtype=torch.int64)}
        task.val_map.update([prediction], [{k: targets[0][k] for k in ("boxes", "labels", "iscrowd", "area", "image_id")}])
    results = task.val_map.compute()
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]
    assert [float(results[k]) for k in keys] == pytest.approx(list(evaluation.stats), abs=1e-6)


def test_bad_annotations_warned_per_kind_or_raised(tmp_path):
    categories = [{"id": 1, "name": "a"}]
    images = [{"id": 1, "file_name": "1.png", "width": 100, "height": 80}, {"id": 2, "file_name": "gone.png", "width": 100, "height": 80}]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5], "iscrowd": 0},      # zero width
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [120, 10, 10, 10], "iscrowd": 0},   # outside
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [90, 70, 30, 30], "iscrowd": 0},    # clipped
        {"id": 13, "image_id": 1, "category_id": 99, "bbox": [10, 10, 10, 10], "iscrowd": 0},   # unknown category
        {"id": 14, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "iscrowd": 1},      # crowd
        {"id": 15, "image_id": 1, "category_id": 1, "bbox": [30, 30, 20, 20], "iscrowd": 0},    # fine
    ]
    ann = _write_coco(tmp_path, images, annotations, categories, missing=("gone.png",))
    with pytest.warns(UserWarning) as record:
        coco = CocoAnnotations(ann, tmp_path / "imgs")
    messages = [str(w.message) for w in record if "bad annotations" in str(w.message)]
    assert len(messages) == 1
    for kind in ("box clipped to the image: 1", "box outside the image: 1", "missing image file: 1",
                 "unknown category id: 1", "zero or negative width/height: 1"):
        assert kind in messages[0]
    assert list(coco.images) == [1]
    assert [a["box"] for a in coco.images[1]["annotations"]] == [[90.0, 70.0, 100.0, 80.0], [5.0, 5.0, 25.0, 25.0], [30.0, 30.0, 50.0, 50.0]]
    with pytest.raises(InvalidAnnotationError, match=r"ann.json: image id 2: file .*gone.png is missing"):
        CocoAnnotations(ann, tmp_path / "imgs", strict=True)

    data = DetectionDataModule(train_ann=str(ann), train_images=str(tmp_path / "imgs"), val_ann=str(ann), val_images=str(tmp_path / "imgs"),
                               num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.setup("fit")
    _, train_target = data.train_dataset[0]
    _, val_target = data.val_dataset[0]
    assert val_target["iscrowd"].tolist() == [0, 1, 0], "evaluation keeps crowd boxes, marked"
    assert 1 not in train_target["iscrowd"].tolist(), "training targets leave crowd boxes out"


def test_missing_coco_root_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_train2017.json does not exist; expected COCO 2017"):
        DetectionDataModule(root=str(tmp_path))


DETECTION_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "detection").glob("*.yaml"))


@pytest.fixture(scope="module")
def voc_root(coco_root, tmp_path_factory) -> Path:
    """The demo set as Pascal VOC pair folders train/ and val/ of <name>.jpg + <name>.xml."""
    root = tmp_path_factory.mktemp("voc") / "voc"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        data = json.loads((coco_root / "annotations" / f"instances_{split}2017.json").read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        for image in data["images"]:
            (root / split / image["file_name"]).symlink_to(coco_root / f"{split}2017" / image["file_name"])
            objects = "".join(
                f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox><xmin>{x}</xmin>"
                f"<ymin>{y}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
                for a in data["annotations"] if a["image_id"] == image["id"] for x, y, w, h in [a["bbox"]]
            )
            size = f"<size><width>{image['width']}</width><height>{image['height']}</height></size>"
            (root / split / Path(image["file_name"]).with_suffix(".xml")).write_text(f"<annotation>{size}{objects}</annotation>")
    return root


@pytest.mark.parametrize("config", DETECTION_CONFIGS, ids=[p.stem for p in DETECTION_CONFIGS])
def test_every_shipped_config_runs(config, coco_root, tmp_path, monkeypatch, request, apple_weights_cache):
    monkeypatch.chdir(tmp_path)
    model = load_config(config).get("model") or {}
    if model.get("backbone_weights") == "apple":  # Apple's weights as placed in the cache by hand (offline)
        apple_weights_cache(model["backbone"].removeprefix("mobileone_"))
    data_format = (load_config(config).get("data") or {}).get("format", "coco")
    root = tmp_path / "generated" if config.stem == "demo" else coco_root if data_format == "coco" else request.getfixturevalue(f"{data_format}_root")
    main(["fit", "--config", str(config), f"--data.root={root}", "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
          "--trainer.devices=1", "--trainer.precision=32-true", "--data.batch_size=2", "--data.num_workers=0",
          "--data.image_size=128", "--trainer.enable_progress_bar=false"])


@pytest.mark.slow
def test_demo_config_learns(tmp_path, monkeypatch):
    """The README's detection demo reaches mAP@.5 far above an untrained model (~0)."""
    import csv

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "detection" / "demo.yaml"
    main(["fit", "--config", str(config), "--trainer.enable_progress_bar=false"])
    (metrics,) = tmp_path.glob("outputs/detection/demo/version_*/metrics.csv")
    with open(metrics) as handle:
        values = [float(row["val/mAP_50"]) for row in csv.DictReader(handle) if row.get("val/mAP_50")]
    # the untrained model scores 0.005; this run (seed 0) ends at 0.646 on a 2-core AVX-512 Xeon (8 min 36 s),
    # seed 1 at 0.601 (9 min 5 s); both pass 0.41 by epoch 6 of 14
    assert values[-1] >= 0.45, values


def test_coco_evaluation_counts_repeated_images_once():
    from tasks.detection.coco_eval import CocoEvaluation

    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [70.0, 20.0, 90.0, 40.0]]), "labels": torch.tensor([1, 2]),
              "image_id": torch.tensor(5)}
    prediction = {"boxes": torch.tensor([[12.0, 9.0, 50.0, 58.0]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([1])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": torch.tensor(6)}
    false_positive = {"boxes": torch.tensor([[0.0, 0.0, 30.0, 30.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    once, twice = CocoEvaluation(), CocoEvaluation()
    once.update([prediction, false_positive], [target, empty])
    twice.update([prediction, false_positive], [target, empty])
    twice.update([prediction], [target])  # e.g. DistributedSampler padding repeats a sample
    first, second = once.compute(), twice.compute()
    assert {k: float(v) for k, v in first.items()} == {k: float(v) for k, v in second.items()}
    assert 0 < float(first["map_50"]) < 1, "the false positive on the empty image counts"


def test_train_max_size_shrinks_large_images_with_their_boxes():
    from torchvision import tv_tensors

    from tasks.detection.data import ShrinkToMaxSize

    shrink = ShrinkToMaxSize(100)
    image = tv_tensors.Image(torch.zeros(3, 300, 200, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[20.0, 30.0, 200.0, 300.0]]), format="XYXY", canvas_size=(300, 200))
    small, small_boxes = shrink(image, boxes)
    assert small.shape == (3, 100, 67) and small_boxes.canvas_size == (100, 67)
    assert torch.allclose(small_boxes, torch.tensor([[20 * 67 / 200, 10.0, 67.0, 100.0]]), atol=1e-4)
    little = tv_tensors.Image(torch.zeros(3, 50, 20, dtype=torch.uint8))
    assert shrink(little).shape == (3, 50, 20), "smaller images are not enlarged"


@needs_executorch
def test_export_to_int8_and_executorch_runs_the_deployed_post_processing(coco_root, trained, tmp_path):
    """model.json's metrics of the fused detector come from the documented deployment (resize,
    normalize, network, post-processing, rescaling) and equal those of `validate`."""
    checkpoint = with_data_batchnorm(trained, ObjectDetectionTask, lambda task: task.export_network(), 128, tmp_path / "settled.ckpt")
    out = tmp_path / "exported"
    run("export", coco_root, tmp_path, f"--ckpt_path={checkpoint}", f"--output={out}", "--tolerance=1e-3", "--int8=true",
        "--executorch=true", "--calibration_images=8")
    metadata = json.loads((out / "model.json").read_text())
    deployed = metadata["deployed"]
    int8_files = ["model.int8.onnx", "model.int8.pte"]
    assert sorted(deployed) == sorted(["model_fused.pt", "model.pte", *int8_files])

    cli = DetectionCLI(ObjectDetectionTask, DetectionDataModule, args=["validate", "--config", CONFIG, "--data.root", str(coco_root),
                                                                 "--trainer.default_root_dir", str(tmp_path), f"--ckpt_path={checkpoint}"])
    validated = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    fused = deployed["model_fused.pt"]["validation"]
    assert validated["val/mAP_50"] > 0, "a detector that finds something, or the comparison says nothing"
    for key in ("val/mAP", "val/mAP_50", "val/mAP_75"):
        assert fused[key] == pytest.approx(validated[key], abs=1e-4), key
    assert metadata["executorch_vs_pytorch_relative_error"] < 1e-3
    assert deployed["model.pte"]["vs_float32"]["agreement"] >= 0.99
    for name in int8_files:
        # a detector of 4 training steps is far from INT8-friendly (agreement 57% / 19% measured, against 0% for a
        # broken quantization): the cost on trained detectors is measured in benchmarks/RESULTS.md
        comparison = deployed[name]["vs_float32"]
        assert comparison["images"] == 10 and comparison["agreement_count"] >= 10 and comparison["agreement"] >= 0.1
    # INT8 covers backbone, neck and head: the box decoding stays float32 (no QuantizeLinear after the last Softmax / Exp)
    import onnx

    nodes = onnx.load(str(out / "model.int8.onnx")).graph.node
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) > 50
    assert not [n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] in {o for m in nodes if m.op_type == "Exp" for o in m.output}]
