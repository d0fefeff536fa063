"""Deployment of fused networks: BN folding for heads, ONNX with a checked graph, TorchScript.

Needs only torch to import; ``onnx`` / ``onnxscript`` are imported when an ONNX export is asked for.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from backbones.network import reparameterize_model

__all__ = ["FORBIDDEN_ONNX_OPS", "fold_batchnorm_", "fuse_for_deployment", "to_onnx_bytes"]

# Ops a fused inference graph must not contain: training-only or no-op leftovers.
FORBIDDEN_ONNX_OPS = frozenset({"BatchNormalization", "Identity", "Dropout"})


def fold_batchnorm_(module: nn.Module) -> nn.Module:
    """In place: fold every ``BatchNorm2d`` that directly follows a ``Conv2d`` inside an
    ``nn.Sequential`` (the conv-BN-activation blocks of heads and necks) into the conv, using its
    running statistics; the BN becomes ``nn.Identity``. Returns ``module``."""
    for sequential in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequential._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = sequential._modules[first], sequential._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                sequential._modules[first] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                sequential._modules[second] = nn.Identity()
    return module


def fuse_for_deployment(model: nn.Module) -> nn.Module:
    """A deployable copy of ``model`` in eval mode: MobileOne layers reparameterized, then conv-BN
    pairs of the remaining blocks folded."""
    return fold_batchnorm_(reparameterize_model(model))


def to_onnx_bytes(
    model: nn.Module,
    example_inputs: torch.Tensor,
    dynamic_image_size: bool = False,
    opset: int = 18,
    input_name: str = "images",
) -> bytes:
    """Export ``model`` (already fused, eval mode) to ONNX and return the file's bytes.

    Dynamic batch size (and height / width with ``dynamic_image_size``), constants folded by the
    exporter, weights inside the file. Raises ``ValueError`` if the graph still holds one of
    ``FORBIDDEN_ONNX_OPS`` (an unfused BatchNorm, an Identity or a Dropout).
    """
    import onnx

    dynamic = {0: torch.export.Dim("batch", min=1)}
    if dynamic_image_size:
        dynamic.update({2: torch.export.Dim("height", min=32), 3: torch.export.Dim("width", min=32)})
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "model.onnx")
        torch.onnx.export(
            model.eval(), (example_inputs[:1],), path, dynamo=True, opset_version=opset, input_names=[input_name],
            dynamic_shapes=(dynamic,), external_data=False, optimize=True, verbose=False,
        )
        content = Path(path).read_bytes()
    leftovers = sorted({node.op_type for node in onnx.load_from_string(content).graph.node} & FORBIDDEN_ONNX_OPS)
    if leftovers:
        raise ValueError(f"the exported ONNX graph still holds {leftovers}: export a fused model (fuse_for_deployment)")
    return content
