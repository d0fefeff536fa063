"""Deployment of fused networks: BN folding for heads; ONNX, TorchScript and CoreML with checked graphs.

Needs only torch to import; ``onnx`` / ``onnxscript`` are imported when an ONNX export is asked for,
``coremltools`` (optional extra ``[coreml]``) when a CoreML one is.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from backbones.atomic import atomic_write_dir, reset_modes
from backbones.network import reparameterize_model

__all__ = [
    "FORBIDDEN_COREML_OPS",
    "FORBIDDEN_ONNX_OPS",
    "FORBIDDEN_TORCHSCRIPT_OPS",
    "coreml_op_types",
    "first_non_finite",
    "fold_batchnorm_",
    "is_finite",
    "fuse_for_deployment",
    "output_tensors",
    "relative_error",
    "save_mlpackage",
    "to_coreml",
    "to_onnx_bytes",
    "to_torchscript",
]

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
    forbidden_ops: frozenset[str] = FORBIDDEN_ONNX_OPS,
) -> bytes:
    """Export ``model`` (already fused, eval mode) to ONNX and return the file's bytes.

    Dynamic batch size (and height / width with ``dynamic_image_size``), constants folded by the
    exporter, weights inside the file. Raises ``ValueError`` if the graph still holds one of
    ``forbidden_ops`` (by default ``FORBIDDEN_ONNX_OPS``: an unfused BatchNorm, an Identity or a
    Dropout; pass an empty set to export a model that keeps its BatchNorms, e.g. for benchmarks).
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
    leftovers = sorted({node.op_type for node in onnx.load_from_string(content).graph.node} & forbidden_ops)
    if leftovers:
        raise ValueError(f"the exported ONNX graph still holds {leftovers}: export a fused model (fuse_for_deployment)")
    return content


# TorchScript ops that betray an unfused BatchNorm (in eval mode a trace records ``aten::batch_norm``).
FORBIDDEN_TORCHSCRIPT_OPS = frozenset({"aten::batch_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit_no_training"})


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` computed in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, a tuple / list, or a dict, nested), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [tensor for value in output for tensor in output_tensors(value)]
    return []


def is_finite(output: Any) -> bool:
    """Whether every floating-point tensor of a model's output (as ``output_tensors`` reads it) is free of NaN and inf."""
    return all(bool(torch.isfinite(t).all()) for t in output_tensors(output) if t.is_floating_point())


def first_non_finite(network: nn.Module, inputs: torch.Tensor) -> str | None:
    """Where ``network`` first holds or computes NaN / inf on ``inputs``: the first parameter or
    buffer with a non-finite value (``"parameter stage1.0.reparam_conv.weight"``), else the first
    submodule, in the order they finish, whose output has one (``"module stage2.3"``; the innermost
    one, its parents finish later); ``None`` when everything is finite."""
    for kind, named in (("parameter", network.named_parameters()), ("buffer", network.named_buffers())):
        for name, tensor in named:
            if not is_finite(tensor):
                return f"{kind} {name}"
    found: list[str] = []

    def watch(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not found and not is_finite(output):
                found.append(name)
        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in network.named_modules() if name]
    try:
        with torch.no_grad():
            output = network(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return f"module {found[0]}"
    if not is_finite(output):
        return "the network's own computation (outside its submodules)"
    return None


def _other_inputs(example_inputs: torch.Tensor, dynamic_image_size: bool) -> torch.Tensor:
    """Inputs of another batch size than ``example_inputs`` (one more image, a repeat of the first)
    and, with ``dynamic_image_size``, another height and width (32 px more each)."""
    other = torch.cat([example_inputs, example_inputs[:1]])
    if dynamic_image_size:
        size = (other.shape[-2] + 32, other.shape[-1] + 32)
        other = torch.nn.functional.interpolate(other, size=size, mode="bilinear", align_corners=False)
    return other


def to_torchscript(
    model: nn.Module,
    example_inputs: torch.Tensor,
    dynamic_image_size: bool = False,
    freeze: bool = False,
    check_tolerance: float = 1e-4,
) -> torch.jit.ScriptModule:
    """Trace ``model`` (already fused; put in eval mode) on the first image of ``example_inputs``.

    Raises ``ValueError`` if the traced graph still holds a BatchNorm (trace a fused model: see
    ``fuse_for_deployment``), or if the trace does not reproduce the eager model (output shapes,
    and values within relative error ``check_tolerance``) at another batch size (the whole
    ``example_inputs`` plus one image) and, with ``dynamic_image_size``, another image size: a
    trace that baked a shape in is refused. ``freeze=True`` returns ``torch.jit.freeze(trace)``
    (weights become constants; the BN check runs before freezing, which would fold a leftover BN
    silently).
    """
    model = model.eval()
    other = _other_inputs(example_inputs, dynamic_image_size)
    where = f"input shape {tuple(other.shape)} (traced at {tuple(example_inputs[:1].shape)})"
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export; TorchScript is still what many runtimes load.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\S+` is deprecated", category=FutureWarning)
        traced = torch.jit.trace(model, example_inputs[:1], check_trace=False)
        leftovers = sorted({node.kind() for node in traced.inlined_graph.nodes()} & FORBIDDEN_TORCHSCRIPT_OPS)
        if leftovers:
            raise ValueError(f"the TorchScript trace still holds {leftovers}: trace a fused model (fuse_for_deployment)")
        if freeze:
            traced = torch.jit.freeze(traced)
        try:
            actual = output_tensors(traced(other))
        except RuntimeError as error:
            raise ValueError(f"the TorchScript trace fails at {where}: {error}") from error
        expected = output_tensors(model(other))
    shapes = [tuple(t.shape) for t in actual], [tuple(t.shape) for t in expected]
    if shapes[0] != shapes[1]:
        raise ValueError(f"at {where} the TorchScript trace gives output shapes {shapes[0]}, the model {shapes[1]}")
    worst = max((relative_error(a, e) for a, e in zip(actual, expected)), default=0.0)
    if worst > check_tolerance:
        raise ValueError(f"at {where} the TorchScript trace differs from the model by relative error {worst:.3e} > {check_tolerance:g}")
    return traced


# ---------------------------------------------------------------------------------------------
# CoreML (optional: ``pip install -e ".[coreml]"``). Conversion runs on Linux; prediction needs macOS.

# MIL ops a fused ML program must not contain.
FORBIDDEN_COREML_OPS = frozenset({"batch_norm"})
COREML_PRECISIONS = ("float16", "float32")
COREML_SOURCES = ("torchscript", "torch.export")


def _import_coremltools() -> Any:
    try:
        import coremltools
    except ImportError as error:
        raise ImportError(
            'CoreML export needs coremltools, an optional dependency: pip install -e ".[coreml]" '
            f"(or pip install 'coremltools>=8.0'); import failed with: {error}"
        ) from error
    return coremltools


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for a CoreML image input that delivers RGB in [0, 1]."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> Any:
        return self.model((images - self.mean) / self.std)


def to_coreml(
    model: nn.Module,
    example_inputs: torch.Tensor,
    input_name: str = "images",
    output_names: Sequence[str] | None = None,
    precision: str = "float16",
    image_normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    minimum_deployment_target: str = "iOS16",
    source: str = "torchscript",
) -> Any:
    """Convert ``model`` (already fused) to a CoreML ML program; returns a ``coremltools`` ``MLModel``.

    The input is ``input_name`` with the shape of one image of ``example_inputs`` (batch 1, fixed
    height and width): a float32 tensor (normalized as for PyTorch) or, with
    ``image_normalization=(mean, std)``, an RGB image whose [0, 255] pixels are scaled to [0, 1]
    and normalized inside the model. Outputs are float32 tensors named ``output_names`` (default
    ``output``, or ``output_0``, ``output_1``, ... for several). ``precision`` is the compute
    precision of weights and activations, ``"float16"`` (what the Neural Engine runs) or
    ``"float32"``. ``source`` is the graph capture handed to coremltools: ``"torchscript"``
    (``to_torchscript``'s trace: coremltools' stable path) or ``"torch.export"`` (its beta path).

    Raises ``ValueError`` if the captured graph or the converted program still holds a BatchNorm
    (coremltools folds conv-BN pairs itself but keeps a lone BN, such as an unfused MobileOne
    skip branch), and ``ImportError`` (saying what to install) when coremltools is missing. Save the result with
    ``save_mlpackage``; it cannot run on Linux (coremltools predicts on macOS only).
    """
    ct = _import_coremltools()
    import numpy as np

    if precision not in COREML_PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {COREML_PRECISIONS}")
    if source not in COREML_SOURCES:
        raise ValueError(f"source={source!r}: expected one of {COREML_SOURCES}")
    try:
        target = getattr(ct.target, minimum_deployment_target)
    except AttributeError:
        raise ValueError(
            f"minimum_deployment_target={minimum_deployment_target!r} is not a coremltools target "
            f"(e.g. 'iOS16', 'macOS13'; ML programs need iOS15 / macOS12 or newer)"
        ) from None

    model = model.eval()
    example = example_inputs[:1].float()
    if image_normalization is not None:
        mean, std = image_normalization
        if len(mean) != example.shape[1] or len(std) != example.shape[1]:
            raise ValueError(f"image_normalization: mean {list(mean)} and std {list(std)} need {example.shape[1]} values each")
        model = _Normalize(model, mean, std).eval()
        inputs = [ct.ImageType(name=input_name, shape=tuple(example.shape), scale=1 / 255.0, color_layout=ct.colorlayout.RGB)]
        # the example for tracing is an image in [0, 1], as CoreML will deliver it
        example = (example * torch.tensor(list(std)).view(1, -1, 1, 1) + torch.tensor(list(mean)).view(1, -1, 1, 1)).clamp(0, 1)
    else:
        inputs = [ct.TensorType(name=input_name, shape=tuple(example.shape), dtype=np.float32)]
    with torch.no_grad():
        count = len(output_tensors(model(example)))
    names = list(output_names) if output_names is not None else (["output"] if count == 1 else [f"output_{i}" for i in range(count)])
    if len(names) != count:
        raise ValueError(f"output_names={names} names {len(names)} outputs, the model returns {count}")

    if source == "torchscript":
        graph: Any = to_torchscript(model, example)
    else:
        with torch.no_grad():
            graph = torch.export.export(model, (example,))
        targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
        leftovers = sorted(target for target in targets if "batch_norm" in target)
        if leftovers:
            raise ValueError(f"the exported program still holds {leftovers}: convert a fused model (fuse_for_deployment)")
        graph = graph.run_decompositions({})
    mlmodel = ct.convert(
        graph,
        inputs=inputs,
        outputs=[ct.TensorType(name=name, dtype=np.float32) for name in names],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
        minimum_deployment_target=target,
        skip_model_load=True,  # loading compiles the model, which only macOS can do
    )
    leftovers = sorted(coreml_op_types(mlmodel) & FORBIDDEN_COREML_OPS)
    if leftovers:
        raise ValueError(f"the CoreML program still holds {leftovers}: convert a fused model (fuse_for_deployment)")
    return mlmodel


def coreml_op_types(mlmodel: Any) -> set[str]:
    """The MIL op types in a CoreML ML program (every function and nested block)."""
    spec = mlmodel.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"expected an ML program, got a {spec.WhichOneof('Type')!r} model")
    found: set[str] = set()

    def visit(block: Any) -> None:
        for operation in block.operations:
            found.add(operation.type)
            for nested in operation.blocks:
                visit(nested)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            visit(block)
    return found


def save_mlpackage(mlmodel: Any, path: str | os.PathLike) -> Path:
    """Save ``mlmodel`` as the ``.mlpackage`` directory ``path``, atomically.

    Through ``atomic_write_dir``: the package is written into a hidden temporary directory next to
    ``path`` and renamed; an existing ``path`` folder (whatever it holds: it is a package) is moved
    aside and removed only once the new package is in place (restored if the rename fails), so
    ``path`` is never a half-written package; a file at ``path`` is refused (``NotADirectoryError``).
    The package's files and folders get the umask's modes.
    """
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ValueError(f"{path}: a CoreML ML program is saved as a directory ending in .mlpackage")

    def write(folder: Path) -> None:
        package = folder / path.name  # coremltools wants the .mlpackage name, and to create the folder
        mlmodel.save(str(package))
        for entry in os.listdir(package):
            os.rename(package / entry, folder / entry)
        package.rmdir()
        reset_modes(folder)  # coremltools copies its private (0700) temporary package

    return atomic_write_dir(path, write, ours=lambda name: True)
