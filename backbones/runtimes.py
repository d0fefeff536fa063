"""INT8 and ExecuTorch deployment of fused networks, and modules that run the deployed files.

- ``quantize_onnx``: post-training static INT8 quantization of an ONNX file (onnxruntime's QDQ
  format, per-channel weights), calibrated on real inputs, in the integer ``scheme`` that
  onnxruntime computes without saturation on this CPU (``int8_cpu`` / ``default_int8_scheme``).
- ``to_executorch``: an ExecuTorch program (``.pte``) lowered to the XNNPACK delegate, in float32
  or INT8 (PT2E quantization with the XNNPACK quantizer, calibrated on real inputs).
- ``OnnxRuntimeNetwork`` / ``ExecuTorchNetwork``: ``nn.Module`` wrappers that run such a file
  (from its bytes) on CPU, so that a deployed file is evaluated exactly like the PyTorch model.

Needs only torch to import; ``onnxruntime`` is imported for the ONNX functions, ``executorch``
(optional extra ``[executorch]``, which brings ``torchao``) for the ExecuTorch ones.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CALIBRATION_METHODS",
    "INT8_CPU_KINDS",
    "INT8_SCHEMES",
    "INT8_WEIGHT_LEVELS",
    "ExecuTorchNetwork",
    "OnnxRuntimeNetwork",
    "cpu_flags",
    "default_int8_scheme",
    "executorch_available",
    "int8_cpu",
    "quantize_onnx",
    "to_executorch",
]

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")

# onnxruntime's x86 int8 kernels: with VNNI (AVX512-VNNI or AVX-VNNI) a u8 x s8 dot product
# accumulates in int32 exactly; without it (AVX2, AVX-512 without VNNI) pairs of u8 x s8 products
# are summed in int16 with saturation (vpmaddubsw), so the same file computes other outputs there.
# s8 activations are shifted to u8 on x86, so s8s8 saturates as u8s8 does. reduce_range (7-bit
# weights: a pair of products stays below 2**15) is exact on every x86 CPU at the cost of one bit of
# weight precision; u8u8 QDQ convolutions are not fused into int8 kernels by onnxruntime (1.32)
# (they run as float32 between quantize / dequantize nodes, slower than float32).
# Measured under qemu-x86_64 -cpu Haswell (AVX2 kernels) by tests/test_runtimes.py's INT8 tests; on
# real ImageNet weights: python -m benchmarks.int8_schemes --emulate-cpu Haswell.
INT8_SCHEMES = ("s8s8", "u8u8", "reduce_range")
INT8_CPU_KINDS = ("vnni", "no-vnni", "not-x86")
# Each scheme's symmetric per-channel weight levels either side of 0 (onnxruntime: int8 [-127, 127],
# reduce_range [-64, 64]); u8u8's weights are asymmetric (no bias correction is prepared for them).
INT8_WEIGHT_LEVELS = {"s8s8": 127, "reduce_range": 64, "u8u8": None}
INT8_CPU_VARIABLE = "MOBILEONE_INT8_CPU"  # forces int8_cpu()'s answer (tests; exporting for another CPU)


def cpu_flags(proc_cpuinfo: bool = True) -> list[str]:
    """The instruction-set extensions that decide onnxruntime's int8 kernels, as the CPU reports
    them (cpuid, read by numpy): ``AVX2``, ``AVX512*`` (``AVX512VNNI`` among them), sorted; with
    ``proc_cpuinfo`` also ``AVX_VNNI`` (VNNI without AVX-512, e.g. Alder Lake, which numpy does not
    list) from /proc/cpuinfo on Linux (an emulator such as qemu-user shows the host's file there)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    flags = {name for name, present in features.items() if present and (name == "AVX2" or name.startswith("AVX512"))}
    if proc_cpuinfo:
        try:
            with open("/proc/cpuinfo") as handle:
                if "avx_vnni" in next((line for line in handle if line.startswith("flags")), "").split():
                    flags.add("AVX_VNNI")
        except OSError:
            pass
    return sorted(flags)


def int8_cpu(flags: Sequence[str] | None = None) -> str:
    """``"vnni"``, ``"no-vnni"`` (x86 without VNNI: onnxruntime's u8 x s8 kernels saturate) or
    ``"not-x86"``, for this CPU or one with the given ``cpu_flags()``; ``$MOBILEONE_INT8_CPU``
    overrides it (one of ``INT8_CPU_KINDS``)."""
    forced = os.environ.get(INT8_CPU_VARIABLE)
    if forced:
        if forced not in INT8_CPU_KINDS:
            raise ValueError(f"{INT8_CPU_VARIABLE}={forced!r}: expected one of {INT8_CPU_KINDS}")
        return forced
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "not-x86"
    return "vnni" if {"AVX512VNNI", "AVX_VNNI"} & set(cpu_flags() if flags is None else flags) else "no-vnni"


def default_int8_scheme(cpu: str | None = None) -> str:
    """The INT8 scheme onnxruntime computes exactly on ``cpu`` (default: this one, ``int8_cpu()``):
    ``s8s8`` with VNNI and off x86, ``reduce_range`` on x86 without VNNI."""
    cpu = cpu or int8_cpu()
    if cpu not in INT8_CPU_KINDS:
        raise ValueError(f"cpu kind {cpu!r}: expected one of {INT8_CPU_KINDS}")
    return "reduce_range" if cpu == "no-vnni" else "s8s8"


def _inputs(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    for batch in batches:
        yield batch.detach().cpu().float().contiguous()


def _nodes_left_float(onnx_bytes: bytes, modules: Sequence[str] | None, float_modules: Sequence[str] | None) -> list[str]:
    """Names of the ONNX nodes to leave float32: those that torch.onnx's exporter did not record
    as inside one of ``modules`` (when given), and those inside one of ``float_modules``
    (dotted submodule names of the exported model, e.g. ``"features"``, ``"stage1.1"``)."""
    import onnx

    left = []
    for node in onnx.load_from_string(onnx_bytes).graph.node:
        scopes = {prop.key: prop.value for prop in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
        scopes = set(ast.literal_eval(scopes)) if scopes is not None else set()
        if (modules and not scopes & set(modules)) or (float_modules and scopes & set(float_modules)):
            left.append(node.name)
    return left


def _tensor_overrides(onnx_bytes: bytes, sites: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """onnxruntime's ``TensorQuantOverrides`` for ``sites``: each named module's input (the first
    input of its Conv / Gemm / MatMul node) or output (the output of the last node recorded inside
    it) gets the site's scale and int8 zero point."""
    import onnx

    if not sites:
        return {}
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for node in onnx.load_from_string(onnx_bytes).graph.node:
        scopes = {prop.key: prop.value for prop in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
        for scope in ast.literal_eval(scopes) if scopes is not None else []:
            outputs[scope] = node.output[0]  # the last node inside the module
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                inputs.setdefault(scope, node.input[0])
    overrides: dict[str, list[dict[str, Any]]] = {}
    for site in sites:
        names = inputs if site["tensor"] == "input" else outputs
        if site["module"] not in names:
            raise ValueError(f"activation quantization for the {site['tensor']} of {site['module']!r}: no such module in the ONNX graph")
        overrides[names[site["module"]]] = [{"scale": np.array(site["scale"], dtype=np.float32),
                                             "zero_point": np.array(site["zero_point"], dtype=np.int8)}]
    return overrides


def quantize_onnx(
    onnx_bytes: bytes,
    calibration: Iterable[torch.Tensor],
    method: str = "minmax",
    modules: Sequence[str] | None = None,
    input_name: str = "images",
    float_modules: Sequence[str] | None = None,
    scheme: str | None = None,
    activation_quantization: Sequence[dict[str, Any]] | None = None,
) -> bytes:
    """INT8 copy of a float32 ONNX file, calibrated on ``calibration`` (batches of real inputs,
    preprocessed as for inference); returns the new file's bytes.

    onnxruntime's static quantization in QDQ format, weights per output channel, activation ranges
    from ``method`` (``"minmax"``, ``"percentile"`` (99.999%) or ``"entropy"``). ``scheme`` (one of
    ``INT8_SCHEMES``; default ``default_int8_scheme()``, for this CPU): ``"s8s8"`` int8 activations
    and symmetric int8 weights (exact with VNNI, saturates on x86 without it); ``"reduce_range"``
    s8s8 with 7-bit weights (exact on every x86 CPU); ``"u8u8"`` uint8 activations and weights
    (onnxruntime computes them in float32 between quantize / dequantize nodes: slow). The graph is
    first run through onnxruntime's pre-processing (graph
    optimization). With ``modules`` (names of submodules of the model that ``torch.onnx.export``
    exported) only their nodes are quantized; the rest (e.g. a detector's box decoding) stays
    float32; the nodes of ``float_modules`` (dotted submodule names) stay float32 too.
    ``activation_quantization`` (``backbones.quantization.int8_simulation_sites``: module, ``"input"`` or
    ``"output"``, scale, zero point) sets those tensors' scale and zero point instead of calibrating
    them: the ranges a quantization-aware training used.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"calibration method {method!r}: expected one of {CALIBRATION_METHODS}")
    scheme = scheme or default_int8_scheme()
    if scheme not in INT8_SCHEMES:
        raise ValueError(f"INT8 scheme {scheme!r}: expected one of {INT8_SCHEMES}")
    types = QuantType.QUInt8 if scheme == "u8u8" else QuantType.QInt8

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            # the histogram methods stack each tensor's observations: one image at a time keeps their shapes equal
            self.batches = _inputs(calibration) if method == "minmax" else (image[None] for batch in _inputs(calibration) for image in batch)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch.numpy()}

    with tempfile.TemporaryDirectory() as scratch:
        source, prepared, target = (os.path.join(scratch, name) for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        Path(source).write_bytes(onnx_bytes)
        quant_pre_process(source, prepared, skip_symbolic_shape=True)  # symbolic inference fails on dynamic-size Resize
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram methods print their progress
            quantize_static(
                prepared, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=scheme == "reduce_range",
                activation_type=types, weight_type=types, calibrate_method=methods[method],
                nodes_to_exclude=_nodes_left_float(onnx_bytes, modules, float_modules),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": scheme != "u8u8",
                               "TensorQuantOverrides": _tensor_overrides(onnx_bytes, activation_quantization or [])},
            )
        return Path(target).read_bytes()


def executorch_available() -> bool:
    """Whether the optional ``executorch`` package is installed."""
    try:
        with _contained_logging():
            import executorch.exir  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _contained_logging() -> Iterator[None]:
    """Use ExecuTorch / torchao without their side effects on logging: torchao logs a warning
    about torch.compile through torch's pytree logger at import, and ExecuTorch's modules call
    ``logging.basicConfig()`` when imported (some lazily, while lowering), which would print every
    later log record of the program a second time. The root logger's handlers and level are
    restored afterwards, and ExecuTorch's own deprecation / experimental-API warnings are not shown."""
    pytree_log, root = logging.getLogger("torch.utils._pytree"), logging.getLogger()
    pytree_level, root_level, root_handlers = pytree_log.level, root.level, list(root.handlers)
    pytree_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # ExecuTorch 1.5 reads its resources with importlib's legacy API and flags its Python runtime as experimental
            warnings.filterwarnings("ignore", message=r"(read_text|open_text|read_binary) is deprecated", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="This API is experimental")
            yield
    finally:
        pytree_log.setLevel(pytree_level)
        root.setLevel(root_level)
        for handler in [h for h in root.handlers if h not in root_handlers]:
            root.removeHandler(handler)


@contextlib.contextmanager
def _native_stderr_held_back() -> Iterator[None]:
    """Hold back what native code writes to file descriptor 2 (XNNPACK's CPU probe prints five
    "[cpuinfo_utils.cpp] ..." lines when the first program loads); it is written out if the
    block raises, so that a failure keeps its diagnostics."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable descriptor 2: nothing to hold back
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _float_outside(modules: Sequence[str]) -> Any:
    """A PT2E quantizer that marks every operation outside ``modules`` (by the graph's module
    stack) as already annotated, so that the quantizers composed after it leave it float32."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

    class FloatOutside(Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for node in model.graph.nodes:
                scopes = {name for name, _ in (node.meta.get("nn_module_stack") or {}).values()}
                if node.op == "call_function" and not scopes & set(modules):
                    node.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            pass

    return FloatOutside()


def _fix_observed_ranges(observed: torch.fx.GraphModule, sites: Sequence[dict[str, Any]]) -> None:
    """Replace the PT2E observers of the tensors named by ``sites`` (a module's input: what its conv /
    linear node reads; a module's output: what its last node writes) by min-max observers holding
    each site's int8 range, so that the program uses it."""
    from torchao.quantization.pt2e import MinMaxObserver

    from backbones.quantization import activation_range

    if not sites:
        return
    wanted = {(site["module"], site["tensor"]): site for site in sites}
    found = set()

    def module_of(node: torch.fx.Node) -> str | None:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        return stack[-1][0] if stack else None

    for node in observed.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("activation_post_process"):
            continue
        keys = [(module_of(user), "input") for user in node.users  # what a conv / linear node reads (not its weights)
                if user.op == "call_function" and ("conv" in str(user.target) or "linear" in str(user.target)) and user.args[0] is node]
        source = node.args[0] if node.args else None
        if isinstance(source, torch.fx.Node) and source.op == "call_function":
            keys += [(name, "output") for name, _ in (source.meta.get("nn_module_stack") or {}).values()]
        site = next((wanted[key] for key in keys if key in wanted), None)
        if site is None:
            continue
        old = getattr(observed, node.target)
        fixed = MinMaxObserver(dtype=old.dtype, qscheme=old.qscheme, quant_min=old.quant_min, quant_max=old.quant_max)
        fixed(torch.tensor(activation_range(site["scale"], site["zero_point"])))
        setattr(observed, node.target, fixed)
        found.add((site["module"], site["tensor"]))
    missing = sorted(set(wanted) - found)
    if missing:
        raise ValueError(f"activation quantization for {missing[:3]}{' ...' if len(missing) > 3 else ''}: no such tensor is "
                         "quantized in the ExecuTorch program")


def _import_executorch() -> Any:
    try:
        from executorch import exir
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import ComposableQuantizer
    except ImportError as error:
        raise ImportError(
            f"ExecuTorch export needs the executorch package ({error}): pip install -e \".[executorch]\""
        ) from error
    return exir, XnnpackPartitioner, XNNPACKQuantizer, get_symmetric_quantization_config, ComposableQuantizer, prepare_pt2e, convert_pt2e


# Upper bounds of an ExecuTorch program's dynamic dimensions: the runtime plans (allocates) its
# memory for the largest inputs, e.g. ~0.8 GB for a DeepLabV3-S0 program at 4 x 3 x 2048 x 2048.
EXECUTORCH_MAX_BATCH = 4
EXECUTORCH_MAX_IMAGE_SIDE = 2048


def _dynamic_shapes(dynamic_image_size: bool, max_batch: int, max_image_side: int) -> tuple[dict[int, Any]]:
    dims = {0: torch.export.Dim("batch", min=1, max=max_batch)}
    if dynamic_image_size:
        dims.update({2: torch.export.Dim("height", min=32, max=max_image_side), 3: torch.export.Dim("width", min=32, max=max_image_side)})
    return (dims,)


def to_executorch(
    model: nn.Module,
    example_inputs: torch.Tensor,
    dynamic_image_size: bool = False,
    calibration: Iterable[torch.Tensor] | None = None,
    max_batch: int = EXECUTORCH_MAX_BATCH,
    max_image_side: int = EXECUTORCH_MAX_IMAGE_SIDE,
    modules: Sequence[str] | None = None,
    activation_quantization: Sequence[dict[str, Any]] | None = None,
) -> bytes:
    """An ExecuTorch program of ``model`` (already fused) lowered to XNNPACK; returns the ``.pte`` bytes.

    Batches of 1 to ``max_batch`` images (and with ``dynamic_image_size`` any height and width
    from 32 to ``max_image_side``; else the example's size): the runtime plans its memory for the
    largest. With ``calibration`` (batches of real inputs), the program is INT8: PT2E quantization
    with the XNNPACK quantizer (symmetric int8 weights per output channel, int8 activations
    observed on the calibration batches), then lowered; without it, float32. With ``modules``
    (names of submodules of ``model``) only those are quantized, like ``quantize_onnx``'s;
    ``activation_quantization`` (as ``quantize_onnx``'s) fixes those tensors' ranges instead of the
    observer's.
    """
    shapes = _dynamic_shapes(dynamic_image_size, max_batch, max_image_side)
    with _contained_logging():
        return _lower(model, example_inputs, calibration, shapes, max_batch, modules, activation_quantization or [])


def _lower(
    model: nn.Module,
    example_inputs: torch.Tensor,
    calibration: Iterable[torch.Tensor] | None,
    shapes: Any,
    max_batch: int,
    modules: Sequence[str] | None,
    activation_quantization: Sequence[dict[str, Any]],
) -> bytes:
    exir, XnnpackPartitioner, XNNPACKQuantizer, symmetric_config, ComposableQuantizer, prepare_pt2e, convert_pt2e = _import_executorch()
    model = model.eval()
    # two images: torch.export specializes a dimension whose example size is 1
    example = (example_inputs[:1].expand(2, *example_inputs.shape[1:]).float().contiguous(),)
    with torch.no_grad():
        program = torch.export.export(model, example, dynamic_shapes=shapes)
        if calibration is not None:
            quantizer = XNNPACKQuantizer().set_global(symmetric_config(is_per_channel=True))
            if modules:  # XNNPACKQuantizer.set_module_name leaves most conv + ReLU pairs unquantized: mark the rest instead
                quantizer = ComposableQuantizer([_float_outside(modules), quantizer])
            observed = prepare_pt2e(program.module(), quantizer)
            for batch in _inputs(calibration):
                for part in batch.split(max_batch):  # the exported graph checks its input shapes
                    observed(part)
            _fix_observed_ranges(observed, activation_quantization)
            program = torch.export.export(convert_pt2e(observed), example, dynamic_shapes=shapes)
        # the edge-dialect verifier is skipped (a third of the lowering time): callers run the program and compare numerically
        config = exir.EdgeCompileConfig(_check_ir_validity=False)
        lowered = exir.to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()], compile_config=config)
        return bytes(lowered.to_executorch().buffer)


class OnnxRuntimeNetwork(nn.Module):
    """Runs an ONNX file (its bytes) in onnxruntime on CPU: tensors in, tensors out (a tuple for
    several outputs). ``threads`` sets onnxruntime's intra-op threads (0: its default);
    ``spin_wait=False`` stops its threads spinning after a run (for sessions timed interleaved with
    others, whose idle spinning threads would take the cores)."""

    def __init__(self, onnx_bytes: bytes, threads: int = 0, spin_wait: bool = True) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        if not spin_wait:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run_array(self, images: Any) -> list[Any]:
        """The session's outputs (numpy arrays) for one float32 numpy array: no tensor conversion, for timing."""
        return self.session.run(None, {self.input_name: images})

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.run_array(images.detach().cpu().float().contiguous().numpy())
        tensors = tuple(torch.from_numpy(output) for output in outputs)
        return tensors[0] if len(tensors) == 1 else tensors


class ExecuTorchNetwork(nn.Module):
    """Runs an ExecuTorch program (its bytes) in ExecuTorch's Python runtime on CPU: tensors in,
    tensors out (a tuple for several outputs); a batch larger than the program's ``max_batch``
    runs in slices of that size."""

    def __init__(self, program: bytes, max_batch: int = EXECUTORCH_MAX_BATCH) -> None:
        super().__init__()
        self.max_batch = max_batch
        with _contained_logging():
            from executorch.runtime import Runtime

            self.program = Runtime.get().load_program(program)
            try:
                with _native_stderr_held_back():
                    self.method = self.program.load_method("forward")
            except RuntimeError as error:
                raise RuntimeError(
                    f"ExecuTorch could not load the program ({error}; XNNPACK's reason is printed above). XNNPACK refuses "
                    "an INT8 program when the quantization scales of a layer's input, weights and output are too far apart "
                    "for its integer kernels. Seen with the checkpoint of a network's first training steps (BatchNorm "
                    "statistics that do not match its weights yet) and once with a detector fine-tuned from ImageNet "
                    "weights whose retraining exported fine; without --executorch the other files export as usual"
                ) from error

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        images = images.detach().cpu().float()
        slices = [[t.clone() for t in self.method.execute([part.contiguous()])] for part in images.split(self.max_batch)]
        tensors = tuple(torch.cat(outputs) for outputs in zip(*slices))
        return tensors[0] if len(tensors) == 1 else tensors
