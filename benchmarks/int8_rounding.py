"""INT8 weight rounding on Apple's S0: nearest rounding with bias correction (the export's default)
against rounding chosen for the layer's output error (GPTQ-style), and where the remaining error is.

    python -m benchmarks.int8_rounding                # both folds: about 8 minutes on 2 cores
    python -m benchmarks.int8_rounding --folds 1 --sensitivity

An experiment for issue #27 (the rounding is now the export's for ``reduce_range``:
``--int8_weight_rounding``). On the halves of ``benchmarks.int8_methods`` (one calibrates, the
other is held out) the fused S0 is equalized (``equalize_activations``), then its weights are
rounded to the per-output-channel int8 grid either nearest, then ``correct_weight_rounding_bias``,
or by ``backbones.quantization.round_weights_for_output_error``: per layer, the weight columns are
rounded one after another and each one's error is compensated in the columns not yet rounded
through the inverse of the layer's input second moments on the calibration images (Frantar et al.,
GPTQ, 2023), the grid kept as the quantizer will compute it (each channel's largest weight stays at
+-127 steps) and the remaining mean error moved into the bias. Rows: the logits' relative error
against float32 and top-1 / agreement on the held-out half, with float activations (weights
rounded only), in onnxruntime's INT8 file (s8s8, percentile calibration, no range search), and in
the same file with ``FLOAT_LAYERS`` left float32.
``--sensitivity``: with GPTQ weights, the logits' error when one layer's input alone is rounded to
int8 (per tensor, asymmetric, the 99.999th percentile as onnxruntime's percentile calibration),
the ten worst layers.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from backbones import to_onnx_bytes
from backbones.quantization import (
    _calibrate_with_input_hooks,
    _call,
    correct_weight_rounding_bias,
    equalize_activations,
    int8_weights,
    round_weights_for_output_error,
)
from backbones.runtimes import OnnxRuntimeNetwork, quantize_onnx
from benchmarks.int8_methods import halves
from benchmarks.int8_schemes import DEFAULT_SHARED, MODELS, fused_network
from benchmarks.int8_sensitivity import quantized_layers, simulated_int8

# The layer whose int8 input costs S0 the most (--sensitivity) and the one before it: the input of a layer stays
# float32 only if the layer producing it is float32 too (QDQ quantizes every input of an int8 layer).
FLOAT_LAYERS = ["stage3.18", "stage3.19"]


def _layers(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    return [model.get_submodule(name) for name in quantized_layers(model)]


def _logits(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([network(images[i:i + 50]) for i in range(0, len(images), 50)])


def _row(fold: int, rounding: str, arithmetic: str, logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"fold": fold, "rounding": rounding, "arithmetic": arithmetic,
            "error": float((logits - reference).norm() / reference.norm()),
            "float32_top1": float((reference.argmax(1) == labels).float().mean()), "top1": float((logits.argmax(1) == labels).float().mean()),
            "agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean())}


def input_sensitivity(network: nn.Module, calibration: Sequence[torch.Tensor], images: torch.Tensor,
                      reference: torch.Tensor) -> list[tuple[str, float]]:
    """Per conv / linear layer of ``network``: the logits' relative error when only its input is int8,
    its range the 99.999th percentile of 100 000 values sampled per calibration batch (and the lowest, or 0)."""
    layers = quantized_layers(network)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    generator = torch.Generator().manual_seed(0)

    def record(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[layers[index]].append(args[0].flatten()[torch.randint(args[0].numel(), (100_000,), generator=generator)])
        return hook

    with torch.no_grad():
        _calibrate_with_input_hooks(network, _layers(network), record, calibration, _call)
    ranges = {name: (min(float(torch.cat(v).min()), 0.0), float(torch.quantile(torch.cat(v), 0.99999))) for name, v in seen.items()}
    errors = []
    for name in layers:
        with simulated_int8(network, [], [name], ranges):
            logits = _logits(network, images)
        errors.append((name, float((logits - reference).norm() / reference.norm())))
    return sorted(errors, key=lambda item: -item[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=DEFAULT_SHARED, help="folder holding weights/ and datasets/imagenet-sample")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    parser.add_argument("--sensitivity", action="store_true", help="also the per-layer input sensitivity with GPTQ weights")
    args = parser.parse_args(argv)
    from benchmarks.machine import describe_machine

    shared = Path(args.shared)
    network = fused_network("mobileone_s0", shared / "weights" / MODELS["mobileone_s0"]).eval()
    rows = []
    for fold in args.folds:
        calibration, held_out, labels = (torch.from_numpy(a) for a in halves(shared, fold))
        batches = list(calibration.split(32))
        reference = _logits(network, held_out)
        equalized = equalize_activations(network, batches)
        rounded = {"nearest + bias correction": correct_weight_rounding_bias(equalized, batches),
                   "GPTQ": round_weights_for_output_error(equalized, batches)}
        for name, candidate in rounded.items():
            weights_only = copy.deepcopy(candidate)
            for layer in _layers(weights_only):
                layer.weight.data = int8_weights(layer.weight.data)
            rows.append(_row(fold, name, "int8 weights, float activations", _logits(weights_only, held_out), reference, labels))
            float_bytes = to_onnx_bytes(candidate, held_out[:1])
            for arithmetic, float_modules in (("onnxruntime INT8 file (s8s8, percentile)", None),
                                              (f"the same, {' and '.join(FLOAT_LAYERS)} float32", FLOAT_LAYERS)):
                int8_file = quantize_onnx(float_bytes, batches, "percentile", scheme="s8s8", float_modules=float_modules)
                rows.append(_row(fold, name, arithmetic, _logits(OnnxRuntimeNetwork(int8_file), held_out), reference, labels))
            print(*(json.dumps(row) for row in rows[-3:]), sep="\n", flush=True)
        if args.sensitivity:
            print(f"fold {fold}, GPTQ weights: logits' error with one layer's input int8 (all weights int8: {rows[-3]['error']:.4f})")
            for name, error in input_sensitivity(rounded["GPTQ"], batches, held_out, reference)[:10]:
                print(f"  {name}: {error:.4f}")
    print(f"machine: {describe_machine('cpu')}; held-out half of imagenet-sample (250 images)")
    print("| fold | weight rounding | arithmetic | logits' error vs float32 | float32 top-1 | top-1 | vs float32 | agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['fold']} | {row['rounding']} | {row['arithmetic']} | {row['error']:.3f} | {100 * row['float32_top1']:.1f} | "
              f"{100 * row['top1']:.1f} | {100 * (row['top1'] - row['float32_top1']):+.1f} | {100 * row['agreement']:.1f}% |")


if __name__ == "__main__":
    main()
