"""Deployment files (INT8 ONNX, ExecuTorch float32 and INT8): built from the fused network,
run in their runtimes on this machine and compared with the fused float32 network."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.export import is_finite, output_tensors, to_onnx_bytes
from backbones.quantization import int8_simulation_unsupported, prepare_for_int8, prepare_with_searched_ranges
from backbones.runtimes import (
    INT8_WEIGHT_LEVELS,
    ExecuTorchNetwork,
    OnnxRuntimeNetwork,
    cpu_flags,
    default_int8_scheme,
    int8_cpu,
    quantize_onnx,
    to_executorch,
)
from tasks.common.batches import count_images
from tasks.common.export.checks import MIN_AGREEMENT_COUNT, check_tolerance, since, worst_error
from tasks.common.export.files import EXECUTORCH_FILE, EXECUTORCH_INT8_FILE, FUSED_WEIGHTS, ONNX_INT8_FILE
from tasks.common.export.options import ExportContext, ExportOptions

log = logging.getLogger(__name__)
# The export's defaults for a prepared network, by weight levels (127: s8s8 and XNNPACK; 64: reduce_range), as
# measured on Apple's S0 and the two halves of imagenet-sample (benchmarks.int8_methods, benchmarks/RESULTS.md):
# how weights reach their int8 grid (backbones.quantization.WEIGHT_ROUNDINGS): GPTQ-style rounding brought
# reduce_range within 1 point of float32 top-1 on both halves, where nearest rounding lost 2.0 on one;
DEFAULT_WEIGHT_ROUNDING = {64: "output_error", 127: "nearest"}
# where the activation ranges are searched when the search applies (int8_range_search=None): with 64 levels it
# lowered the logits' error but cost top-1 on one half with either rounding (-3.2 points)
DEFAULT_RANGE_SEARCH_LEVELS = (127,)


def deployment_files(
    fused: nn.Module,
    example_inputs: torch.Tensor,
    fused_output: Any,
    report: dict[str, Any],
    writers: dict[str, tuple[str, Callable[[Path], object]]],
    onnx_bytes: bytes | None,
    options: ExportOptions,
    context: ExportContext,
) -> dict[str, nn.Module]:
    """Build the INT8 ONNX and ExecuTorch files asked for, add their writers, and return a module
    running each (by file name). ``onnx_bytes``: the fused network's float32 ONNX file (made when
    ``options.int8`` asks for INT8), quantized as it is unless the network is prepared for INT8 first."""
    quantize = options.int8
    calibration, quantized_modules, int8_activations = context.calibration, context.quantized_modules, context.int8_activations
    dynamic_image_size, executorch = context.dynamic_image_size, options.executorch
    if quantize and not calibration:
        raise ValueError("INT8 quantization needs calibration images (batches of real training inputs); none were given")
    files: dict[str, bytes] = {}
    deployed: dict[str, nn.Module] = {}
    trained_for_int8 = int8_activations is not None
    int8_preparation = options.int8_preparation and not trained_for_int8
    if options.int8_weight_rounding is not None and not int8_preparation:
        raise ValueError(f"int8_weight_rounding={options.int8_weight_rounding!r} rounds the weights of the network prepared for INT8: "
                         "it needs int8_preparation=True (and a network not trained for INT8)")
    if options.int8_range_search and not int8_preparation:
        raise ValueError("int8_range_search=True searches the ranges of the network prepared for INT8: it needs int8_preparation=True "
                         "(and a network not trained for INT8)")
    prepared_copies: dict[int | None, tuple[nn.Module, Sequence[dict[str, Any]] | None]] = {}
    searched: dict[str, dict[str, Any]] = {}  # per weight levels: what the range search did
    roundings: dict[str, str] = {}  # per weight levels: how the weights were rounded

    def weight_rounding(levels: int) -> str:
        roundings[str(levels)] = options.int8_weight_rounding or DEFAULT_WEIGHT_ROUNDING.get(levels, "nearest")
        return roundings[str(levels)]

    def range_search_unsupported(levels: int | None) -> str | None:
        if levels is None:
            return "the u8u8 scheme's asymmetric weights are not simulated"
        if count_images(calibration) < 2:
            return "it needs at least 2 calibration images (one to search on, one to check)"
        if quantized_modules is not None:
            return f"only some modules are quantized ({', '.join(quantized_modules)}); the search simulates a wholly quantized network"
        return int8_simulation_unsupported(fused)

    def searches_ranges(levels: int | None) -> bool:
        if options.int8_range_search is False:
            return False
        reason = range_search_unsupported(levels)
        if options.int8_range_search and reason is not None:
            raise ValueError(f"int8_range_search=True: {reason}")
        return bool(options.int8_range_search) or (reason is None and levels in DEFAULT_RANGE_SEARCH_LEVELS)

    def prepared_for(levels: int | None) -> tuple[nn.Module, Sequence[dict[str, Any]] | None]:
        """The copy of ``fused`` prepared for weights of ``levels`` and, where searched, its activation
        ranges (None: calibrate them), made once (ONNX s8s8 and ExecuTorch share it)."""
        if levels not in prepared_copies:
            if not searches_ranges(levels):
                rounding = "nearest" if levels is None else weight_rounding(levels)
                prepared_copies[levels] = prepare_for_int8(fused, calibration, levels, modules=quantized_modules, weight_rounding=rounding), None
            else:
                started = time.perf_counter()
                network, sites, search = prepare_with_searched_ranges(fused, calibration, levels, weight_rounding=weight_rounding(levels))
                log.info("INT8 activation ranges searched for the logits' error on %d calibration images (weights of %d levels): %d "
                         "narrowed; error on %d others %.4f calibrated, %.4f searched: %s (%.1f s)", search["search_images"], levels,
                         len(search["narrowed"]), search["check_images"], search["check_error_calibrated"],
                         search["check_error_searched"], "kept" if search["kept"] else "not kept", since(started))
                searched[str(levels)] = search
                prepared_copies[levels] = network, sites
        return prepared_copies[levels]

    if quantize:
        started = time.perf_counter()
        cpu = int8_cpu()
        int8_scheme = options.int8_scheme or default_int8_scheme(cpu)
        source, activations = onnx_bytes, int8_activations
        if int8_preparation:
            prepared, activations = prepared_for(INT8_WEIGHT_LEVELS[int8_scheme])
            source = to_onnx_bytes(prepared, example_inputs, dynamic_image_size)
        files[ONNX_INT8_FILE] = quantize_onnx(source, calibration, options.calibration_method, quantized_modules, scheme=int8_scheme,
                                              activation_quantization=activations)
        deployed[ONNX_INT8_FILE] = OnnxRuntimeNetwork(files[ONNX_INT8_FILE])
        report["int8_calibration"] = {
            "images": count_images(calibration), "onnx_scheme": int8_scheme,
            "onnx_method": (f"the ranges of quantization-aware training ({len(int8_activations)} tensors)" if trained_for_int8
                            else f"{options.calibration_method}, then searched for the logits' error" if activations is not None
                            else options.calibration_method),
            "cpu": cpu, "cpu_flags": cpu_flags(),
            "preparation": ("equalized activations, weights rounded as weight_rounding says (backbones.quantization)"
                            if int8_preparation else None),
            "executorch_observer": None,
        }
        log.info("INT8 ONNX quantized (static QDQ, %s, activation ranges: %s on %d images; this CPU: %s) (%.1f s)", int8_scheme,
                 report["int8_calibration"]["onnx_method"], count_images(calibration), cpu, since(started))
    if executorch:
        started = time.perf_counter()
        files[EXECUTORCH_FILE] = to_executorch(fused, example_inputs, dynamic_image_size)
        deployed[EXECUTORCH_FILE] = ExecuTorchNetwork(files[EXECUTORCH_FILE])
        with torch.no_grad():
            report["executorch_vs_pytorch_relative_error"] = worst_error(deployed[EXECUTORCH_FILE](example_inputs), fused_output)
        log.info("ExecuTorch program (XNNPACK) lowered and run: relative error %.3e vs PyTorch (%.1f s)",
                 report["executorch_vs_pytorch_relative_error"], since(started))
        check_tolerance(report, "executorch_vs_pytorch_relative_error", options.tolerance, "the ExecuTorch program's output differs from PyTorch's")
        if quantize:
            started = time.perf_counter()
            # XNNPACK: int8 weights in [-127, 127]
            prepared, activations = prepared_for(INT8_WEIGHT_LEVELS["s8s8"]) if int8_preparation else (fused, None)
            files[EXECUTORCH_INT8_FILE] = to_executorch(prepared, example_inputs, dynamic_image_size, calibration, modules=quantized_modules,
                                                        activation_quantization=activations)
            report["int8_calibration"]["executorch_observer"] = (
                "the searched ranges" if activations is not None else "HistogramObserver (the XNNPACK quantizer's)")
            deployed[EXECUTORCH_INT8_FILE] = ExecuTorchNetwork(files[EXECUTORCH_INT8_FILE])
            log.info("INT8 ExecuTorch program (PT2E, XNNPACK) quantized and lowered (%.1f s)", since(started))
    if roundings:  # by weight levels: "127" (s8s8 and XNNPACK), "64" (reduce_range)
        report["int8_calibration"]["weight_rounding"] = roundings
    if searched:
        report["int8_calibration"]["range_search"] = searched
    for name, content in files.items():
        writers[name] = (name, lambda p, content=content: p.write_bytes(content))
    return deployed


class ComparedWithReference(nn.Module):
    """Runs ``candidate`` and, on the same inputs, ``reference``; returns the candidate's outputs
    and accumulates how the two differ (``summary()``)."""

    def __init__(self, candidate: nn.Module, reference: nn.Module, agreement: Callable[[Any, Any], tuple[int, int]],
                 name: str = "the deployed file") -> None:
        super().__init__()
        self.candidate, self.reference, self.agreement, self.name = candidate, reference, agreement, name
        self.images = self.matched = self.compared = 0
        self.squared_errors: list[float] = []
        self.squared_norms: list[float] = []

    def forward(self, images: torch.Tensor) -> Any:
        with torch.no_grad():
            output, expected = self.candidate(images), self.reference(images)
        if not is_finite(output):
            raise RuntimeError(f"{self.name} computes NaN or inf on a validation batch of {len(images)} images "
                               "where the fused float32 network is finite; nothing was written")
        matched, compared = self.agreement(output, expected)
        self.images += len(images)
        self.matched += matched
        self.compared += compared
        pairs = list(zip(output_tensors(output), output_tensors(expected)))
        if not self.squared_errors:
            self.squared_errors, self.squared_norms = [0.0] * len(pairs), [0.0] * len(pairs)
        for index, (actual, reference) in enumerate(pairs):
            self.squared_errors[index] += float((actual.double() - reference.double()).square().sum())
            self.squared_norms[index] += float(reference.double().square().sum())
        return output

    def summary(self) -> dict[str, Any]:
        errors = [(e / n) ** 0.5 if n > 0 else float("nan") for e, n in zip(self.squared_errors, self.squared_norms)]
        return {
            "images": self.images,
            "relative_error": max(errors, default=float("nan")),
            "agreement": self.matched / self.compared if self.compared >= MIN_AGREEMENT_COUNT else None,
            "agreement_count": self.compared,
        }


def runtime_name(name: str) -> str:
    if name.endswith(".pte"):
        from importlib.metadata import version

        return f"ExecuTorch {version('executorch')} (XNNPACK)"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def compare_deployed(
    fused: nn.Module,
    deployed: dict[str, nn.Module],
    example_inputs: torch.Tensor,
    agreement: Callable[[Any, Any], tuple[int, int]],
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
    metric: str | None,
) -> dict[str, dict[str, Any]]:
    """Each deployed file against the fused float32 model: on the validation set with its metrics
    when ``evaluate`` is given, else on ``example_inputs``."""
    records: dict[str, dict[str, Any]] = {}
    reference_metric = None
    if evaluate is not None:
        started = time.perf_counter()
        records[FUSED_WEIGHTS] = {"precision": "float32", "runtime": f"PyTorch {torch.__version__}", "validation": evaluate(fused)}
        reference_metric = records[FUSED_WEIGHTS]["validation"].get(metric)
        log.info("%s (float32, PyTorch) validated: %s %s (%.1f s)", FUSED_WEIGHTS, metric, _format(reference_metric), since(started))
    for name, runner in deployed.items():
        started = time.perf_counter()
        compared = ComparedWithReference(runner, fused, agreement, name)
        if evaluate is not None:
            validation = evaluate(compared)
        else:
            validation = None
            compared(example_inputs)
        summary = compared.summary()
        precision = "int8" if ".int8." in name else "float32"
        records[name] = {"precision": precision, "runtime": runtime_name(name), "vs_float32": summary, "validation": validation}
        value = (validation or {}).get(metric)
        suffix = f"; {metric} {_format(value)} (float32 {_format(reference_metric)})" if validation is not None else ""
        log.info("%s (%s, %s) on %d images: agrees with float32 on %s of %d predictions, relative error %.3e%s (%.1f s)",
                 name, precision, records[name]["runtime"], summary["images"], _percent(summary["agreement"]),
                 summary["agreement_count"], summary["relative_error"], suffix, since(started))
    return records


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
