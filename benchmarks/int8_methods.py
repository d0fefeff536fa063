"""INT8 on real ImageNet weights: plain post-training quantization against the network prepared for it.

    python -m benchmarks.int8_methods                     # S0 and MobileNetV2, fold 0, every variant
    python -m benchmarks.int8_methods --folds 0 1 --variants prepared   # the export's default, both folds

``imagenet-sample``'s 500 images (one per class of 500 ImageNet classes) are split into two halves
of 250 (seed 0; fold 1 swaps them), laid out as an ImageFolder of symbolic links: ``train/``
calibrates (the export's ``--calibration_images``, augmented as for training) and ``val/`` is held
out. Each variant is one ``python -m tasks.classification export`` of the ImageNet file (Apple's
fused MobileOne-S0, torchvision's MobileNetV2) with ``--int8 true``, which validates every file it
writes over the held-out half: top-1 of the fused float32 model, of ``model.int8.onnx``
(onnxruntime) and, where the variant has it, of ``model.int8.pte`` (ExecuTorch, XNNPACK), and the
agreement of each file's top-1 class with float32's. Variants:

- ``ptq``: plain post-training quantization, the export before ``backbones.quantization``
  (``--int8_preparation false``, minmax calibration);
- ``prepared``: the export's default, ``backbones.quantization.prepare_for_int8`` (activations
  equalized per channel, weight-rounding bias corrected), minmax calibration;
- ``prepared_percentile``: the same with percentile calibration (onnxruntime's file only);
- each with ``_reduce_range``: onnxruntime's scheme for x86 CPUs without VNNI (7-bit weights; computed
  exactly there and here, so its figures hold on both kinds of CPU); the others use ``s8s8``, which
  such CPUs compute with int16 saturation.

Then, from the ``prepared`` folder of each model, batch-1 one-thread latency of ``model.onnx`` against
``model.int8.onnx`` (onnxruntime) and ``model.pte`` against ``model.int8.pte`` (ExecuTorch),
interleaved in one run. The export writes nothing else; preparation does not change the graph, so
the latency of every variant's INT8 file is that of ``prepared``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.int8_schemes import DEFAULT_SHARED, MODELS, ROOT, imagenet_sample

CONFIG = "configs/classification/mobileone_s0_imagenet.yaml"
BACKBONES = {"mobileone_s0": [], "mobilenet_v2": ["--model.backbone", "mobilenet_v2"]}
ET = ["--executorch", "true"]
VARIANTS = {
    "ptq": ["--int8_preparation", "false", "--calibration_method", "minmax", "--int8_scheme", "s8s8", *ET],
    "prepared": ["--int8_preparation", "true", "--calibration_method", "minmax", "--int8_scheme", "s8s8", *ET],
    "prepared_percentile": ["--int8_preparation", "true", "--calibration_method", "percentile", "--int8_scheme", "s8s8"],
    "ptq_reduce_range": ["--int8_preparation", "false", "--calibration_method", "minmax", "--int8_scheme", "reduce_range"],
    "prepared_reduce_range": ["--int8_preparation", "true", "--calibration_method", "minmax", "--int8_scheme", "reduce_range"],
    "prepared_percentile_reduce_range": ["--int8_preparation", "true", "--calibration_method", "percentile",
                                         "--int8_scheme", "reduce_range"],
}
METRIC = "val/acc1"
HALF = 250


def split_folder(shared: Path, work: Path, fold: int) -> Path:
    """``work/fold<k>/{train,val}/<wnid>/<image>``: symbolic links to the two halves of imagenet-sample."""
    paths, _ = imagenet_sample(shared / "datasets" / "imagenet-sample")
    order = np.random.default_rng(0).permutation(len(paths))
    halves = (order[:HALF], order[HALF:]) if fold == 0 else (order[HALF:], order[:HALF])
    root = work / f"fold{fold}"
    for split, indices in zip(("train", "val"), halves):
        for index in indices:
            link = root / split / paths[index].parent.name / paths[index].name
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(paths[index].resolve())
    return root


def export(model: str, variant: str, data_root: Path, weights: Path, output: Path) -> tuple[dict, float]:
    """One export of ``model``'s ImageNet file with ``variant``'s options; its ``model.json`` and wall time."""
    command = [
        sys.executable, "-m", "tasks.classification", "export", "--config", CONFIG, *BACKBONES[model],
        "--model.weights", str(weights), "--data.root", str(data_root), "--data.classes", "imagenet",
        "--data.num_workers", "2", "--output", str(output), "--int8", "true", "--calibration_images", str(HALF),
        *VARIANTS[variant],
    ]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return json.loads((output / "model.json").read_text()), time.perf_counter() - started


def rows(model: str, variant: str, fold: int, metadata: dict) -> list[dict]:
    deployed = metadata["deployed"]
    reference = deployed["model_fused.pt"]["validation"][METRIC]
    result = []
    for name in ("model.int8.onnx", "model.int8.pte"):
        if name not in deployed:
            continue
        record = deployed[name]
        calibration = metadata["int8_calibration"]
        result.append({
            "model": model, "variant": variant, "fold": fold, "file": name, "runtime": record["runtime"],
            "scheme": calibration["onnx_scheme"] if name.endswith(".onnx") else "XNNPACK int8",
            "calibration": calibration["onnx_method"] if name.endswith(".onnx") else "histogram",
            "float32": reference, "int8": record["validation"][METRIC],
            "agreement": record["vs_float32"]["agreement"], "images": record["vs_float32"]["agreement_count"],
        })
    return result


def latency_ms(folder: Path, rounds: int) -> dict[str, float]:
    """Median batch-1, one-thread latency of the float32 and INT8 files in ``folder``, timed interleaved."""
    import onnxruntime as ort
    import torch

    from backbones.runtimes import ExecuTorchNetwork

    torch.set_num_threads(1)
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    runners = {}
    for name in ("model.onnx", "model.int8.onnx"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
        runners[name] = lambda session=session: session.run(None, {"images": image})
    for name in ("model.pte", "model.int8.pte"):
        if (folder / name).is_file():
            program = ExecuTorchNetwork((folder / name).read_bytes())
            tensor = torch.from_numpy(image)
            runners[name] = lambda program=program: program(tensor)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(rounds + 5):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            if round_ >= 5:  # warm-up
                times[name].append(1000 * (time.perf_counter() - started))
    return {name: float(np.median(values)) for name, values in times.items()}


def markdown(results: list[dict]) -> str:
    lines = ["| model | method | file (runtime, scheme) | calibration | fold | float32 top-1 | INT8 top-1 | vs float32 | agreement with float32 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results:
        lines.append(
            f"| {row['model']} | {row['variant'].replace('_reduce_range', '')} | `{row['file']}` ({row['runtime']}, {row['scheme']}) | "
            f"{row['calibration']} | {row['fold']} | {100 * row['float32']:.1f} | {100 * row['int8']:.1f} | "
            f"{100 * (row['int8'] - row['float32']):+.1f} | {100 * row['agreement']:.1f}% of {row['images']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder holding weights/ and datasets/imagenet-sample")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "int8_methods")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--folds", nargs="+", type=int, default=[0], choices=[0, 1])
    parser.add_argument("--rounds", type=int, default=50, help="latency rounds")
    args = parser.parse_args(argv)
    from benchmarks.machine import describe_machine

    results = []
    for fold in args.folds:
        data_root = split_folder(args.shared, args.work_dir, fold)
        for model in args.models:
            for variant in args.variants:
                output = args.work_dir / f"fold{fold}" / "exports" / f"{model}.{variant}"
                metadata, seconds = export(model, variant, data_root, args.shared / "weights" / MODELS[model], output)
                results.extend(rows(model, variant, fold, metadata))
                print(f"{model} {variant} fold {fold}: exported and validated in {seconds:.0f} s", flush=True)
    print(f"machine: {describe_machine('cpu')}; held-out half of imagenet-sample ({HALF} images), the other half calibrates")
    print(markdown(results))
    (args.work_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if "prepared" in args.variants:
        print(f"\nbatch 1, 1 thread, median of {args.rounds} interleaved rounds, the prepared export's files (fold {args.folds[0]}):")
        print("| model | onnxruntime float32 | onnxruntime INT8 | speed-up | ExecuTorch float32 | ExecuTorch INT8 | speed-up |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for model in args.models:
            times = latency_ms(args.work_dir / f"fold{args.folds[0]}" / "exports" / f"{model}.prepared", args.rounds)
            print(f"| {model} | {times['model.onnx']:.2f} ms | {times['model.int8.onnx']:.2f} ms | "
                  f"{times['model.onnx'] / times['model.int8.onnx']:.2f}x | {times['model.pte']:.2f} ms | "
                  f"{times['model.int8.pte']:.2f} ms | {times['model.pte'] / times['model.int8.pte']:.2f}x |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
