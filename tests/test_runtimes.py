"""INT8 ONNX and ExecuTorch files of fused networks (backbones.runtimes), checked numerically."""

import sys

import onnx
import pytest
import torch
from torch import nn

from backbones import mobileone
from backbones.export import fuse_for_deployment, to_onnx_bytes
from backbones.runtimes import ExecuTorchNetwork, OnnxRuntimeNetwork, quantize_onnx, to_executorch
from backbones.testing import relative_error
from deployment import needs_executorch


def settled_s0(size: int = 64, **kwargs) -> nn.Module:
    """A fused MobileOne-S0 whose BatchNorm statistics match its weights (averaged over inputs)."""
    torch.manual_seed(0)
    network = mobileone("s0", **kwargs).train()
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        for _ in range(4):
            network(torch.randn(8, 3, size, size))
    return fuse_for_deployment(network.eval())


def test_int8_onnx_is_quantized_per_channel_and_close_to_float():
    network = settled_s0(num_classes=10)
    calibration = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    float_bytes = to_onnx_bytes(network, calibration[0])
    int8_bytes = quantize_onnx(float_bytes, calibration)
    convs = [n.op_type for n in onnx.load_from_string(float_bytes).graph.node].count("Conv")
    graph = onnx.load_from_string(int8_bytes).graph
    ops = [node.op_type for node in graph.node]
    assert convs > 40 and ops.count("Conv") == convs and ops.count("QuantizeLinear") >= convs
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_weights) == convs, "every conv weight is stored as int8"
    scales = {i.name: i for i in graph.initializer}
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and len(scales.get(n.input[1], onnx.TensorProto()).dims) == 1]
    assert len(per_channel) >= convs, "weights carry one scale per output channel"
    assert len(int8_bytes) < 0.35 * len(float_bytes)


def test_int8_onnx_output_is_close_to_float():
    """On the stem and the first stage (4 layers): deeper random networks amplify INT8's rounding
    (43 layers: relative error 0.3 in onnxruntime and XNNPACK alike); trained networks do not,
    as the task tests check."""
    network = settled_s0(out_indices=(1,))
    calibration = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    int8 = OnnxRuntimeNetwork(quantize_onnx(to_onnx_bytes(network, calibration[0]), calibration))
    images = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        error = relative_error(int8(images), network(images)[0])
    assert error < 0.08  # 0.040 measured


class Decoded(nn.Module):
    """A network with a float post-processing step outside its ``body``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.body(images).clamp(max=4)) * 0.5 + 1.0


def test_int8_onnx_quantizes_only_the_modules_named():
    network = Decoded().eval()
    calibration = [torch.randn(4, 3, 16, 16)]
    content = quantize_onnx(to_onnx_bytes(network, calibration[0], forbidden_ops=frozenset()), calibration, modules=["body"])
    nodes = onnx.load_from_string(content).graph.node
    quantized_inputs = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    exp = next(n for n in nodes if n.op_type == "Exp")
    producers = {o: n for n in nodes for o in n.output}
    assert not (set(exp.input) & quantized_inputs), "the decoding after the body reads float values"
    assert producers[exp.input[0]].op_type in ("Clip", "Min")
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) >= 2


def test_int8_onnx_leaves_float_modules_float():
    network = Decoded().eval()
    calibration = [torch.randn(4, 3, 16, 16)]
    content = quantize_onnx(to_onnx_bytes(network, calibration[0], forbidden_ops=frozenset()), calibration, float_modules=["body.0"])
    graph = onnx.load_from_string(content).graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    first, second = [n for n in graph.node if n.op_type == "Conv"]
    assert initializers[first.input[1]].data_type == onnx.TensorProto.FLOAT, "body.0's weights stay float32"
    assert first.input[0] == "images", "body.0 reads the float32 input directly"
    second_weight = producers[second.input[1]]
    assert second_weight.op_type == "DequantizeLinear" and initializers[second_weight.input[0]].data_type == onnx.TensorProto.INT8


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_int8_onnx_histogram_calibration_takes_batches_of_any_size(method):
    """onnxruntime's histogram collectors stack every observation of a tensor, which fails for a
    last, smaller batch; quantize_onnx feeds them one image at a time."""
    network = settled_s0(out_indices=(1,))
    calibration = [torch.randn(3, 3, 64, 64), torch.randn(1, 3, 64, 64)]
    int8 = OnnxRuntimeNetwork(quantize_onnx(to_onnx_bytes(network, calibration[0]), calibration, method))
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(int8(images), network(images)[0]) < 0.1


def test_int8_onnx_names_an_unknown_calibration_method():
    with pytest.raises(ValueError, match="calibration method 'median'"):
        quantize_onnx(b"", [], method="median")


def test_executorch_import_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[executorch\]"'):
        to_executorch(Decoded().eval(), torch.randn(1, 3, 16, 16))


@needs_executorch
def test_executorch_program_takes_other_sizes_and_batches_beyond_its_bound():
    network = fuse_for_deployment(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval())
    program = ExecuTorchNetwork(to_executorch(network, torch.randn(2, 3, 32, 32), dynamic_image_size=True, max_batch=2), max_batch=2)
    images = torch.randn(5, 3, 48, 40)  # another size, and a batch sliced 2 + 2 + 1
    with torch.no_grad():
        assert relative_error(program(images), network(images)) < 1e-5
