"""``fuse_and_export``: fuse a network, check it and every file made from it on real inputs,
then write the export folder at once."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.atomic import atomic_write_dir, check_replaceable
from backbones.export import fuse_for_deployment, save_mlpackage, to_torchscript
from tasks.common.export.checks import MIN_AGREEMENT_COUNT, argmax_agreement, check_tolerance, refuse_non_finite, since, worst_error
from tasks.common.export.conversions import coreml_export, onnx_export
from tasks.common.export.deployment import compare_deployed, deployment_files
from tasks.common.export.files import COREML_FILE, FUSED_WEIGHTS, METADATA, ONNX_FILE, TORCHSCRIPT_FILE, is_export_file
from tasks.common.export.options import ExportContext, ExportOptions

log = logging.getLogger(__name__)


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
        "fused_vs_unfused_relative_error": worst_error(fused_output, reference),
        "fused_vs_unfused_agreement": matched / compared if compared >= MIN_AGREEMENT_COUNT else None,
        "fused_vs_unfused_agreement_count": compared,
    }
    if compared < MIN_AGREEMENT_COUNT:
        log.warning("fused vs unfused agreement not measured: %d predictions on %d images, fewer than %d",
                    compared, len(example_inputs), MIN_AGREEMENT_COUNT)
    log.info("reparameterized and compared with the trained model on %d images: relative error %.3e (%.1f s)",
             len(example_inputs), report["fused_vs_unfused_relative_error"], since(started))
    check_tolerance(report, "fused_vs_unfused_relative_error", options.tolerance, "the fused model differs from the trained one")

    # Convert and check every format first, write afterwards: a failed check leaves output_dir untouched.
    writers: dict[str, tuple[str, Callable[[Path], object]]] = {
        "weights": (FUSED_WEIGHTS, lambda p: torch.save(fused.state_dict(), p)),
    }
    onnx_bytes = None
    if options.onnx or options.int8:
        started = time.perf_counter()
        onnx_bytes, report["onnx_vs_pytorch_relative_error"] = onnx_export(
            fused, example_inputs, fused_output, context.dynamic_image_size
        )
        log.info("ONNX exported and run in onnxruntime: relative error %.3e vs PyTorch (%.1f s)",
                 report["onnx_vs_pytorch_relative_error"], since(started))
        check_tolerance(report, "onnx_vs_pytorch_relative_error", options.tolerance, "onnxruntime's output differs from PyTorch's")
    if options.onnx:
        writers["onnx"] = (ONNX_FILE, lambda p: p.write_bytes(onnx_bytes))
    if options.torchscript:
        started = time.perf_counter()
        traced = to_torchscript(fused, example_inputs, context.dynamic_image_size)
        with torch.no_grad():
            report["torchscript_vs_pytorch_relative_error"] = worst_error(traced(example_inputs), fused_output)
        log.info("TorchScript traced and run: relative error %.3e vs PyTorch (%.1f s)",
                 report["torchscript_vs_pytorch_relative_error"], since(started))
        check_tolerance(report, "torchscript_vs_pytorch_relative_error", options.tolerance, "the TorchScript trace's output differs from PyTorch's")
        writers["torchscript"] = (TORCHSCRIPT_FILE, lambda p: traced.save(str(p)))
    if options.coreml:
        started = time.perf_counter()
        mlmodel, report["coreml"] = coreml_export(
            fused, example_inputs, metadata, options.coreml_precision, options.coreml_image_input, options.coreml_image_size,
            context.dynamic_image_size, context.output_names,
        )
        log.info("CoreML ML program converted (%s): ops %s (%.1f s)", options.coreml_precision, report["coreml"].get("op_types"), since(started))
        writers["coreml"] = (COREML_FILE, lambda p: save_mlpackage(mlmodel, p))
    deployed = deployment_files(fused, example_inputs, fused_output, report, writers, onnx_bytes, options, context)
    if deployed:
        match = context.deployment_agreement or context.agreement or argmax_agreement
        report["deployed"] = compare_deployed(fused, deployed, example_inputs, match, context.evaluate, context.metric)

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


def _size(path: Path) -> int:
    """Bytes of a file, or of all files under a folder (an ``.mlpackage``)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
