"""The float32 files of an export beside the fused weights: ONNX (run in onnxruntime) and CoreML
(checked for structure), each checked against PyTorch before anything is written."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backbones.export import coreml_op_types, output_tensors, to_coreml, to_onnx_bytes
from backbones.runtimes import OnnxRuntimeNetwork
from tasks.common.export.checks import worst_error
from tasks.common.export.files import COREML_FILE

COREML_TARGET = "iOS16"  # minimum deployment target of model.mlpackage (macOS 13 and the like; iPhone 8 and newer)


def coreml_export(
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


def onnx_export(
    fused: nn.Module, example_inputs: torch.Tensor, expected: Any, dynamic_image_size: bool
) -> tuple[bytes, float]:
    """The ONNX file's bytes and its relative error against ``expected`` (PyTorch's output) in onnxruntime."""
    content = to_onnx_bytes(fused, example_inputs, dynamic_image_size)
    actual = OnnxRuntimeNetwork(content).run_array(example_inputs.numpy())
    return content, worst_error([torch.from_numpy(a) for a in actual], expected)
