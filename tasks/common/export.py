"""Export of a trained network in inference form: fuse, check on real inputs, write atomically."""

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

from backbones.atomic import atomic_write_dir, atomic_write_file, check_replaceable
from backbones.export import (
    coreml_op_types, fuse_for_deployment, output_tensors, save_mlpackage, to_coreml, to_onnx_bytes, to_torchscript,
)
from backbones.testing import relative_error

log = logging.getLogger(__name__)

FUSED_WEIGHTS = "model_fused.pt"
METADATA = "model.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model_fused.torchscript.pt"
COREML_FILE = "model.mlpackage"
COREML_TARGET = "iOS16"  # minimum deployment target of model.mlpackage (macOS 13 and the like; iPhone 8 and newer)
EXPORT_FILES = frozenset({FUSED_WEIGHTS, METADATA, ONNX_FILE, TORCHSCRIPT_FILE, COREML_FILE})


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``: ``path`` is never half-written.

    ``backbones.atomic.atomic_write_file`` for writers that take a ``str`` (the file gets the umask's mode).
    """
    return atomic_write_file(path, lambda temporary: write(str(temporary)))


def is_export_file(name: str) -> bool:
    """Whether ``name`` (an entry of an export folder) is one an export writes, or a temporary file
    an interrupted export of an earlier version (which wrote file by file) left behind."""
    return name in EXPORT_FILES or any(name.startswith(f".{known}.") and name.endswith(".tmp") for known in EXPORT_FILES)


def _worst_error(actual: Any, expected: Any) -> float:
    return max(relative_error(a, e) for a, e in zip(output_tensors(actual), output_tensors(expected)))


# Fewer predictions than this compared between the fused and trained models give no agreement figure.
MIN_AGREEMENT_COUNT = 10


def _argmax_agreement(actual: Any, expected: Any) -> tuple[int, int]:
    """(positions whose top class is the same, positions compared): images, or pixels."""
    pairs = [(a, e) for a, e in zip(output_tensors(actual), output_tensors(expected)) if a.ndim >= 2]
    same = sum(int((a.argmax(1) == e.argmax(1)).sum()) for a, e in pairs)
    total = sum(e.argmax(1).numel() for _, e in pairs)
    return same, total


def export_network(
    network: nn.Module,
    example_inputs: torch.Tensor,
    output_dir: str | os.PathLike,
    metadata: dict[str, Any],
    onnx: bool = True,
    torchscript: bool = False,
    tolerance: float = 1e-5,
    dynamic_image_size: bool = False,
    agreement: Callable[[Any, Any], tuple[int, int]] | None = None,
    coreml: bool = False,
    coreml_precision: str = "float16",
    coreml_image_input: bool = False,
    coreml_image_size: int | tuple[int, int] | None = None,
    output_names: list[str] | None = None,
) -> dict[str, Any]:
    """Fuse ``network`` and write it to ``output_dir``; return what was written and the measured errors.

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
    matched, compared = (agreement or _argmax_agreement)(fused_output, reference)
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
    _check(report, "fused_vs_unfused_relative_error", tolerance, "the fused model differs from the trained one")

    # Convert and check every format first, write afterwards: a failed check leaves output_dir untouched.
    writers: dict[str, tuple[str, Callable[[Path], object]]] = {
        "weights": (FUSED_WEIGHTS, lambda p: torch.save(fused.state_dict(), p)),
    }
    if onnx:
        started = time.perf_counter()
        onnx_bytes, report["onnx_vs_pytorch_relative_error"] = _onnx_export(
            fused, example_inputs, fused_output, dynamic_image_size
        )
        log.info("ONNX exported and run in onnxruntime: relative error %.3e vs PyTorch (%.1f s)",
                 report["onnx_vs_pytorch_relative_error"], _since(started))
        _check(report, "onnx_vs_pytorch_relative_error", tolerance, "onnxruntime's output differs from PyTorch's")
        writers["onnx"] = (ONNX_FILE, lambda p: p.write_bytes(onnx_bytes))
    if torchscript:
        started = time.perf_counter()
        traced = to_torchscript(fused, example_inputs, dynamic_image_size)
        with torch.no_grad():
            report["torchscript_vs_pytorch_relative_error"] = _worst_error(traced(example_inputs), fused_output)
        log.info("TorchScript traced and run: relative error %.3e vs PyTorch (%.1f s)",
                 report["torchscript_vs_pytorch_relative_error"], _since(started))
        _check(report, "torchscript_vs_pytorch_relative_error", tolerance, "the TorchScript trace's output differs from PyTorch's")
        writers["torchscript"] = (TORCHSCRIPT_FILE, lambda p: traced.save(str(p)))
    if coreml:
        started = time.perf_counter()
        mlmodel, report["coreml"] = _coreml_export(
            fused, example_inputs, metadata, coreml_precision, coreml_image_input, coreml_image_size, dynamic_image_size, output_names
        )
        log.info("CoreML ML program converted (%s): ops %s (%.1f s)", coreml_precision, report["coreml"].get("op_types"), _since(started))
        writers["coreml"] = (COREML_FILE, lambda p: save_mlpackage(mlmodel, p))
    content = json.dumps({**metadata, **report, "files": sorted(name for name, _ in writers.values())}, indent=2)
    writers["metadata"] = (METADATA, lambda p: p.write_text(content + "\n"))  # last: its presence marks a complete export

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


def _check(report: dict[str, Any], key: str, tolerance: float, what: str) -> None:
    if report[key] > tolerance:
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
