"""Where INT8 loses accuracy: per-layer sensitivity of a real-data model, and what the standard remedies do.

    python -m benchmarks.int8_sensitivity --task classification        # after python -m benchmarks.real_data
    python -m benchmarks.int8_sensitivity --task classification --backbone mobilenet_v2

The ``last.ckpt`` of one ``benchmarks.real_data`` run is fused for deployment, and:

1. **Per layer**, one at a time with the rest float32, on the first ``--images`` validation
   images: the relative error of the network's outputs (``||y_int8 - y|| / ||y||``, averaged over
   the output tensors) when only the layer's weights are rounded to int8 (symmetric, per output
   channel, as onnxruntime and XNNPACK quantize them), and when only its input is (int8 per
   tensor, asymmetric, range = min/max over the calibration images). Written to ``--csv``; the most sensitive layers are printed.
2. **Remedies**, each a real onnxruntime INT8 file (``backbones.runtimes.quantize_onnx``) run over
   the whole validation split by the task's own metric: the calibration methods minmax (the
   export's), percentile and entropy; the first and the last layer kept float32; the
   ``--float-layers`` most sensitive layers of step 1 kept float32. Plus the simulated all-int8
   network of step 1 (all weights and inputs rounded at once) as a check of the simulation.

Calibration: the first ``--calibration-images`` training images of the task's data module,
augmented as for training, exactly as ``export --int8 true`` takes them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from backbones import fuse_for_deployment
from backbones.export import output_tensors, relative_error, to_onnx_bytes
from backbones.quantization import int8_weights  # symmetric per output channel, as onnxruntime and XNNPACK round weights
from backbones.runtimes import OnnxRuntimeNetwork, quantize_onnx
from benchmarks.real_data import DEFAULT_DATASETS, ROOT, SETTINGS, run_folder
from benchmarks.timing import write_csv
from tasks.common.batches import first_images, same_size_images
from tasks.common.export import validation_metrics

QUANTIZED_TYPES = (nn.Conv2d, nn.Linear)


def output_error(actual: object, expected: object) -> float:
    """``||actual - expected|| / ||expected||`` of each output tensor, averaged over the tensors
    (a detector's scores count as much as its boxes, whose pixel values are far larger)."""
    errors = [relative_error(a, e) for a, e in zip(output_tensors(actual), output_tensors(expected))]
    return sum(errors) / len(errors)


def int8_tensor(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x`` rounded to int8 with an asymmetric per-tensor range that includes 0, in float."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-12) / 255
    zero_point = round(-low / scale) - 128
    return x.div(scale).round().add(zero_point).clamp(-128, 127).sub(zero_point).mul(scale)


def quantized_layers(network: nn.Module) -> list[str]:
    """Names of the layers whose weights and inputs INT8 quantization rounds: convolutions and linear layers."""
    return [name for name, module in network.named_modules() if isinstance(module, QUANTIZED_TYPES)]


def input_ranges(network: nn.Module, layers: Sequence[str], calibration: Sequence[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """(min, max) of each layer's input over the calibration batches."""
    ranges: dict[str, tuple[float, float]] = {}
    modules = dict(network.named_modules())

    def observe(name: str):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            low, high = ranges.get(name, (float("inf"), float("-inf")))
            ranges[name] = (min(low, float(inputs[0].min())), max(high, float(inputs[0].max())))
        return hook

    handles = [modules[name].register_forward_pre_hook(observe(name)) for name in layers]
    try:
        with torch.no_grad():
            for batch in calibration:
                network(batch)
    finally:
        for handle in handles:
            handle.remove()
    return ranges


@contextlib.contextmanager
def simulated_int8(network: nn.Module, weights: Sequence[str], inputs: Sequence[str],
                   ranges: dict[str, tuple[float, float]]) -> Iterator[nn.Module]:
    """``network`` with the weights of the layers ``weights`` and the inputs of the layers
    ``inputs`` rounded to int8 (restored on exit)."""
    modules = dict(network.named_modules())
    saved = {name: modules[name].weight.data for name in weights}
    handles = []
    for name in weights:
        modules[name].weight.data = int8_weights(saved[name])
    for name in inputs:
        low, high = ranges[name]
        handles.append(modules[name].register_forward_pre_hook(
            lambda module, args, low=low, high=high: (int8_tensor(args[0], low, high), *args[1:])))
    try:
        yield network
    finally:
        for name, weight in saved.items():
            modules[name].weight.data = weight
        for handle in handles:
            handle.remove()


def layer_sensitivity(network: nn.Module, layers: Sequence[str], ranges: dict[str, tuple[float, float]],
                      images: torch.Tensor) -> list[dict[str, object]]:
    """Per layer: the relative output error with only its weights, or only its input, in int8."""
    modules = dict(network.named_modules())
    with torch.no_grad():
        reference = network(images)
        rows = []
        for name in layers:
            with simulated_int8(network, [name], [], ranges):
                weights_error = output_error(network(images), reference)
            with simulated_int8(network, [], [name], ranges):
                input_error = output_error(network(images), reference)
            rows.append({"layer": name, "weights_error": weights_error, "input_error": input_error,
                         "diagonal_ratio": diagonal_ratio(modules[name])})
    return rows


def diagonal_ratio(layer: nn.Module) -> float | None:
    """For a square 1x1 convolution: median |diagonal weight| / median |off-diagonal weight|. A
    reparameterized block folds its identity (skip) branch into the diagonal; the larger this
    ratio, the coarser the int8 step (set per output channel by its largest weight) is for the
    off-diagonal weights, which hold what the layer learned beyond the identity. None for other layers."""
    if not isinstance(layer, nn.Conv2d) or layer.kernel_size != (1, 1) or layer.groups != 1 or layer.in_channels != layer.out_channels:
        return None
    weight = layer.weight.detach()[:, :, 0, 0].abs()
    diagonal = weight.diagonal()
    off_diagonal = weight[~torch.eye(len(weight), dtype=torch.bool)]
    return float(diagonal.median() / off_diagonal.median().clamp(min=1e-12))


def _cell(value: object) -> object:
    return f"{value:.5f}" if isinstance(value, float) else ("" if value is None else value)


def load_run(task: str, datasets_root: Path, work: Path) -> tuple[object, object]:
    """The task model of ``work``'s ``last.ckpt`` and the data module of its recipe."""
    setting = SETTINGS[task]
    checkpoint = work / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise SystemExit(f"{checkpoint} does not exist: run python -m benchmarks.real_data --tasks {task} first")
    cli = importlib.import_module(f"tasks.{task}.__main__").main(
        ["--config", setting.config, "--data.root", str(datasets_root / setting.data_dir)], run=False)
    model = type(cli.model).load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    return model.eval(), cli.datamodule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="classification", choices=list(SETTINGS))
    parser.add_argument("--datasets-root", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "real_data", help="benchmarks.real_data's --work-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="mobileone_s0")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--images", type=int, default=32, help="validation images of the per-layer errors")
    parser.add_argument("--float-layers", type=int, default=5, help="most sensitive layers kept float32 in the last remedy")
    parser.add_argument("--show", type=int, default=10, help="most sensitive layers printed")
    parser.add_argument("--csv", type=Path, help="per-layer table (default: benchmarks/results/int8_sensitivity_<task>_<backbone>.csv)")
    args = parser.parse_args(argv)

    work = run_folder(args.work_dir, args.task, args.backbone, args.seed)
    model, datamodule = load_run(args.task, args.datasets_root, work)
    torch.manual_seed(args.seed)
    network = fuse_for_deployment(model.export_network()).eval()
    calibration = first_images(model.export_batches(datamodule, "fit"), args.calibration_images)
    images = same_size_images(model.export_batches(datamodule), args.images)
    quantized_modules = getattr(model, "export_quantized_modules", None)
    layers = [name for name in quantized_layers(network) if not quantized_modules or name.split(".")[0] in quantized_modules]
    ranges = input_ranges(network, layers, calibration)
    print(f"[int8_sensitivity] {args.task} {args.backbone}: {len(layers)} layers, "
          f"{sum(len(b) for b in calibration)} calibration images, {len(images)} images for the per-layer errors", file=sys.stderr)

    rows = layer_sensitivity(network, layers, ranges, images)
    csv_path = args.csv or ROOT / "benchmarks" / "results" / f"int8_sensitivity_{args.task}_{args.backbone}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_csv([{key: _cell(value) for key, value in row.items()} for row in rows], csv_path)
    ranked = sorted(rows, key=lambda row: -(row["weights_error"] ** 2 + row["input_error"] ** 2))
    print(f"Per layer, alone in int8 ({csv_path.relative_to(ROOT) if csv_path.is_relative_to(ROOT) else csv_path}):\n")
    print("| layer | output error, int8 weights | output error, int8 input | diagonal / off-diagonal |\n| --- | --- | --- | --- |")
    for row in ranked[: args.show]:
        ratio = "" if row["diagonal_ratio"] is None else f"{row['diagonal_ratio']:.1f}"
        print(f"| `{row['layer']}` | {row['weights_error']:.3f} | {row['input_error']:.3f} | {ratio} |")
    square = [row["diagonal_ratio"] for row in rows if row["diagonal_ratio"] is not None]
    if square:
        print(f"\nSquare 1x1 convolutions: median |diagonal| / median |off-diagonal| from {min(square):.1f} to {max(square):.1f} "
              f"({len(square)} layers)")

    setting = SETTINGS[args.task]
    names = [setting.metric, *setting.extra_metrics]
    keys = [f"val/{name}" for name in names]
    with torch.no_grad():
        reference = network(images)
        with simulated_int8(network, layers, layers, ranges):
            simulated = output_error(network(images), reference)
    float_metrics = validation_metrics(model, datamodule, network)
    onnx_bytes = to_onnx_bytes(network, images[:2], getattr(model, "export_dynamic_image_size", False))
    sensitive = [row["layer"] for row in ranked[: args.float_layers]]
    remedies = [
        ("minmax calibration (the export's)", "minmax", []),
        ("percentile calibration (99.999%)", "percentile", []),
        ("entropy calibration", "entropy", []),
        ("first and last layer float32", "minmax", [layers[0], layers[-1]]),
        (f"the {args.float_layers} most sensitive layers float32", "minmax", sensitive),
    ]
    print(f"\nSimulated, every layer int8 at once: output error {simulated:.3f}\n")
    print(f"| INT8 onnxruntime file | {' | '.join(f'{name} (vs float32)' for name in names)} | output error |")
    print(f"| --- | {' | '.join('---' for _ in names)} | --- |")
    print(f"| float32 (fused) | {' | '.join(f'{100 * float_metrics[key]:.1f}' for key in keys)} | |")
    for label, method, float_modules in remedies:
        quantized = OnnxRuntimeNetwork(quantize_onnx(onnx_bytes, calibration, method, quantized_modules, float_modules=float_modules))
        metrics = validation_metrics(model, datamodule, quantized)
        cells = [f"{100 * metrics[key]:.1f} ({100 * (metrics[key] - float_metrics[key]):+.1f})" for key in keys]
        print(f"| {label} | {' | '.join(cells)} | {output_error(quantized(images), reference):.3f} |", flush=True)


if __name__ == "__main__":
    main()
