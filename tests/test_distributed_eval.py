"""Validation over 2 processes (DDP, gloo) gives exactly the single-process metrics on an odd-sized
validation set: no sample is counted twice (torch's DistributedSampler would pad with a duplicate)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.classification.data import make_demo_dataset
from tasks.detection.data import make_demo_coco
from tasks.segmentation.data import make_demo_voc

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).parent / "configs"


def validate(task: str, workdir: Path, devices: int, *args: str) -> dict[str, float]:
    """``python -m tasks.<task> validate`` on ``devices`` CPU processes; the logged metrics."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(workdir), "name": "", "version": "v"}}
    strategy = ["--trainer.strategy=ddp"] if devices > 1 else []
    command = [sys.executable, "-m", f"tasks.{task}", "validate", "--config", str(CONFIGS / f"{task}.yaml"),
               f"--trainer.devices={devices}", *strategy, "--trainer.logger=" + json.dumps(logger), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    with open(workdir / "v" / "metrics.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    return {key: float(value) for key, value in row.items() if value not in ("", None) and key != "step"}


def assert_same_metrics(task: str, data_args: list[str], tmp_path: Path) -> None:
    single = validate(task, tmp_path / "one", 1, *data_args)
    double = validate(task, tmp_path / "two", 2, *data_args)
    assert single.keys() == double.keys()
    for key, value in single.items():
        assert double[key] == pytest.approx(value, rel=1e-6, abs=1e-7), f"{task} {key}: 2 processes {double[key]} vs 1 {value}"


def test_classification_metrics_count_each_sample_once(tmp_path):
    root = make_demo_dataset(tmp_path / "shapes", train_per_class=1, val_per_class=3, size=40)  # 15 images
    assert_same_metrics("classification", [f"--data.root={root}", "--data.batch_size=4"], tmp_path)


def test_segmentation_metrics_count_each_sample_once(tmp_path):
    root = make_demo_voc(tmp_path / "VOCdevkit", train_images=2, val_images=5, size=64)
    assert_same_metrics("segmentation", [f"--data.root={root}"], tmp_path)


def test_detection_metrics_count_each_sample_once(tmp_path):
    root = make_demo_coco(tmp_path / "coco", train_images=2, val_images=5)
    assert_same_metrics("detection", [f"--data.root={root}"], tmp_path)


def predict_detections(workdir: Path, devices: int, root: Path) -> tuple[list[dict], str]:
    """``python -m tasks.detection predict`` (untrained, seeded weights) on ``devices`` CPU processes:
    ``detections.json`` and the output."""
    strategy = ["--trainer.strategy=ddp"] if devices > 1 else []
    command = [sys.executable, "-m", "tasks.detection", "predict", "--config", str(CONFIGS / "detection.yaml"),
               f"--data.root={root}", f"--data.predict_dir={root / 'val2017'}", f"--trainer.devices={devices}", *strategy,
               f"--predictions.output={workdir}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return json.loads((workdir / "detections.json").read_text()), result.stderr


def test_detection_predict_writes_every_process_detections_once(tmp_path):
    root = make_demo_coco(tmp_path / "coco", train_images=2, val_images=5)
    single, _ = predict_detections(tmp_path / "one", 1, root)
    double, output = predict_detections(tmp_path / "two", 2, root)
    assert "for 5 images" in output
    assert len({r["file_name"] for r in single}) == 5

    def per_image(results: list[dict]) -> dict[str, list[float]]:
        scores: dict[str, list[float]] = {}
        for result in results:
            scores.setdefault(result["file_name"], []).append(result["score"])
        return {name: sorted(values) for name, values in scores.items()}

    one, two = per_image(single), per_image(double)
    assert one.keys() == two.keys()
    for name in one:
        assert two[name] == pytest.approx(one[name], abs=1e-3), name  # batches of another size: rounding
