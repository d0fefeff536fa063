"""INT8 on real ImageNet weights: plain post-training quantization against the network prepared for it.

    python -m benchmarks.int8_methods                     # S0 and MobileNetV2, fold 0, every variant
    python -m benchmarks.int8_methods --folds 0 1 --models mobileone_s0 --variants prepared_percentile searched
        prepared_percentile_reduce_range searched_reduce_range     # the range search against the calibrated ranges

``imagenet-sample``'s 500 images (one per class of 500 ImageNet classes) are split into two halves
of 250 (seed 0; fold 1 swaps them), preprocessed as torchvision's ImageNet evaluation: one calibrates,
the other is held out. Each variant is one run of ``tasks.common.export.fuse_and_export`` (what
``export --int8 true`` runs) on the ImageNet file (Apple's fused MobileOne-S0, torchvision's
MobileNetV2), which validates every file it writes over the held-out half: top-1 of the fused
float32 model, of ``model.int8.onnx`` (onnxruntime) and, where the variant has it, of
``model.int8.pte`` (ExecuTorch, XNNPACK), and the agreement of each file's top-1 class with
float32's. Variants:

- ``ptq``: plain post-training quantization, the export before ``backbones.quantization``
  (``--int8_preparation false``, minmax calibration);
- ``prepared``: ``backbones.quantization.prepare_for_int8`` (activations equalized per channel,
  weight-rounding bias corrected), minmax calibration, and the ExecuTorch file;
- ``prepared_percentile``: the same with percentile calibration (the export's default before the
  range search);
- ``searched``: then each activation's range narrowed where that brings the INT8 logits closer to
  float32's on 64 calibration images (``backbones.quantization.prepare_with_searched_ranges``), for
  both files: the export's default for a MobileOne classifier;
- ``searched_gptq``: ``searched`` with the weights rounded for each layer's output error
  (GPTQ-style, ``backbones.quantization.round_weights_for_output_error``) instead of to the nearest
  step with bias correction (every other variant pins the nearest rounding);
- ``gptq_reduce_range``: ``prepared_percentile_reduce_range`` with that rounding;
- each with ``_reduce_range``: onnxruntime's scheme for x86 CPUs without VNNI (7-bit weights; computed
  exactly there and here, so its figures hold on both kinds of CPU); the others use ``s8s8``, which
  such CPUs compute with int16 saturation.

Then, from the folder of the first of ``searched``, ``prepared_percentile``, ``prepared`` that ran
(fold: the first given), for each model, batch-1 one-thread latency of ``model.onnx`` against
``model.int8.onnx`` (onnxruntime) and ``model.pte`` against ``model.int8.pte`` (ExecuTorch),
interleaved in one run. The export writes nothing else; neither preparation nor the range search
changes the graph (only weights and scales), so every variant's INT8 file runs in the same time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.int8_schemes import DEFAULT_SHARED, MODELS, ROOT, fused_network, imagenet_sample, one_thread_session, preprocess

VARIANTS = {  # fuse_and_export's INT8 options (ExportOptions)
    "ptq": dict(int8_preparation=False, calibration_method="minmax", int8_scheme="s8s8", executorch=True),
    "prepared": dict(int8_preparation=True, int8_range_search=False, calibration_method="minmax", int8_scheme="s8s8", executorch=True),
    "prepared_percentile": dict(int8_preparation=True, int8_range_search=False, calibration_method="percentile", int8_scheme="s8s8",
                                executorch=True),
    "searched": dict(int8_preparation=True, calibration_method="percentile", int8_scheme="s8s8", executorch=True, int8_range_search=True,
                     int8_weight_rounding="nearest"),
    "searched_gptq": dict(int8_preparation=True, calibration_method="percentile", int8_scheme="s8s8", executorch=True,
                          int8_range_search=True, int8_weight_rounding="output_error"),
    "ptq_reduce_range": dict(int8_preparation=False, calibration_method="minmax", int8_scheme="reduce_range"),
    "prepared_reduce_range": dict(int8_preparation=True, int8_range_search=False, calibration_method="minmax", int8_scheme="reduce_range",
                                  int8_weight_rounding="nearest"),
    "prepared_percentile_reduce_range": dict(int8_preparation=True, int8_range_search=False, calibration_method="percentile",
                                             int8_scheme="reduce_range", int8_weight_rounding="nearest"),
    "searched_reduce_range": dict(int8_preparation=True, calibration_method="percentile", int8_scheme="reduce_range",
                                  int8_range_search=True, int8_weight_rounding="nearest"),
    "gptq_reduce_range": dict(int8_preparation=True, int8_range_search=False, calibration_method="percentile", int8_scheme="reduce_range",
                              int8_weight_rounding="output_error"),
    "searched_gptq_reduce_range": dict(int8_preparation=True, calibration_method="percentile", int8_scheme="reduce_range",
                                       int8_range_search=True, int8_weight_rounding="output_error"),
}
METRIC = "val/acc1"
HALF = 250


def half_indices(count: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out) indices of ``fold`` among ``count`` sorted images: a seed-0 permutation
    cut after ``HALF``; fold 1 swaps the halves."""
    order = np.random.default_rng(0).permutation(count)
    return (order[:HALF], order[HALF:]) if fold == 0 else (order[HALF:], order[:HALF])


def halves(shared: Path, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration images, held-out images, held-out labels) of ``fold``: imagenet-sample split in two
    halves of ``HALF`` (``half_indices``), preprocessed as torchvision's ImageNet evaluation."""
    paths, labels = imagenet_sample(shared / "datasets" / "imagenet-sample")
    calibration, held_out = half_indices(len(paths), fold)
    images = preprocess(paths)
    return images[calibration], images[held_out], np.asarray(labels)[held_out]


def export(model: str, variant: str, data: tuple[np.ndarray, np.ndarray, np.ndarray], weights: Path, output: Path) -> tuple[dict, float]:
    """``fuse_and_export`` (what ``export --int8 true`` runs) of ``model``'s ImageNet file with ``variant``'s
    options, calibrated on the calibration half and validated on the held-out one; its ``model.json`` and wall time."""
    import torch

    from tasks.common.export import ExportContext, ExportOptions, fuse_and_export

    calibration_images, held_out, labels = (torch.from_numpy(a) for a in data)

    def evaluate(network) -> dict[str, float]:
        with torch.no_grad():
            predicted = torch.cat([network(held_out[i:i + 25]).argmax(1) for i in range(0, len(held_out), 25)])
        return {METRIC: float((predicted == labels).float().mean())}

    started = time.perf_counter()
    fuse_and_export(fused_network(model, weights), held_out[:16], output, {"model": model}, ExportOptions(int8=True, **VARIANTS[variant]),
                    ExportContext(calibration=list(calibration_images.split(32)), evaluate=evaluate, metric=METRIC))
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
            "calibration": calibration["onnx_method"] if name.endswith(".onnx") else calibration["executorch_observer"],
            "float32": reference, "int8": record["validation"][METRIC],
            "agreement": record["vs_float32"]["agreement"], "images": record["vs_float32"]["agreement_count"],
            "error": record["vs_float32"]["relative_error"],
        })
    return result


def latency_ms(folder: Path, rounds: int) -> dict[str, float]:
    """Median batch-1, one-thread latency of the float32 and INT8 files in ``folder``, timed interleaved."""
    import torch

    from backbones.runtimes import ExecuTorchNetwork
    from benchmarks.timing import interleaved_median_ms

    torch.set_num_threads(1)
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    calls = {name: (lambda session=one_thread_session(folder / name): session.run(None, {"images": image}))
             for name in ("model.onnx", "model.int8.onnx")}
    for name in ("model.pte", "model.int8.pte"):
        if (folder / name).is_file():
            calls[name] = lambda program=ExecuTorchNetwork((folder / name).read_bytes()), tensor=torch.from_numpy(image): program(tensor)
    return interleaved_median_ms(calls, rounds)


def markdown(results: list[dict]) -> str:
    lines = ["| model | method | file (runtime, scheme) | calibration | fold | float32 top-1 | INT8 top-1 | vs float32 | agreement with float32 "
             "| logits' error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results:
        lines.append(
            f"| {row['model']} | {row['variant'].replace('_reduce_range', '')} | `{row['file']}` ({row['runtime']}, {row['scheme']}) | "
            f"{row['calibration']} | {row['fold']} | {100 * row['float32']:.1f} | {100 * row['int8']:.1f} | "
            f"{100 * (row['int8'] - row['float32']):+.1f} | {100 * row['agreement']:.1f}% of {row['images']} | {row['error']:.3f} |"
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
        data = halves(args.shared, fold)
        for model in args.models:
            for variant in args.variants:
                output = args.work_dir / f"fold{fold}" / f"{model}.{variant}"
                metadata, seconds = export(model, variant, data, args.shared / "weights" / MODELS[model], output)
                results.extend(rows(model, variant, fold, metadata))
                print(f"{model} {variant} fold {fold}: exported and validated in {seconds:.0f} s", flush=True)
    print(f"machine: {describe_machine('cpu')}; held-out half of imagenet-sample ({HALF} images), the other half calibrates")
    print(markdown(results))
    (args.work_dir / f"results_fold{'_'.join(map(str, args.folds))}.json").write_text(json.dumps(results, indent=1) + "\n")
    timed = next((v for v in ("searched", "prepared_percentile", "prepared") if v in args.variants), None)
    if timed is not None:
        print(f"\nbatch 1, 1 thread, median of {args.rounds} interleaved rounds, the {timed} export's files (fold {args.folds[0]}):")
        print("| model | onnxruntime float32 | onnxruntime INT8 | speed-up | ExecuTorch float32 | ExecuTorch INT8 | speed-up |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for model in args.models:
            times = latency_ms(args.work_dir / f"fold{args.folds[0]}" / f"{model}.{timed}", args.rounds)
            print(f"| {model} | {times['model.onnx']:.2f} ms | {times['model.int8.onnx']:.2f} ms | "
                  f"{times['model.onnx'] / times['model.int8.onnx']:.2f}x | {times['model.pte']:.2f} ms | "
                  f"{times['model.int8.pte']:.2f} ms | {times['model.pte'] / times['model.int8.pte']:.2f}x |")


if __name__ == "__main__":
    main()
