"""The files an export folder holds, by name."""

from __future__ import annotations

FUSED_WEIGHTS = "model_fused.pt"
METADATA = "model.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model_fused.torchscript.pt"
COREML_FILE = "model.mlpackage"
ONNX_INT8_FILE = "model.int8.onnx"
EXECUTORCH_FILE = "model.pte"
EXECUTORCH_INT8_FILE = "model.int8.pte"
EXPORT_FILES = frozenset(
    {FUSED_WEIGHTS, METADATA, ONNX_FILE, TORCHSCRIPT_FILE, COREML_FILE, ONNX_INT8_FILE, EXECUTORCH_FILE, EXECUTORCH_INT8_FILE}
)


def is_export_file(name: str) -> bool:
    """Whether ``name`` (an entry of an export folder) is one an export writes."""
    return name in EXPORT_FILES
