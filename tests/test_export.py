"""The fused model traces and exports to ONNX, and the exported graphs compute the same function."""

import onnx
import onnxruntime
import pytest
import torch

from backbones import mobileone, reparameterize_model
from backbones.testing import randomize_batchnorm, relative_error


@pytest.fixture(scope="module")
def fused_s0():
    torch.manual_seed(0)
    return reparameterize_model(randomize_batchnorm(mobileone("s0", num_classes=10)))


def test_torchscript_trace_of_fused_model(fused_s0, tmp_path):
    traced = torch.jit.trace(fused_s0, torch.randn(1, 3, 64, 64))
    path = tmp_path / "s0.pt"
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(3, 3, 96, 80)
    with torch.no_grad():
        assert relative_error(loaded(x), fused_s0(x)) < 1e-6
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::batch_norm" not in kinds and "aten::_convolution" in kinds


def test_onnx_export_of_fused_model_runs_in_onnxruntime(fused_s0, tmp_path):
    path = tmp_path / "s0.onnx"
    torch.onnx.export(
        fused_s0,
        (torch.randn(1, 3, 64, 64),),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    graph = onnx.load(str(path)).graph
    op_types = {node.op_type for node in graph.node}
    assert "BatchNormalization" not in op_types and "Identity" not in op_types
    assert sum(node.op_type == "Conv" for node in graph.node) == 1 + 2 * (2 + 8 + 10 + 1), "one conv per layer"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 64, 64)  # a different batch size than at export
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        assert relative_error(torch.from_numpy(logits), fused_s0(x)) < 1e-5


def test_onnx_export_of_dilated_feature_extractor(tmp_path):
    model = reparameterize_model(randomize_batchnorm(mobileone("s1", out_indices=(3, 4), output_stride=8)))
    path = tmp_path / "features.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=True, opset_version=18)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 64, 64)
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert [o.shape for o in outputs] == [tuple(e.shape) for e in expected] == [(1, 512, 8, 8), (1, 1280, 8, 8)]
    for actual, reference in zip(outputs, expected):
        assert relative_error(torch.from_numpy(actual), reference) < 1e-5


def test_onnx_graph_check_refuses_unfused_models():
    """``to_onnx_bytes`` rejects graphs with BatchNorm / Dropout / Identity; ``fuse_for_deployment``
    removes them all, a conv-BN head included, and keeps the function."""
    from backbones import fuse_for_deployment, to_onnx_bytes

    head = torch.nn.Sequential(torch.nn.Conv2d(1024, 8, 1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Dropout(0.1))
    model = randomize_batchnorm(torch.nn.Sequential(mobileone("s0", out_indices=(4,)), _First(), head)).eval()
    with pytest.raises(ValueError, match=r"BatchNormalization"):
        to_onnx_bytes(model, torch.randn(1, 3, 64, 64))
    fused = fuse_for_deployment(model)
    assert not [m for m in fused.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    content = to_onnx_bytes(fused, torch.randn(1, 3, 64, 64))
    assert not {node.op_type for node in onnx.load_from_string(content).graph.node} & {"BatchNormalization", "Identity", "Dropout"}
    session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), model(x)) < 1e-5


class _First(torch.nn.Module):
    """Take the single feature map out of a feature extractor's list."""

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return features[0]
