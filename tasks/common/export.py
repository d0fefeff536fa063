"""Export of a trained network in inference form: fuse, check on real inputs, write atomically."""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.export import fuse_for_deployment, to_onnx_bytes
from backbones.testing import relative_error

log = logging.getLogger(__name__)

FUSED_WEIGHTS = "model_fused.pt"
METADATA = "model.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model_fused.torchscript.pt"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``: ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


def _outputs(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [v for v in output.values() if isinstance(v, torch.Tensor)]
    return [o for o in output if isinstance(o, torch.Tensor)]


def _worst_error(actual: Any, expected: Any) -> float:
    return max(relative_error(a, e) for a, e in zip(_outputs(actual), _outputs(expected)))


def _argmax_agreement(actual: Any, expected: Any) -> float:
    """Fraction of positions (images, or pixels) whose top class is the same."""
    pairs = [(a, e) for a, e in zip(_outputs(actual), _outputs(expected)) if a.ndim >= 2]
    same = sum((a.argmax(1) == e.argmax(1)).sum().item() for a, e in pairs)
    total = sum(e.argmax(1).numel() for _, e in pairs)
    return same / max(1, total)


def export_network(
    network: nn.Module,
    example_inputs: torch.Tensor,
    output_dir: str | os.PathLike,
    metadata: dict[str, Any],
    onnx: bool = True,
    torchscript: bool = False,
    tolerance: float = 1e-5,
    dynamic_image_size: bool = False,
    agreement: Callable[[Any, Any], float] | None = None,
) -> dict[str, Any]:
    """Fuse ``network`` and write it to ``output_dir``; return what was written and the measured errors.

    Fusing = MobileOne layers reparameterized, then conv-BN pairs of ``nn.Sequential`` blocks
    (e.g. a segmentation head) folded. The report also gives the agreement between the fused and
    trained models' predictions: ``agreement(fused_output, trained_output)`` when given (e.g.
    matched detections), else the fraction of equal ``argmax`` over dim 1 (per image, or per pixel).

    Writes ``model_fused.pt`` (the fused state dict), ``model.json`` (``metadata`` plus the
    errors), and optionally ``model.onnx`` (dynamic batch) and a TorchScript trace. The fused
    model is compared with the unfused one on ``example_inputs`` (real images, preprocessed as
    for validation), and the ONNX file with PyTorch in onnxruntime; either error above
    ``tolerance`` raises ``RuntimeError`` before anything is written.
    """
    network = copy.deepcopy(network).eval().cpu().float()
    example_inputs = example_inputs.cpu().float()
    fused = fuse_for_deployment(network)
    with torch.no_grad():
        reference = network(example_inputs)
        fused_output = fused(example_inputs)
    report: dict[str, Any] = {
        "fused_vs_unfused_relative_error": _worst_error(fused_output, reference),
        "fused_vs_unfused_agreement": (agreement or _argmax_agreement)(fused_output, reference),
    }
    log.info("fused vs unfused relative error on %d images: %.3e", len(example_inputs), report["fused_vs_unfused_relative_error"])
    if report["fused_vs_unfused_relative_error"] > tolerance:
        raise RuntimeError(
            f"the fused model differs from the trained one by relative error "
            f"{report['fused_vs_unfused_relative_error']:.3e} > {tolerance:g}; nothing was written"
        )

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if onnx:
        onnx_bytes, report["onnx_vs_pytorch_relative_error"] = _onnx_export(
            fused, example_inputs, fused_output, dynamic_image_size
        )
        log.info("onnxruntime vs PyTorch relative error: %.3e", report["onnx_vs_pytorch_relative_error"])
        if report["onnx_vs_pytorch_relative_error"] > tolerance:
            raise RuntimeError(
                f"onnxruntime's output differs from PyTorch's by relative error "
                f"{report['onnx_vs_pytorch_relative_error']:.3e} > {tolerance:g}; nothing was written"
            )
        files["onnx"] = str(atomic_write(output_dir / ONNX_FILE, lambda p: Path(p).write_bytes(onnx_bytes)))
    if torchscript:
        traced = torch.jit.trace(fused, example_inputs[:1])
        files["torchscript"] = str(atomic_write(output_dir / TORCHSCRIPT_FILE, lambda p: traced.save(p)))
    files["weights"] = str(atomic_write(output_dir / FUSED_WEIGHTS, lambda p: torch.save(fused.state_dict(), p)))
    content = json.dumps({**metadata, **report, "files": sorted(Path(f).name for f in files.values())}, indent=2)
    files["metadata"] = str(atomic_write(output_dir / METADATA, lambda p: Path(p).write_text(content + "\n")))
    return {**report, "files": files}


def _onnx_export(
    fused: nn.Module, example_inputs: torch.Tensor, expected: Any, dynamic_image_size: bool
) -> tuple[bytes, float]:
    import onnxruntime

    content = to_onnx_bytes(fused, example_inputs, dynamic_image_size)
    session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: example_inputs.numpy()})
    return content, _worst_error([torch.from_numpy(a) for a in actual], expected)
