"""INT8 weight rounding on Apple's S0: nearest rounding with bias correction (the export's default)
against rounding chosen for the layer's output error (GPTQ-style), and where the remaining error is.

    python -m benchmarks.int8_rounding                # both folds: about 8 minutes on 2 cores
    python -m benchmarks.int8_rounding --folds 1 --sensitivity

An experiment for issue #27, not an export option. On the halves of ``benchmarks.int8_methods``
(one calibrates, the other is held out) the fused S0 is equalized (``equalize_activations``), then
its weights are rounded to the per-output-channel int8 grid either as the export does (nearest,
then ``correct_weight_rounding_bias``) or by ``round_for_output_error``: per layer, the weight
columns are rounded one after another and each one's error is compensated in the columns not yet
rounded through the inverse of the layer's input second moments on the calibration images (Frantar
et al., GPTQ, 2023), the grid kept as the quantizer will compute it (each channel's largest weight
stays at +-127 steps) and the remaining mean error moved into the bias. Rows: the logits' relative
error against float32 and top-1 / agreement on the held-out half, with float activations (weights
rounded only), in onnxruntime's INT8 file (s8s8, percentile calibration: the export's settings),
and in the same file with ``FLOAT_LAYERS`` left float32.
``--sensitivity``: with GPTQ weights, the logits' error when one layer's input alone is rounded to
int8 (per tensor, asymmetric, the 99.999th percentile as onnxruntime's percentile calibration),
the ten worst layers.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from backbones import to_onnx_bytes
from backbones.quantization import _calibrate_with_input_hooks, _call, correct_weight_rounding_bias, equalize_activations, int8_weights
from backbones.runtimes import OnnxRuntimeNetwork, quantize_onnx
from benchmarks.int8_methods import halves
from benchmarks.int8_schemes import DEFAULT_SHARED, MODELS, fused_network
from benchmarks.int8_sensitivity import quantized_layers, simulated_int8

DAMPING = 0.01  # of the mean diagonal of a layer's input second moments, added to it (GPTQ's default)
# The layer whose int8 input costs S0 the most (--sensitivity) and the one before it: the input of a layer stays
# float32 only if the layer producing it is float32 too (QDQ quantizes every input of an int8 layer).
FLOAT_LAYERS = ["stage3.18", "stage3.19"]


def _layers(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    return [model.get_submodule(name) for name in quantized_layers(model)]


def _patches(layer: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (groups, inputs per output of a group, samples): the columns its weights multiply."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, layer.in_features).t().unsqueeze(0)
    columns = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    count, width, positions = columns.shape
    return columns.view(count, layer.groups, width // layer.groups, positions).permute(1, 2, 0, 3).reshape(layer.groups, width // layer.groups, -1)


@torch.no_grad()
def round_for_output_error(model: nn.Module, calibration: Iterable[torch.Tensor], levels: int = 127) -> nn.Module:
    """A copy of ``model`` (fused, eval mode) whose conv / linear weights lie on their symmetric
    per-output-channel int8 grid (``int8_weights``'s: quantizing them again changes nothing), each
    layer rounded column by column with GPTQ's error compensation on its float inputs over
    ``calibration``, and its bias shifted by the mean output error left."""
    model = copy.deepcopy(model).eval()
    layers = _layers(model)
    moments: list[torch.Tensor | None] = [None] * len(layers)
    sums: list[torch.Tensor | None] = [None] * len(layers)
    counts = [0] * len(layers)

    def record(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            columns = _patches(module, args[0].detach().float())
            second, first = torch.einsum("gil,gjl->gij", columns, columns).double(), columns.sum(-1).double()
            moments[index] = second if moments[index] is None else moments[index] + second
            sums[index] = first if sums[index] is None else sums[index] + first
            counts[index] += columns.shape[-1]
        return hook

    _calibrate_with_input_hooks(model, layers, record, calibration, _call)
    for layer, second, first, count in zip(layers, moments, sums, counts):
        _round_layer(layer, second / count, first / count, levels)
    return model


def _round_layer(layer: nn.Conv2d | nn.Linear, second: torch.Tensor, mean: torch.Tensor, levels: int) -> None:
    original = layer.weight.detach().double().flatten(1)
    groups, width = mean.shape
    weights = original.view(groups, -1, width).clone()
    step = (original.abs().amax(1).clamp(min=1e-30) / levels).view(groups, -1)
    diagonal = torch.diagonal(second, dim1=-2, dim2=-1)
    damped = second + torch.diag_embed((diagonal <= 0).double() + DAMPING * diagonal.mean(-1, keepdim=True).expand(-1, width))
    inverse_root = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    levels_chosen = torch.zeros_like(weights)
    for column in range(width):
        value = weights[:, :, column]
        chosen = torch.clamp(torch.round(value / step), -levels, levels)
        levels_chosen[:, :, column] = chosen
        error = (value - chosen * step) / inverse_root[:, column, column].unsqueeze(1)
        weights[:, :, column + 1:] -= error.unsqueeze(-1) * inverse_root[:, column, column + 1:].unsqueeze(1)
    flat = levels_chosen.view(original.shape)
    largest = original.abs().argmax(1)
    rows = torch.arange(len(flat))
    flat[rows, largest] = torch.where(flat.abs().amax(1) < levels, torch.sign(original[rows, largest]) * levels, flat[rows, largest])
    rounded = flat * step.reshape(-1, 1)
    shift = torch.einsum("gow,gw->go", (original - rounded).view(groups, -1, width), mean).reshape(-1)
    layer.weight.copy_(rounded.view_as(layer.weight).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.add_(shift.to(layer.bias.dtype))


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
                   "GPTQ": round_for_output_error(equalized, batches)}
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
