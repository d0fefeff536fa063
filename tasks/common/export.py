"""Export of a trained network in inference form: fuse, check on real inputs, write atomically."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from backbones.atomic import atomic_write_dir, check_replaceable
from backbones.export import (
    coreml_op_types,
    first_non_finite,
    fuse_for_deployment,
    is_finite,
    output_tensors,
    relative_error,
    save_mlpackage,
    to_coreml,
    to_onnx_bytes,
    to_torchscript,
)
from backbones.quantization import prepare_for_int8
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

log = logging.getLogger(__name__)

FUSED_WEIGHTS = "model_fused.pt"
METADATA = "model.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model_fused.torchscript.pt"
COREML_FILE = "model.mlpackage"
COREML_TARGET = "iOS16"  # minimum deployment target of model.mlpackage (macOS 13 and the like; iPhone 8 and newer)
ONNX_INT8_FILE = "model.int8.onnx"
EXECUTORCH_FILE = "model.pte"
EXECUTORCH_INT8_FILE = "model.int8.pte"
EXPORT_FILES = frozenset(
    {FUSED_WEIGHTS, METADATA, ONNX_FILE, TORCHSCRIPT_FILE, COREML_FILE, ONNX_INT8_FILE, EXECUTORCH_FILE, EXECUTORCH_INT8_FILE}
)


Agreement = Callable[[Any, Any], "tuple[int, int]"]  # (predictions matched, predictions compared) of two outputs


@dataclass(frozen=True)
class ExportOptions:
    """What an export writes and how strictly it checks it: the ``export`` subcommand's flags that
    are not about data (see :func:`export_task` for each)."""

    onnx: bool = True
    torchscript: bool = False
    tolerance: float = 1e-5
    coreml: bool = False
    coreml_precision: Literal["float16", "float32"] = "float16"
    coreml_image_input: bool = False
    coreml_image_size: int | tuple[int, int] | None = None
    int8: bool = False
    executorch: bool = False
    calibration_method: Literal["minmax", "percentile", "entropy"] = "percentile"
    int8_scheme: Literal["s8s8", "u8u8", "reduce_range"] | None = None
    int8_preparation: bool = True


@dataclass(frozen=True)
class ExportContext:
    """What the exporter is told about the network and its data (``export_task`` fills it from the
    task's declared hooks, ``tasks.common.module.BaseTask``).

    - ``dynamic_image_size``: the ONNX, TorchScript and ExecuTorch files take any height and width;
    - ``agreement(fused_output, trained_output)``: (predictions matched, predictions compared),
      default equal ``argmax`` over dim 1 (per image, or per pixel); ``deployment_agreement`` the
      same for a deployed file against the fused model (default ``agreement``);
    - ``quantized_modules``: INT8 quantizes only these submodules (default: the whole network);
    - ``output_names``: the CoreML program's output names;
    - ``calibration``: batches of real training inputs for INT8 calibration;
    - ``int8_activations``: ``backbones.quantization.int8_simulation_sites`` of a network trained
      in its INT8 arithmetic (its INT8 files are then made from the network as it is);
    - ``evaluate(network)``: the task's validation metrics with ``network`` in place of the trained
      one; ``metric`` the one the log lines quote.
    """

    dynamic_image_size: bool = False
    agreement: Agreement | None = None
    deployment_agreement: Agreement | None = None
    quantized_modules: Sequence[str] | None = None
    output_names: list[str] | None = None
    calibration: list[torch.Tensor] | None = None
    int8_activations: Sequence[dict[str, Any]] | None = None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    metric: str | None = None


def is_export_file(name: str) -> bool:
    """Whether ``name`` (an entry of an export folder) is one an export writes."""
    return name in EXPORT_FILES


def refuse_non_finite(network: nn.Module, inputs: torch.Tensor, output: Any, what: str) -> None:
    """Raise ``RuntimeError`` naming where ``network`` first goes non-finite if ``output`` (its
    output on ``inputs``) holds NaN or inf: no figure computed from it would mean anything."""
    if not is_finite(output):
        where = first_non_finite(network, inputs) or "(not reproduced on a second run)"
        raise RuntimeError(
            f"{what} computes NaN or inf on {len(inputs)} validation images, first at {where}; nothing was written "
            "(a diverged training? its train/loss and checkpoints show where it went non-finite)"
        )


def _worst_error(actual: Any, expected: Any) -> float:
    return max(relative_error(a, e) for a, e in zip(output_tensors(actual), output_tensors(expected)))


# Fewer predictions than this compared between the fused and trained models give no agreement figure.
MIN_AGREEMENT_COUNT = 10


def argmax_agreement(actual: Any, expected: Any) -> tuple[int, int]:
    """(positions whose top class is the same, positions compared): images, or pixels."""
    pairs = [(a, e) for a, e in zip(output_tensors(actual), output_tensors(expected)) if a.ndim >= 2]
    same = sum(int((a.argmax(1) == e.argmax(1)).sum()) for a, e in pairs)
    total = sum(e.argmax(1).numel() for _, e in pairs)
    return same, total


def fuse_and_export(
    network: nn.Module,
    example_inputs: torch.Tensor,
    output_dir: str | os.PathLike,
    metadata: dict[str, Any],
    options: ExportOptions = ExportOptions(),
    context: ExportContext = ExportContext(),
) -> dict[str, Any]:
    """Fuse ``network`` and write it to ``output_dir``; return what was written and the measured errors.

    What to write and how strictly to check are ``options`` (:class:`ExportOptions`), what is known
    of the network and its data ``context`` (:class:`ExportContext`); below, each is named by its field.

    Fusing = MobileOne layers reparameterized, then conv-BN pairs of ``nn.Sequential`` blocks
    (e.g. a segmentation head) folded. The report also gives the agreement between the fused and
    trained models' predictions, from ``agreement(fused_output, trained_output)`` when given (e.g.
    matched detections), else from equal ``argmax`` over dim 1 (per image, or per pixel): the
    function returns (predictions matched, predictions compared); the report holds the fraction as
    ``fused_vs_unfused_agreement`` and the count as ``fused_vs_unfused_agreement_count``. With fewer
    than ``MIN_AGREEMENT_COUNT`` predictions compared the fraction is ``None`` (too few to say).

    Writes ``model_fused.pt`` (the fused state dict), ``model.json`` (``metadata`` plus the
    errors), and optionally ``model.onnx`` (dynamic batch), a TorchScript trace (dynamic batch, and image size with ``dynamic_image_size``)
    and ``model.mlpackage`` (a CoreML ML program at batch 1 and ``coreml_image_size``, by default
    the example's image size, which a ``dynamic_image_size`` network must not rely on;
    ``coreml_precision`` compute precision, a float32 tensor input, or with ``coreml_image_input``
    an RGB image input normalized with ``metadata``'s ``mean`` / ``std``; outputs named
    ``output_names``). The fused model is compared with the unfused one on ``example_inputs``
    (real images, preprocessed as for validation), and the ONNX file (in onnxruntime) and the
    TorchScript trace with PyTorch; any error above ``tolerance`` raises ``RuntimeError``, and a
    failed conversion its own error, before anything is written. CoreML is checked structurally
    only (no ``batch_norm`` op, expected inputs and outputs): it cannot run outside macOS.

    Deployment files run on this machine (``backbones.runtimes``): ``int8`` adds ``model.int8.onnx``
    (onnxruntime static QDQ quantization calibrated on ``calibration``, batches of real training
    inputs, in ``int8_scheme``, default the one exact on this CPU: ``default_int8_scheme()``; the
    report's ``int8_calibration`` names it with the CPU's kind and flags); ``executorch`` adds
    ``model.pte`` (ExecuTorch, XNNPACK delegate, float32, checked
    against ``tolerance`` like ONNX) and with ``int8`` also ``model.int8.pte`` (PT2E quantization
    with the XNNPACK quantizer, same calibration). With ``int8_preparation`` both INT8 files are
    made from ``backbones.quantization.prepare_for_int8``'s copy of the fused network (the same
    function: MobileOne's activations equalized per channel, the bias of every quantized layer
    corrected for its weights' int8 rounding, on the calibration batches). ``int8_activations``
    (``backbones.quantization.int8_simulation_sites`` of a network trained in its INT8 arithmetic,
    whose ``remove_int8_simulation`` is ``network``) gives ``model.int8.onnx`` the activations'
    scales and zero points that training used, and both INT8 files are made from the fused network
    as it is (it is already equalized and bias-corrected). Each of these is run in its own runtime and
    compared with the fused float32 model (``report["deployed"][<file>]["vs_float32"]``: relative
    error of the outputs and the prediction agreement, from ``deployment_agreement`` when given
    (a looser match than ``agreement``'s for INT8's moved scores), else as defined above). With ``evaluate`` (a
    function that runs the task's validation with a given network in place of the trained one and
    returns its metrics) the comparison covers the whole validation set and each file's metrics
    are recorded next to those of the fused float32 model; otherwise it covers ``example_inputs``.
    ``metric`` names the metric the log lines quote; ``quantized_modules`` (submodule names of
    ``network``) restricts INT8 to those (default: the whole network). ``model.json`` also gives
    every file's size.

    ``output_dir`` is written as one unit (``backbones.atomic.atomic_write_dir``): all files go to a
    hidden sibling folder ``.<name>.<random>.tmp``, are checked to be there, and that folder then
    takes the place of ``output_dir``. An earlier export there is replaced completely (no file of
    it is left, e.g. its ``model.onnx`` when this export has ``onnx=False``); if this export fails
    or is interrupted, the earlier one stays exactly as it was, and a killed process leaves at
    most the hidden scratch folder beside it, never a folder mixing two exports. A folder holding
    anything an export does not write (``EXPORT_FILES``, e.g. a user's notes) is refused with
    ``FileExistsError`` naming it, before any work: its files are never deleted nor carried over.
    Files and folders get the user's umask (e.g. 0644 / 0755 under umask 022).
    """
    check_replaceable(output_dir, is_export_file)  # fail before the conversions, not after
    started = time.perf_counter()
    network = copy.deepcopy(network).eval().cpu().float()
    example_inputs = example_inputs.cpu().float()
    fused = fuse_for_deployment(network)
    with torch.no_grad():
        reference = network(example_inputs)
        fused_output = fused(example_inputs)
    refuse_non_finite(network, example_inputs, reference, "the trained network")
    refuse_non_finite(fused, example_inputs, fused_output, "the fused network")
    matched, compared = (context.agreement or argmax_agreement)(fused_output, reference)
    report: dict[str, Any] = {
        "fused_vs_unfused_relative_error": _worst_error(fused_output, reference),
        "fused_vs_unfused_agreement": matched / compared if compared >= MIN_AGREEMENT_COUNT else None,
        "fused_vs_unfused_agreement_count": compared,
    }
    if compared < MIN_AGREEMENT_COUNT:
        log.warning("fused vs unfused agreement not measured: %d predictions on %d images, fewer than %d",
                    compared, len(example_inputs), MIN_AGREEMENT_COUNT)
    log.info("reparameterized and compared with the trained model on %d images: relative error %.3e (%.1f s)",
             len(example_inputs), report["fused_vs_unfused_relative_error"], _since(started))
    _check(report, "fused_vs_unfused_relative_error", options.tolerance, "the fused model differs from the trained one")

    # Convert and check every format first, write afterwards: a failed check leaves output_dir untouched.
    writers: dict[str, tuple[str, Callable[[Path], object]]] = {
        "weights": (FUSED_WEIGHTS, lambda p: torch.save(fused.state_dict(), p)),
    }
    onnx_bytes = None
    if options.onnx or options.int8:
        started = time.perf_counter()
        onnx_bytes, report["onnx_vs_pytorch_relative_error"] = _onnx_export(
            fused, example_inputs, fused_output, context.dynamic_image_size
        )
        log.info("ONNX exported and run in onnxruntime: relative error %.3e vs PyTorch (%.1f s)",
                 report["onnx_vs_pytorch_relative_error"], _since(started))
        _check(report, "onnx_vs_pytorch_relative_error", options.tolerance, "onnxruntime's output differs from PyTorch's")
    if options.onnx:
        writers["onnx"] = (ONNX_FILE, lambda p: p.write_bytes(onnx_bytes))
    if options.torchscript:
        started = time.perf_counter()
        traced = to_torchscript(fused, example_inputs, context.dynamic_image_size)
        with torch.no_grad():
            report["torchscript_vs_pytorch_relative_error"] = _worst_error(traced(example_inputs), fused_output)
        log.info("TorchScript traced and run: relative error %.3e vs PyTorch (%.1f s)",
                 report["torchscript_vs_pytorch_relative_error"], _since(started))
        _check(report, "torchscript_vs_pytorch_relative_error", options.tolerance, "the TorchScript trace's output differs from PyTorch's")
        writers["torchscript"] = (TORCHSCRIPT_FILE, lambda p: traced.save(str(p)))
    if options.coreml:
        started = time.perf_counter()
        mlmodel, report["coreml"] = _coreml_export(
            fused, example_inputs, metadata, options.coreml_precision, options.coreml_image_input, options.coreml_image_size,
            context.dynamic_image_size, context.output_names,
        )
        log.info("CoreML ML program converted (%s): ops %s (%.1f s)", options.coreml_precision, report["coreml"].get("op_types"), _since(started))
        writers["coreml"] = (COREML_FILE, lambda p: save_mlpackage(mlmodel, p))
    deployed = _deployment_files(fused, example_inputs, fused_output, report, writers, onnx_bytes if options.int8 else None,
                                 options, context)
    if deployed:
        match = context.deployment_agreement or context.agreement or argmax_agreement
        report["deployed"] = _compare_deployed(fused, deployed, example_inputs, match, context.evaluate, context.metric)

    def write_metadata(path: Path) -> None:  # last: its presence marks a complete export
        names = sorted(name for name, _ in writers.values() if name != METADATA)
        sizes = {name: _size(path.parent / name) for name in names}
        path.write_text(json.dumps({**metadata, **report, "files": names, "file_bytes": sizes}, indent=2) + "\n")

    writers["metadata"] = (METADATA, write_metadata)

    def write(folder: Path) -> None:
        for name, write_one in writers.values():
            write_one(folder / name)
        written, expected = sorted(os.listdir(folder)), sorted(name for name, _ in writers.values())
        empty = [name for name in written if (folder / name).is_file() and (folder / name).stat().st_size == 0]
        if written != expected or empty:
            raise RuntimeError(f"the export to {output_dir} wrote {written} ({empty} empty), expected {expected}: nothing was replaced")

    output_dir = Path(output_dir)
    atomic_write_dir(output_dir, write, ours=is_export_file)
    files = {key: str(output_dir / name) for key, (name, _) in writers.items()}
    return {**report, "files": files}


def _since(started: float) -> float:
    return time.perf_counter() - started


def _size(path: Path) -> int:
    """Bytes of a file, or of all files under a folder (an ``.mlpackage``)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _deployment_files(
    fused: nn.Module,
    example_inputs: torch.Tensor,
    fused_output: Any,
    report: dict[str, Any],
    writers: dict[str, tuple[str, Callable[[Path], object]]],
    onnx_bytes_to_quantize: bytes | None,
    options: ExportOptions,
    context: ExportContext,
) -> dict[str, nn.Module]:
    """Build the INT8 ONNX and ExecuTorch files asked for, add their writers, and return a module
    running each (by file name)."""
    quantize = onnx_bytes_to_quantize is not None
    calibration, quantized_modules, int8_activations = context.calibration, context.quantized_modules, context.int8_activations
    dynamic_image_size, executorch = context.dynamic_image_size, options.executorch
    if quantize and not calibration:
        raise ValueError("INT8 quantization needs calibration images (batches of real training inputs); none were given")
    files: dict[str, bytes] = {}
    deployed: dict[str, nn.Module] = {}
    trained_for_int8 = int8_activations is not None
    int8_preparation = options.int8_preparation and not trained_for_int8
    prepared_copies: dict[int | None, nn.Module] = {}

    def prepared_for(levels: int | None) -> nn.Module:
        """``prepare_for_int8``'s copy of ``fused`` for weights of ``levels``, made once (ONNX s8s8 and ExecuTorch share it)."""
        if levels not in prepared_copies:
            prepared_copies[levels] = prepare_for_int8(fused, calibration, levels, modules=quantized_modules)
        return prepared_copies[levels]

    if quantize:
        started = time.perf_counter()
        cpu = int8_cpu()
        int8_scheme = options.int8_scheme or default_int8_scheme(cpu)
        source = onnx_bytes_to_quantize
        if int8_preparation:
            source = to_onnx_bytes(prepared_for(INT8_WEIGHT_LEVELS[int8_scheme]), example_inputs, dynamic_image_size)
        files[ONNX_INT8_FILE] = quantize_onnx(source, calibration, options.calibration_method, quantized_modules, scheme=int8_scheme,
                                              activation_quantization=int8_activations)
        deployed[ONNX_INT8_FILE] = OnnxRuntimeNetwork(files[ONNX_INT8_FILE])
        report["int8_calibration"] = {
            "images": _count(calibration), "onnx_scheme": int8_scheme,
            "onnx_method": (f"the ranges of quantization-aware training ({len(int8_activations)} tensors)" if trained_for_int8
                            else options.calibration_method),
            "cpu": cpu, "cpu_flags": cpu_flags(),
            "preparation": "equalized activations, weight-rounding bias corrected (backbones.quantization)" if int8_preparation else None,
            "executorch_observer": "HistogramObserver (the XNNPACK quantizer's)" if executorch else None,
        }
        log.info("INT8 ONNX quantized (static QDQ, %s, activation ranges: %s on %d images; this CPU: %s) (%.1f s)", int8_scheme,
                 report["int8_calibration"]["onnx_method"], _count(calibration), cpu, _since(started))
    if executorch:
        started = time.perf_counter()
        files[EXECUTORCH_FILE] = to_executorch(fused, example_inputs, dynamic_image_size)
        deployed[EXECUTORCH_FILE] = ExecuTorchNetwork(files[EXECUTORCH_FILE])
        with torch.no_grad():
            report["executorch_vs_pytorch_relative_error"] = _worst_error(deployed[EXECUTORCH_FILE](example_inputs), fused_output)
        log.info("ExecuTorch program (XNNPACK) lowered and run: relative error %.3e vs PyTorch (%.1f s)",
                 report["executorch_vs_pytorch_relative_error"], _since(started))
        _check(report, "executorch_vs_pytorch_relative_error", options.tolerance, "the ExecuTorch program's output differs from PyTorch's")
        if quantize:
            started = time.perf_counter()
            prepared = prepared_for(INT8_WEIGHT_LEVELS["s8s8"]) if int8_preparation else fused  # XNNPACK: int8 weights in [-127, 127]
            files[EXECUTORCH_INT8_FILE] = to_executorch(prepared, example_inputs, dynamic_image_size, calibration, modules=quantized_modules)
            deployed[EXECUTORCH_INT8_FILE] = ExecuTorchNetwork(files[EXECUTORCH_INT8_FILE])
            log.info("INT8 ExecuTorch program (PT2E, XNNPACK) quantized and lowered (%.1f s)", _since(started))
    for name, content in files.items():
        writers[name] = (name, lambda p, content=content: p.write_bytes(content))
    return deployed


def _count(batches: Iterable[torch.Tensor]) -> int:
    return sum(len(batch) for batch in batches)


class _ComparedWithReference(nn.Module):
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


def _runtime(name: str) -> str:
    if name.endswith(".pte"):
        from importlib.metadata import version

        return f"ExecuTorch {version('executorch')} (XNNPACK)"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def _compare_deployed(
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
        log.info("%s (float32, PyTorch) validated: %s %s (%.1f s)", FUSED_WEIGHTS, metric, _format(reference_metric), _since(started))
    for name, runner in deployed.items():
        started = time.perf_counter()
        compared = _ComparedWithReference(runner, fused, agreement, name)
        if evaluate is not None:
            validation = evaluate(compared)
        else:
            validation = None
            compared(example_inputs)
        summary = compared.summary()
        precision = "int8" if ".int8." in name else "float32"
        records[name] = {"precision": precision, "runtime": _runtime(name), "vs_float32": summary, "validation": validation}
        value = (validation or {}).get(metric)
        suffix = f"; {metric} {_format(value)} (float32 {_format(reference_metric)})" if validation is not None else ""
        log.info("%s (%s, %s) on %d images: agrees with float32 on %s of %d predictions, relative error %.3e%s (%.1f s)",
                 name, precision, records[name]["runtime"], summary["images"], _percent(summary["agreement"]),
                 summary["agreement_count"], summary["relative_error"], suffix, _since(started))
    return records


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _check(report: dict[str, Any], key: str, tolerance: float, what: str) -> None:
    if not math.isfinite(report[key]) or report[key] > tolerance:  # NaN compares as within any tolerance
        raise RuntimeError(f"{what} by relative error {report[key]:.3e} > {tolerance:g} ({key}); nothing was written")


def _coreml_export(
    fused: nn.Module,
    example_inputs: torch.Tensor,
    metadata: dict[str, Any],
    precision: str,
    image_input: bool,
    image_size: int | tuple[int, int] | None,
    dynamic_image_size: bool,
    output_names: list[str] | None,
) -> tuple[Any, dict[str, Any]]:
    """Convert to CoreML and check the program's interface against PyTorch's outputs; return the
    model and a description of it for ``model.json``."""
    if image_size is None and dynamic_image_size:
        raise ValueError(
            "this network takes any image size, but a CoreML program needs a fixed one (coremltools cannot "
            "convert its bilinear upsampling to a flexible size): give coreml_image_size (e.g. --coreml_image_size 512)"
        )
    example = example_inputs[:1]
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"coreml_image_size={image_size!r}: expected a positive int or (height, width)")
        example = torch.nn.functional.interpolate(example, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = fused(example)
    normalization = None
    if image_input:
        mean, std = metadata.get("mean"), metadata.get("std")
        if not mean or not std:
            raise ValueError(
                f"a CoreML image input needs the normalization: the export metadata has mean={mean!r}, std={std!r}"
            )
        normalization = (mean, std)
    mlmodel = to_coreml(
        fused, example, precision=precision, image_normalization=normalization, output_names=output_names,
        minimum_deployment_target=COREML_TARGET,
    )
    import coremltools  # present: to_coreml needs it

    description = mlmodel.get_spec().description
    outputs = [{"name": o.name, "shape": list(o.type.multiArrayType.shape)} for o in description.output]
    expected_shapes = [list(t.shape) for t in output_tensors(expected)]
    if [o["shape"] for o in outputs] != expected_shapes:
        raise RuntimeError(f"the CoreML program's output shapes {[o['shape'] for o in outputs]} are not PyTorch's {expected_shapes}")
    (spec_input,) = description.input
    info = {
        "file": COREML_FILE,
        "coremltools": coremltools.__version__,
        "precision": precision,
        "minimum_deployment_target": COREML_TARGET,
        "input": {
            "name": spec_input.name,
            "type": "image RGB, pixels 0-255 (normalized inside)" if image_input else "float32 tensor",
            "shape": list(example.shape),
        },
        "outputs": outputs,
        "op_types": sorted(coreml_op_types(mlmodel)),
        "checked": "structure only (conversion, names, shapes, no batch_norm): CoreML predicts on macOS only",
    }
    return mlmodel, info


def _onnx_export(
    fused: nn.Module, example_inputs: torch.Tensor, expected: Any, dynamic_image_size: bool
) -> tuple[bytes, float]:
    import onnxruntime

    content = to_onnx_bytes(fused, example_inputs, dynamic_image_size)
    session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: example_inputs.numpy()})
    return content, _worst_error([torch.from_numpy(a) for a in actual], expected)


def split_loader(datamodule: pl.LightningDataModule | None, split: str) -> Iterable[Any]:
    """The data config's validation loader (``split="validate"``) or training loader (``"fit"``),
    after its ``setup``; export checks and calibrates on real images, so it needs one."""
    if datamodule is None:
        raise ValueError("export checks the fused model on real images: it needs the data config")
    datamodule.setup(split)
    return datamodule.val_dataloader() if split == "validate" else datamodule.train_dataloader()


def first_images(batches: Iterable[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The first ``count`` images of ``batches`` (fewer if they run out), as the batches they came in."""
    taken: list[torch.Tensor] = []
    for batch in batches:
        if count - _count(taken) <= 0:
            break
        taken.append(batch[: count - _count(taken)])
    return taken


def same_size_images(batches: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """The first ``count`` images of ``batches`` that have the first one's size, as one batch."""
    taken: list[torch.Tensor] = []
    for batch in batches:
        if taken and batch.shape[1:] != taken[0].shape[1:]:
            continue
        taken.append(batch)
        if _count(taken) >= count:
            break
    if not taken:
        raise ValueError("no images to check the export on: the validation split is empty")
    return torch.cat(taken)[:count]


@contextlib.contextmanager
def _only_warnings_from(*names: str) -> Iterator[None]:
    """Raise the named loggers to WARNING inside the context."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# What an evaluation Trainer would print: "GPU available: ...", "LOCAL_RANK ...", and the tasks' result
# tables (the export logs one line per evaluated file instead; model.json keeps every metric).
_EVALUATION_NOISE = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "tasks")


def validation_metrics(
    model: pl.LightningModule, datamodule: pl.LightningDataModule, network: nn.Module, limit_batches: int | None = None
) -> dict[str, float]:
    """The task's validation metrics when ``network`` (the export form: preprocessed images in,
    the exported outputs out) runs in place of the trained network (``model.validating_with``),
    on CPU, on the whole validation split or its first ``limit_batches`` batches."""
    attached = model._trainer, datamodule.trainer
    try:
        with _only_warnings_from(*_EVALUATION_NOISE), model.validating_with(network):
            evaluator = pl.Trainer(
                accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=limit_batches or 1.0,
            )
            (metrics,) = evaluator.validate(model, datamodule=datamodule, verbose=False)
    finally:
        model.trainer, datamodule.trainer = attached
    return {key: float(value) for key, value in metrics.items()}


def export_task(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    output: str,
    *,
    onnx: bool = True,
    torchscript: bool = False,
    tolerance: float = 1e-5,
    coreml: bool = False,
    coreml_precision: Literal["float16", "float32"] = "float16",
    coreml_image_input: bool = False,
    coreml_image_size: int | tuple[int, int] | None = None,
    int8: bool = False,
    executorch: bool = False,
    calibration_images: int = 256,
    calibration_method: Literal["minmax", "percentile", "entropy"] = "percentile",
    int8_scheme: Literal["s8s8", "u8u8", "reduce_range"] | None = None,
    int8_preparation: bool = True,
    validation_batches: int | None = None,
) -> dict[str, Any]:
    """Export ``model``'s network in inference form, checked on real validation inputs; the options
    are the ``export`` subcommand's flags (``TaskTrainer.export`` passes them on).

    ``model`` is a ``tasks.common.module.BaseTask``: every hook called here is declared there, with
    its default and what it means (``export_network``, ``export_batches``, ``export_inputs``,
    ``export_metadata``, ``validating_with``, ``validation_metric``, ``export_dynamic_image_size``,
    ``export_quantized_modules``, ``export_agreement``, ``deployment_agreement``,
    ``int8_simulation``); they become ``fuse_and_export``'s :class:`ExportContext`, the flags
    below its :class:`ExportOptions`.

    Args:
        model: the task module.
        datamodule: supplies the real validation images the fused model is checked on.
        output: the export folder, replaced as a whole.
        onnx: also write and check ``model.onnx`` (onnxruntime).
        torchscript: also write ``model_fused.torchscript.pt``, a trace checked against PyTorch.
        tolerance: largest accepted relative error, fused vs unfused, ONNX and TorchScript vs PyTorch.
        coreml: also write ``model.mlpackage``, a CoreML ML program (needs ``pip install -e ".[coreml]"``;
            batch 1 at the checked images' size; checked for structure only, CoreML runs on macOS).
        coreml_precision: the ML program's compute precision (float16 runs on the Neural Engine).
        coreml_image_input: make the CoreML input an RGB image (pixels 0-255, normalized inside
            the model) instead of a normalized float32 tensor.
        coreml_image_size: the CoreML input's fixed size, ``S`` or ``[H, W]`` (default: the size of
            the checked images; required for segmentation, whose other exports take any size).
        int8: also write ``model.int8.onnx`` (onnxruntime static INT8 quantization, QDQ format,
            per-channel weights) and, with ``executorch``, ``model.int8.pte``; both are
            calibrated on ``calibration_images`` training images of the data config.
        executorch: also write ``model.pte``, an ExecuTorch program for the XNNPACK delegate
            (Android, iOS, Linux; needs ``pip install -e ".[executorch]"``).
        calibration_images: how many training images (augmented as for training) INT8 calibration sees.
        calibration_method: how ``model.int8.onnx``'s activation ranges are set from them:
            ``percentile`` (99.999%, the default: on Apple's S0 and MobileNetV2, prepared, the
            closest to float32; ``benchmarks.int8_methods``), ``minmax`` (the observed range) or
            ``entropy`` (onnxruntime's methods); ``model.int8.pte`` uses the XNNPACK quantizer's histogram observer.
        int8_scheme: ``model.int8.onnx``'s integer types (``backbones.runtimes.INT8_SCHEMES``);
            default: the one onnxruntime computes exactly, without saturation, on this CPU (s8s8
            with VNNI, reduce_range on x86 without VNNI; ``$MOBILEONE_INT8_CPU`` = ``vnni`` /
            ``no-vnni`` exports for the other kind). Recorded in ``model.json`` with the CPU's flags.
        int8_preparation: quantize a copy of the fused network prepared for INT8 (the same
            function; ``backbones.quantization.prepare_for_int8``): MobileOne's activations
            equalized per channel, each quantized layer's bias corrected for its weights' int8
            rounding. Off: the fused network as it is (plain post-training quantization). Neither
            for a network trained in its INT8 arithmetic (the task's ``int8_simulation()``): its
            INT8 file is made in the scheme and with the activation ranges of the training (and
            ``executorch`` is refused for one trained in ``reduce_range``, not XNNPACK's s8s8).
        validation_batches: with ``int8`` or ``executorch``, every written runtime file and the
            fused model are run through the validation split and their metrics recorded in
            ``model.json``; this limits that to the first batches (default: the whole split).
    """
    inputs = model.export_inputs(datamodule)
    simulation = model.int8_simulation() if int8 else None
    if simulation is not None:
        if int8_scheme is not None and int8_scheme != simulation["scheme"]:
            raise ValueError(f"int8_scheme={int8_scheme!r}: this network was trained for INT8 in {simulation['scheme']!r}, "
                             "the scheme its INT8 file is made in (train again with another --model.int8_scheme for another)")
        int8_scheme = simulation["scheme"]
        if executorch and int8_scheme != "s8s8":
            # Measured (benchmarks.int8_qat, Apple's S0): XNNPACK's int8 of a network trained for the 64-level
            # reduce_range grid lost 15-20 points of top-1, while its onnxruntime file kept float32's accuracy.
            raise ValueError(f"executorch=True with int8: this network was trained for INT8 in {int8_scheme!r} "
                             "(weights on a 64-level grid), XNNPACK quantizes in s8s8 (127 levels) and loses its "
                             "accuracy; export without --executorch, or train with --model.int8_scheme s8s8 for both files")
        if int8_scheme != default_int8_scheme(int8_cpu()):
            log.warning("the INT8 file is made in %s, which onnxruntime does not compute exactly on this CPU (%s): its "
                        "validation here is not what the target CPU computes", int8_scheme, int8_cpu())
    calibration = None
    if int8:
        if calibration_images < 1:
            raise ValueError(f"calibration_images={calibration_images}: INT8 quantization needs at least one calibration image")
        started = time.perf_counter()
        calibration = first_images(model.export_batches(datamodule, "fit"), calibration_images)
        log.info("read %d training images for INT8 calibration (%.1f s)", _count(calibration), _since(started))

    def evaluate(network: nn.Module) -> dict[str, float]:
        return validation_metrics(model, datamodule, network, validation_batches)

    options = ExportOptions(
        onnx=onnx, torchscript=torchscript, tolerance=tolerance, coreml=coreml, coreml_precision=coreml_precision,
        coreml_image_input=coreml_image_input, coreml_image_size=coreml_image_size, int8=int8, executorch=executorch,
        calibration_method=calibration_method, int8_scheme=int8_scheme, int8_preparation=int8_preparation,
    )
    context = ExportContext(
        dynamic_image_size=model.export_dynamic_image_size,
        agreement=model.export_agreement,
        deployment_agreement=model.deployment_agreement,
        quantized_modules=model.export_quantized_modules,
        calibration=calibration,
        int8_activations=simulation["activations"] if simulation is not None else None,
        evaluate=evaluate if int8 or executorch else None,
        metric=model.validation_metric,
    )
    result = fuse_and_export(model.export_network(), inputs, output, model.export_metadata(datamodule), options, context)
    lines = [f"exported to {output}:"]
    lines += [f"  {name}: {path}" for name, path in sorted(result["files"].items())]
    lines += [f"  {key}: {value:.3e}" for key, value in result.items() if key.endswith("relative_error")]
    if result.get("fused_vs_unfused_agreement") is not None:
        lines.append(f"  fused_vs_unfused_agreement: {result['fused_vs_unfused_agreement']:.6f}"
                     f" ({result['fused_vs_unfused_agreement_count']} predictions)")
    for name, record in result.get("deployed", {}).items():
        value = (record.get("validation") or {}).get(model.validation_metric)
        if value is not None:
            lines.append(f"  {name}: {model.validation_metric} {value:.4f}")
    rank_zero_info("\n".join(lines))
    return result
