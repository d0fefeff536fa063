"""Train every task on small real, human-labelled sets, from scratch or fine-tuned from ImageNet
weights, MobileOne beside its peers.

    python -m benchmarks.real_data --datasets-root /path/to/datasets
    python -m benchmarks.real_data --tasks detection --backbones mobileone mobilenet_v2 --epochs 10
    python -m benchmarks.real_data --pretrained --weights-root /path/to/weights --seeds 0 1 2

For each task and backbone this runs the task's own CLI (``python -m tasks.<task> fit``) with the
real-data recipe in ``configs/<task>/`` (the only change between backbones is
``--model.backbone``; with ``--pretrained`` the ``*_pretrained.yaml`` recipe and each backbone's
ImageNet file), evaluates the untrained network once, draws a few predictions of the
trained one, and writes to ``--results``: ``summary.json`` (every figure, per-epoch curves, wall
times, the machine), ``<task>_curves.png`` and ``<task>_predictions.jpg``; with ``--results-md``
it replaces the real-data section of that Markdown file. Training logs and checkpoints go to
``--work-dir``. Runs go one after another: two trainings at once on a small CPU slow each other
down many times.

Expected under ``--datasets-root``: ``hymenoptera/{train,val}/<class>/*.jpg`` (ImageFolder),
``fruits/voc/{train,val}/<name>.jpg + <name>.xml`` (Pascal VOC XML), ``camvid/{train,val}/
{images,masks}`` + ``camvid/classes.json``; with ``--pretrained`` also ``imagenet-sample/val/<wnid>/*``
(the ImageNet top-1 of the weights themselves, through the task and through torchvision's reference
pipeline). Expected under ``--weights-root``: ``mobileone_s0.pth.tar`` (Apple's S0 release, fused
form) and ``mobilenet_v2_imagenet_dequantized.pth`` (torchvision's ImageNet MobileNetV2), or give
``--weights <backbone>=<file> ...``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from backbones.atomic import atomic_write_file
from benchmarks.machine import describe_machine
from tasks.classification.module import ImageClassificationTask
from tasks.common.backbones import MOBILEONE_BACKBONES
from tasks.common.module import BaseTask
from tasks.detection.module import ObjectDetectionTask
from tasks.segmentation.module import SemanticSegmentationTask

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = Path(os.environ.get("MOBILEONE_DATASETS", ROOT.parent / "shared" / "datasets"))
DEFAULT_WEIGHTS = Path(os.environ.get("MOBILEONE_WEIGHTS", ROOT.parent / "shared" / "weights"))
WEIGHT_FILES = {"mobileone_s0": "mobileone_s0.pth.tar", "mobilenet_v2": "mobilenet_v2_imagenet_dequantized.pth"}  # under --weights-root
SCRATCH, IMAGENET = "scratch", "imagenet"  # how a run starts
SECTION_BEGIN = "<!-- real-data benchmark: begin (written by python -m benchmarks.real_data) -->"
SECTION_END = "<!-- real-data benchmark: end -->"
DRAWN_SCORE = 0.2  # detections drawn in the prediction pictures: these short runs score below the writer's default 0.3


@dataclass(frozen=True)
class Setting:
    """One task on one dataset: its config, where its data is, what it is judged by."""

    task: str
    dataset: str
    config: str
    data_dir: str  # under --datasets-root
    task_class: type[BaseTask]  # what the metric and the weights option are read from
    extra_metrics: tuple[str, ...]
    pretrained_config: str  # the fine-tuning recipe (--pretrained)

    def config_for(self, start: str) -> str:
        return self.pretrained_config if start == IMAGENET else self.config

    @property
    def metric(self) -> str:
        """The metric the task declares (``validation_metric``, all higher-is-better here), as its logs name it under ``val/``."""
        if self.task_class.validation_metric_mode != "max":
            raise ValueError(f"{self.task_class.__name__}.validation_metric is lower-is-better: the summaries assume higher")
        return self.task_class.validation_metric.removeprefix("val/")

    @property
    def weights_option(self) -> str:
        """The CLI option that takes ImageNet weights (the task's declared ``weights_hparam``)."""
        return f"--model.{self.task_class.weights_hparam}"

    def summary(self) -> dict:
        """The setting as ``summary.json`` records it (the task class by its import path)."""
        return {"task": self.task, "dataset": self.dataset, "config": self.config, "data_dir": self.data_dir,
                "task_class": f"{self.task_class.__module__}.{self.task_class.__qualname__}", "metric": self.metric,
                "extra_metrics": list(self.extra_metrics), "pretrained_config": self.pretrained_config,
                "weights_option": self.weights_option}


SETTINGS = {
    "classification": Setting(
        "classification", "hymenoptera (ants / bees)", "configs/classification/hymenoptera.yaml", "hymenoptera",
        ImageClassificationTask, (), "configs/classification/hymenoptera_pretrained.yaml",
    ),
    "detection": Setting(
        "detection", "fruits (Pascal VOC XML as published)", "configs/detection/fruits_voc.yaml", "fruits/voc",
        ObjectDetectionTask, ("mAP_50", "mAP_75"), "configs/detection/fruits_voc_pretrained.yaml",
    ),
    "segmentation": Setting(
        "segmentation", "CamVid (11 classes)", "configs/segmentation/camvid.yaml", "camvid",
        SemanticSegmentationTask, ("pixel_acc",), "configs/segmentation/camvid_pretrained.yaml",
    ),
}


def csv_logger(save_dir: Path, version: str) -> dict:
    """The ``--trainer.logger`` value of a CSVLogger writing ``<save_dir>/<version>/metrics.csv``."""
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir), "name": "", "version": version}}


def _override_config(work: Path) -> Path:
    """Logger and checkpoints of one run into ``work`` (a second ``--config`` replaces the recipe's); the
    checkpoints follow the task's declared metric."""
    content = {
        "trainer": {
            "enable_progress_bar": False,
            "logger": [csv_logger(work, "fit")],
            "callbacks": [
                {"class_path": "tasks.common.callbacks.TaskCheckpoint", "init_args": {"dirpath": str(work / "checkpoints")}},
            ],
        }
    }
    path = work / "override.yaml"
    path.write_text(json.dumps(content, indent=1))  # JSON is YAML
    return path


def _run(command: list[str], log_path: Path) -> float:
    """Run ``command`` from the repository root, output to ``log_path``; return the wall time (s)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode}); end of {log_path}:\n{tail}")
    return seconds


def _metrics(csv_path: Path, prefix: str = "val/") -> list[dict[str, float]]:
    """Per-epoch validation rows of a CSVLogger ``metrics.csv`` (keys without ``prefix``)."""
    rows: dict[int, dict[str, float]] = {}
    with open(csv_path) as handle:
        for row in csv.DictReader(handle):
            values = {k[len(prefix):]: float(v) for k, v in row.items() if k.startswith(prefix) and v not in ("", None)}
            if values:
                rows.setdefault(int(row["epoch"]), {}).update(values)
    return [{"epoch": epoch, **values} for epoch, values in sorted(rows.items())]


def _predict_inputs(setting: Setting, data: Path, work: Path, count: int) -> Path:
    """Links to ``count`` validation images (for classification: spread over the classes)."""
    folder = work / "predict_input"
    folder.mkdir(parents=True, exist_ok=True)
    if setting.task == "classification":
        classes = sorted(p for p in (data / "val").iterdir() if p.is_dir())
        per_class = [sorted(c.iterdir()) for c in classes]
        images = [files[i] for i in range(count) for files in per_class if i < len(files)][:count]
    else:  # evenly spaced over the sorted validation images (fruits: apple, banana, mixed, orange)
        folder_of_images = data / "val" if setting.task == "detection" else data / "val" / "images"
        candidates = sorted(p for p in folder_of_images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        images = [candidates[i * len(candidates) // count] for i in range(min(count, len(candidates)))]
    for image in images:
        link = folder / image.name
        if not link.exists():
            link.symlink_to(image.resolve())
    return folder


def run_folder(work_root: Path, task: str, backbone: str, seed: int, start: str = SCRATCH) -> Path:
    """The folder of one run (its logs, ``override.yaml`` and ``checkpoints/last.ckpt``)."""
    return work_root / task / f"{backbone.replace(':', '_')}{'_imagenet' if start == IMAGENET else ''}_seed{seed}"


def run_key(run: dict) -> tuple:
    """What identifies a run in a summary (runs written before ``--pretrained`` started from scratch)."""
    return run["task"], run["backbone"], run.get("start", SCRATCH), run["seed"]


def run_one(setting: Setting, backbone: str, datasets_root: Path, work_root: Path, epochs: int | None, seed: int,
            predictions: int, weights: str | None = None) -> dict:
    """Train, evaluate untrained and trained, and predict for one task and backbone; from ImageNet
    ``weights`` with the setting's pretrained recipe, or from scratch."""
    data = datasets_root / setting.data_dir
    if not data.is_dir():
        raise SystemExit(f"{data} does not exist: give --datasets-root (the folder holding {setting.data_dir})")
    start = SCRATCH if weights is None else IMAGENET
    work = run_folder(work_root, setting.task, backbone, seed, start)
    work.mkdir(parents=True, exist_ok=True)
    override = _override_config(work)
    task = [sys.executable, "-m", f"tasks.{setting.task}"]
    common = ["--config", setting.config_for(start), "--config", str(override), "--data.root", str(data),
              "--model.backbone", backbone, f"--seed_everything={seed}"]
    if weights is not None:
        common += [setting.weights_option, weights]
    print(f"[real_data] {setting.task} / {backbone} / {start} / seed {seed}: untrained evaluation", flush=True)
    _run([*task, "validate", *common, "--trainer.logger", json.dumps(csv_logger(work, "untrained"))], work / "untrained.log")
    untrained = _metrics(work / "untrained" / "metrics.csv")[-1]
    print(f"[real_data] {setting.task} / {backbone} / {start} / seed {seed}: training ({work / 'fit.log'})", flush=True)
    fit_args = [*common] + ([f"--trainer.max_epochs={epochs}"] if epochs else [])
    seconds = _run([*task, "fit", *fit_args], work / "fit.log")
    curve = _metrics(work / "fit" / "metrics.csv")
    checkpoint = work / "checkpoints" / "last.ckpt"
    inputs = _predict_inputs(setting, data, work, predictions)
    output = work / "predictions"
    writer = {  # the writers' public options: classification writes one CSV file, the dense tasks a folder of pictures
        "classification": ["--predictions.output", str(output / "predictions.csv")],
        "detection": ["--predictions.output", str(output), f"--predictions.draw_threshold={DRAWN_SCORE}"],
        "segmentation": ["--predictions.output", str(output)],
    }[setting.task]
    _run([*task, "predict", *common, f"--ckpt_path={checkpoint}", f"--data.predict_dir={inputs}",
          "--trainer.logger=false", *writer], work / "predict.log")
    final = curve[-1]
    print(f"[real_data] {setting.task} / {backbone} / {start}: {setting.metric} {final[setting.metric]:.4f} after "
          f"{final['epoch'] + 1} epochs, {seconds / 60:.1f} min (untrained {untrained[setting.metric]:.4f})", flush=True)
    return {"task": setting.task, "backbone": backbone, "start": start, "weights": weights, "config": setting.config_for(start),
            "seed": seed, "epochs": final["epoch"] + 1, "wall_s": round(seconds, 1),
            "final": final, "untrained": untrained, "curve": curve, "predictions": str(output), "inputs": str(inputs)}


def reference_top1(backbone: str, weights: str, images: Path) -> tuple[float, float, int]:
    """Top-1 and top-5 of ImageNet ``weights`` on ``images/val/<wnid>/*`` through torchvision's
    reference evaluation (PIL, Resize 256, CenterCrop 224, ImageNet mean / std; labels from
    ``images/classes.txt``), the network loaded with ``strict=True``; and the image count."""
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms

    from backbones import mobileone
    from benchmarks.int8_schemes import imagenet_sample
    from tasks.common.data import IMAGENET_MEAN, IMAGENET_STD

    if backbone in MOBILEONE_BACKBONES:  # Apple's fused release
        network = mobileone(backbone.removeprefix("mobileone_"), inference_mode=True)
    else:
        network = torchvision.models.get_model(backbone, weights=None)
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    network.eval()
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    files, indices = imagenet_sample(images)
    top1 = top5 = 0
    with torch.no_grad():
        for first in range(0, len(files), 50):
            chunk = files[first:first + 50]
            batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in chunk])
            labels = torch.tensor(indices[first:first + 50])
            best = network(batch).topk(5, dim=1).indices
            top1 += int((best[:, 0] == labels).sum())
            top5 += int((best == labels[:, None]).any(1).sum())
    return top1 / len(files), top5 / len(files), len(files)


def imagenet_top1(backbone: str, weights: str, images: Path, work_root: Path) -> dict:
    """The ImageNet top-1 / top-5 of ``weights`` on ``images``, through the task's ``validate`` (the
    ImageNet recipe with ``--data.classes imagenet``: no training split) and through ``reference_top1``."""
    work = work_root / "imagenet" / backbone.replace(":", "_")
    work.mkdir(parents=True, exist_ok=True)
    print(f"[real_data] ImageNet top-1 of {weights} on {images}", flush=True)
    _run([sys.executable, "-m", "tasks.classification", "validate", "--config", "configs/classification/mobileone_s0_imagenet.yaml",
          "--data.root", str(images), "--data.classes", "imagenet", "--model.backbone", backbone, "--model.weights", weights,
          "--data.batch_size", "50", "--data.num_workers", "2", "--trainer.precision", "32", "--trainer.enable_progress_bar", "false",
          "--trainer.logger", json.dumps(csv_logger(work, "validate"))], work / "validate.log")
    task = _metrics(work / "validate" / "metrics.csv")[-1]
    reference = reference_top1(backbone, weights, images)
    print(f"[real_data] {backbone}: top-1 {task['acc1']:.4f} (task), {reference[0]:.4f} (reference pipeline)", flush=True)
    return {"backbone": backbone, "weights": weights, "images": reference[2], "task_acc1": task["acc1"], "task_acc5": task["acc5"],
            "reference_acc1": reference[0], "reference_acc5": reference[1]}


def _plot_curves(runs: list[dict], setting: Setting, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (setting.metric, *[m for m in setting.extra_metrics if m == "mAP_50"])
    figure, axis = plt.subplots(figsize=(6.4, 4), dpi=110)
    lines = list(dict.fromkeys((run["backbone"], run.get("start", SCRATCH)) for run in runs))
    seeds = sorted({run["seed"] for run in runs})
    for run in runs:
        line = (run["backbone"], run.get("start", SCRATCH))
        for key, style in zip(keys, ("-", "--")):
            epochs = [row["epoch"] + 1 for row in run["curve"] if key in row]
            values = [100 * row[key] for row in run["curve"] if key in row]
            axis.plot(epochs, values, style, color=f"C{lines.index(line)}", marker="os^v"[seeds.index(run["seed"]) % 4],
                      markersize=3, label=f"{line[0]} ({line[1]}) {key}" if run["seed"] == seeds[0] else None)
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"validation {' / '.join(keys)} (%)")
    axis.set_title(f"{setting.task}: {setting.dataset}, on the CPU\n(seeds {', '.join(map(str, seeds))}: markers {' '.join('os^v'[:len(seeds)])})",
                   fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _montage(runs: list[dict], setting: Setting, path: Path, width: int = 240) -> None:
    """Rows: validation images; columns: backbone and start (the first seed's run of each)."""
    from PIL import Image, ImageDraw

    columns = {}
    for run in runs:
        columns.setdefault(f"{run['backbone']} ({run.get('start', SCRATCH)})", run)
    tiles: list[list[Image.Image]] = []
    for run in columns.values():
        output, column = Path(run["predictions"]), []
        if setting.task == "classification":
            with open(output / "predictions.csv") as handle:
                for row in csv.DictReader(handle):
                    image = Image.open(row["path"]).convert("RGB")
                    truth = Path(os.path.realpath(row["path"])).parent.name
                    text = f"{row['class1']} {float(row['probability1']):.2f} (true: {truth})"
                    image = image.resize((width, round(image.height * width / image.width)))
                    ImageDraw.Draw(image).rectangle((0, 0, width, 14), fill=(0, 0, 0))
                    ImageDraw.Draw(image).text((3, 1), text, fill=(255, 255, 255))
                    column.append(image)
        else:
            suffix = ".jpg" if setting.task == "detection" else "_overlay.jpg"
            for source in sorted(Path(run["inputs"]).iterdir()):
                image = Image.open(output / f"{source.stem}{suffix}").convert("RGB")
                column.append(image.resize((width, round(image.height * width / image.width))))
        tiles.append(column)
    rows = min(len(c) for c in tiles)
    heights = [max(c[r].height for c in tiles) for r in range(rows)]
    sheet = Image.new("RGB", (width * len(tiles), 16 + sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for x, name in enumerate(columns):
        draw.text((x * width + 3, 2), name, fill=(0, 0, 0))
    for x, column in enumerate(tiles):
        y = 16
        for r in range(rows):
            sheet.paste(column[r], (x * width, y))
            y += heights[r]
    sheet.save(path, quality=85)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def tail_mean_sd(curve: list[dict], key: str, epochs: int = 5) -> tuple[float, float]:
    """Mean and standard deviation of ``key`` over the last ``epochs`` validations: how much the
    final figure moves from one epoch to the next, a floor for the noise of a comparison."""
    return mean_sd([row[key] for row in curve if key in row][-epochs:])


def markdown(summary: dict) -> str:
    """The real-data section of RESULTS.md from a summary."""
    starts = {run.get("start", SCRATCH) for run in summary["runs"]}
    recipes = [s["config"] for s in summary["settings"].values()] * (SCRATCH in starts) + \
        [s["pretrained_config"] for s in summary["settings"].values() if "pretrained_config" in s] * (IMAGENET in starts)
    lines = [
        SECTION_BEGIN,
        "## Real data: each task from scratch and fine-tuned from ImageNet weights on the CPU, MobileOne-S0 beside MobileNetV2",
        "",
        "Short trainings on small real, human-labelled sets, sized to fit a 2-core CPU: they show that each pipeline "
        "learns on real images and compare backbones under one budget (same recipe, epochs, image size, batch and seed; "
        "only `--model.backbone` and its weights change). *scratch*: random initialization; *imagenet*: fine-tuned from "
        "ImageNet weights, Apple's MobileOne-S0 release (fused form, rebuilt in train form and calibrated on the "
        "training images) and torchvision's MobileNetV2 (its quantized release dequantized: every BatchNorm folded, "
        "calibrated the same way; 71.66% ImageNet-val top-1, 0.2 points below torchvision's float release). They are "
        "not the paper's figures, which train for hundreds of GPU epochs on the full sets.",
        "",
        "Made by " + " and ".join(f"`{c}`" for c in summary["commands"]) + f"; machine: {summary['machine']}. Recipes: "
        + ", ".join(f"`{r}`" for r in recipes)
        + ". Metrics in %, on the validation split, after the last epoch; \"last 5\" is the mean ± standard "
        "deviation over the last five epochs' validations (how much the figure moves between epochs); "
        "\"before\" is the same network before training (random initialization, or the ImageNet backbone with "
        "its new head). Wall time: training only (`fit`), runs one at a time.",
        "",
        "| task | data | backbone | start | seed | epochs | metric | final | last 5 | before | other | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in summary["runs"]:
        setting = summary["settings"][run["task"]]
        other = ", ".join(f"{m} {_percent(run['final'][m])}" for m in setting["extra_metrics"] if m in run["final"])
        tail = tail_mean_sd(run["curve"], setting["metric"])
        lines.append(
            f"| {run['task']} | {setting['dataset']} | {run['backbone']} | {run.get('start', SCRATCH)} | {run['seed']} | {run['epochs']} | "
            f"{setting['metric']} | **{_percent(run['final'][setting['metric']])}** | {_percent(tail[0])} ± {_percent(tail[1])} | "
            f"{_percent(run['untrained'][setting['metric']])} | {other} | {run['wall_s'] / 60:.1f} min |"
        )
    groups: dict[tuple[str, str, str], list[float]] = {}
    for run in summary["runs"]:
        groups.setdefault(run_key(run)[:3], []).append(run["final"][summary["settings"][run["task"]]["metric"]])
    if any(len(values) > 1 for values in groups.values()):
        lines += ["", "Over the seeds (final metric, %; standard deviation across seeds):", "",
                  "| task | backbone | start | metric | seeds | mean | standard deviation | range |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (task, backbone, start), values in groups.items():
            mean, sd = mean_sd(values)
            lines.append(f"| {task} | {backbone} | {start} | {summary['settings'][task]['metric']} | {len(values)} | **{_percent(mean)}** | "
                         f"{_percent(sd)} | {_percent(min(values))}–{_percent(max(values))} |")
    segmentation = [r for r in summary["runs"] if r["task"] == "segmentation"]
    if segmentation:
        names = sorted({k.removeprefix("IoU/") for r in segmentation for k in r["final"] if k.startswith("IoU/")},
                       key=lambda n: summary["class_order"].index(n) if n in summary["class_order"] else 99)
        lines += ["", "Per-class IoU (%), segmentation:", "",
                  "| backbone | start | seed | " + " | ".join(names) + " |", "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for run in segmentation:
            cells = [_percent(run["final"][f"IoU/{n}"]) if f"IoU/{n}" in run["final"] else "n/a" for n in names]
            lines.append(f"| {run['backbone']} | {run.get('start', SCRATCH)} | {run['seed']} | " + " | ".join(cells) + " |")
    if summary.get("imagenet"):
        lines += ["", "The ImageNet weights themselves, top-1 / top-5 (%) on the real ImageNet images of `imagenet-sample` "
                  "(500 images of 500 classes; easier than ImageNet val, where both score ~71.5%), through the task "
                  "(`python -m tasks.classification validate --config configs/classification/mobileone_s0_imagenet.yaml "
                  "--data.classes imagenet --model.weights <file>`, no training split) and through torchvision's reference "
                  "pipeline (PIL, `Resize(256)`, `CenterCrop(224)`, the network loaded with `strict=True`):", "",
                  "| backbone | weights | images | task top-1 | task top-5 | reference top-1 | reference top-5 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in summary["imagenet"]:
            lines.append(f"| {row['backbone']} | `{Path(row['weights']).name}` | {row['images']} | **{_percent(row['task_acc1'])}** | "
                         f"{_percent(row['task_acc5'])} | {_percent(row['reference_acc1'])} | {_percent(row['reference_acc5'])} |")
    lines += ["", "Learning curves (all runs), then a few validation images as each backbone's model of the latest invocation predicts them "
              f"(classification: top class and probability; detection: boxes with score ≥ {DRAWN_SCORE}; segmentation: "
              "class overlay):"]
    for task in summary["settings"]:
        lines += ["", f"![{task} learning curves](results/real_data/{task}_curves.png)",
                  f"![{task} predictions](results/real_data/{task}_predictions.jpg)"]
    lines.append(SECTION_END)
    return "\n".join(lines)


def write_section(markdown_path: Path, section: str) -> None:
    """Replace the real-data section of ``markdown_path`` (or append it), atomically."""
    text = markdown_path.read_text() if markdown_path.is_file() else ""
    if SECTION_BEGIN in text and SECTION_END in text:
        before, rest = text.split(SECTION_BEGIN, 1)
        text = before + section + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_file(markdown_path, lambda temporary: temporary.write_text(text))


def merge(earlier: dict, new: dict) -> dict:
    """``new`` on top of an earlier summary: its runs replace those of the same task, backbone, start
    and seed, the others stay (e.g. a second seed, or one task rerun); the same for ImageNet rows."""
    replaced = {run_key(run) for run in new["runs"]}
    runs = [run for run in earlier["runs"] if run_key(run) not in replaced] + new["runs"]
    order = list(SETTINGS)
    runs.sort(key=lambda run: (order.index(run["task"]), run.get("start", SCRATCH) == IMAGENET, run["seed"]))
    imagenet = {row["backbone"]: row for row in [*earlier.get("imagenet", []), *new.get("imagenet", [])]}
    return {**new, "commands": [*earlier.get("commands", []), *new["commands"]],
            "settings": {**earlier["settings"], **new["settings"]}, "runs": runs, "imagenet": list(imagenet.values())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets-root", type=Path, default=DEFAULT_DATASETS,
                        help="folder holding hymenoptera/, fruits/ and camvid/ (default: $MOBILEONE_DATASETS or ../shared/datasets)")
    parser.add_argument("--tasks", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--backbones", nargs="+", default=["mobileone_s0", "mobilenet_v2"],
                        help="values of --model.backbone (MobileOne's variant is the recipe's, S0)")
    parser.add_argument("--epochs", type=int, default=None, help="budget: epochs of every run (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (their spread is the noise)")
    parser.add_argument("--predictions", type=int, default=4, help="validation images drawn per task and backbone")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "real_data", help="logs and checkpoints")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "real_data",
                        help="summary.json, curves and prediction pictures")
    parser.add_argument("--results-md", type=Path, default=None, help="Markdown file whose real-data section is rewritten")
    parser.add_argument("--merge", action="store_true",
                        help="add these runs to --results/summary.json (same task, backbone, start and seed replaced) instead of starting anew")
    parser.add_argument("--pretrained", action="store_true",
                        help="fine-tune from each backbone's ImageNet weights with the *_pretrained.yaml recipes (and measure "
                             "the weights' ImageNet top-1 on imagenet-sample) instead of training from scratch")
    parser.add_argument("--weights-root", type=Path, default=DEFAULT_WEIGHTS,
                        help=f"folder of the ImageNet files {WEIGHT_FILES} (default: $MOBILEONE_WEIGHTS or ../shared/weights)")
    parser.add_argument("--weights", nargs="+", default=[], metavar="BACKBONE=FILE", help="ImageNet weights of a backbone, "
                        "instead of the one under --weights-root")
    args = parser.parse_args(argv)

    weights: dict[str, str | None] = {backbone: None for backbone in args.backbones}
    if args.pretrained:
        given = dict(item.split("=", 1) for item in args.weights)
        for backbone in args.backbones:
            path = Path(given[backbone]) if backbone in given else args.weights_root / WEIGHT_FILES.get(backbone, f"{backbone}.pth")
            if not path.is_file():
                raise SystemExit(f"--pretrained: no ImageNet weights for {backbone} at {path}: give --weights {backbone}=<file>")
            weights[backbone] = str(path)
    args.results.mkdir(parents=True, exist_ok=True)
    settings = {task: SETTINGS[task] for task in args.tasks}
    runs = []
    for setting in settings.values():
        task_runs = [run_one(setting, backbone, args.datasets_root, args.work_dir, args.epochs, seed, args.predictions, weights[backbone])
                     for seed in args.seeds for backbone in args.backbones]
        _montage(task_runs, setting, args.results / f"{setting.task}_predictions.jpg")
        runs += task_runs
    classes_file = args.datasets_root / "camvid" / "classes.json"
    command = "python -m benchmarks.real_data " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {
        "commands": [command],
        "machine": describe_machine("cpu", None),
        "settings": {t: s.summary() for t, s in settings.items()},
        "class_order": json.loads(classes_file.read_text()) if classes_file.is_file() else [],
        "runs": [{k: v for k, v in run.items() if k not in ("predictions", "inputs")} for run in runs],
        "imagenet": [imagenet_top1(backbone, path, args.datasets_root / "imagenet-sample", args.work_dir)
                     for backbone, path in weights.items() if path is not None and (args.datasets_root / "imagenet-sample").is_dir()],
    }
    summary = merge(json.loads((args.results / "summary.json").read_text()), summary) if args.merge else summary
    for task in settings:
        _plot_curves([run for run in summary["runs"] if run["task"] == task], SETTINGS[task], args.results / f"{task}_curves.png")
    content = json.dumps(summary, indent=1)
    atomic_write_file(args.results / "summary.json", lambda temporary: temporary.write_text(content))
    print(f"[real_data] wrote {args.results / 'summary.json'}, curves and predictions in {args.results}")
    if args.results_md:
        write_section(args.results_md, markdown(summary))
        print(f"[real_data] rewrote the real-data section of {args.results_md}")


if __name__ == "__main__":
    main()
