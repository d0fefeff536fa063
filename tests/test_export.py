"""The fused model traces and exports to ONNX, and the exported graphs compute the same function.

CoreML conversion is tested in test_coreml.py (needs the optional coremltools)."""

import os
from pathlib import Path

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
    from backbones import to_torchscript

    traced = to_torchscript(fused_s0, torch.randn(2, 3, 64, 64))
    path = tmp_path / "s0.pt"
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(3, 3, 96, 80)  # another batch and image size than traced
    with torch.no_grad():
        assert relative_error(loaded(x), fused_s0(x)) < 1e-6
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::batch_norm" not in kinds and "aten::_convolution" in kinds
    frozen = to_torchscript(fused_s0, torch.randn(1, 3, 64, 64), freeze=True)
    with torch.no_grad():
        assert relative_error(frozen(x), fused_s0(x)) < 1e-5


@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python integer")
def test_torchscript_refuses_unfused_models_and_baked_batch_sizes():
    from backbones import fuse_for_deployment, to_torchscript

    unfused = randomize_batchnorm(mobileone("s0", num_classes=10)).eval()
    with pytest.raises(ValueError, match=r"aten::batch_norm.*fuse_for_deployment"):
        to_torchscript(unfused, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"output shapes"):
        to_torchscript(_BakedBatch(), torch.randn(1, 3, 8, 8))
    # a head's conv-BN pair is folded by fuse_for_deployment, then the trace passes
    head = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    randomize_batchnorm(head)
    with pytest.raises(ValueError, match=r"batch_norm"):
        to_torchscript(head.eval(), torch.randn(1, 3, 8, 8))
    to_torchscript(fuse_for_deployment(head), torch.randn(1, 3, 8, 8), dynamic_image_size=True)


class _BakedBatch(torch.nn.Module):
    """Turns the batch size into a Python int: a trace at batch 1 keeps 1 forever."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)).reshape(int(x.shape[0]), -1)


def test_fuse_and_export_checks_torchscript_before_writing(tmp_path, monkeypatch):
    """The trace's error is measured and recorded; above the tolerance nothing is written."""
    import json

    import tasks.common.export as export

    network = randomize_batchnorm(mobileone("s0", num_classes=4))
    x = torch.randn(2, 3, 32, 32)
    result = export.fuse_and_export(network, x, tmp_path / "ok", {"task": "test"}, export.ExportOptions(onnx=False, torchscript=True))
    assert result["torchscript_vs_pytorch_relative_error"] < 1e-6
    metadata = json.loads((tmp_path / "ok" / "model.json").read_text())
    assert metadata["torchscript_vs_pytorch_relative_error"] == result["torchscript_vs_pytorch_relative_error"]
    assert metadata["files"] == ["model_fused.pt", "model_fused.torchscript.pt"]
    loaded = torch.jit.load(str(tmp_path / "ok" / "model_fused.torchscript.pt"))
    with torch.no_grad():
        assert relative_error(loaded(torch.cat([x, x])), reparameterize_model(network)(torch.cat([x, x]))) < 1e-5

    class Perturbed(torch.nn.Module):
        def __init__(self, traced):
            super().__init__()
            self.traced = traced

        def forward(self, x):
            return self.traced(x) * 1.001

    import tasks.common.export.fuse as fuse

    real = fuse.to_torchscript
    monkeypatch.setattr(fuse, "to_torchscript", lambda *a, **k: Perturbed(real(*a, **k)))
    with pytest.raises(RuntimeError, match=r"TorchScript.*1\.000e-03 > 1e-05.*nothing was written"):
        export.fuse_and_export(network, x, tmp_path / "bad", {}, export.ExportOptions(onnx=True, torchscript=True))
    assert not (tmp_path / "bad").exists()


def test_export_reports_agreement_with_its_count_and_none_on_too_few(tmp_path):
    import tasks.common.export as export

    network = randomize_batchnorm(mobileone("s0", num_classes=4))
    x = torch.randn(12, 3, 32, 32)
    result = export.fuse_and_export(network, x, tmp_path / "images", {}, export.ExportOptions(onnx=False))
    assert result["fused_vs_unfused_agreement"] == 1.0 and result["fused_vs_unfused_agreement_count"] == 12
    few = export.fuse_and_export(network, x[:3], tmp_path / "few", {}, export.ExportOptions(onnx=False))
    assert few["fused_vs_unfused_agreement"] is None and few["fused_vs_unfused_agreement_count"] == 3
    half = export.fuse_and_export(network, x, tmp_path / "half", {}, export.ExportOptions(onnx=False),
                                  export.ExportContext(agreement=lambda fused, trained: (6, 12)))
    assert half["fused_vs_unfused_agreement"] == 0.5


def test_export_cli_writes_torchscript(tmp_path):
    """``export --torchscript true`` through the classification CLI (untrained weights: no checkpoint)."""
    import json

    from tasks.classification.__main__ import main
    from tasks.classification.data import make_demo_dataset

    root = make_demo_dataset(tmp_path / "shapes", train_per_class=2, val_per_class=2, size=40)
    out = tmp_path / "exported"
    config = str(Path(__file__).parent / "configs" / "classification.yaml")
    main(["export", "--config", config, "--data.root", str(root), "--trainer.default_root_dir", str(tmp_path),
          "--output", str(out), "--onnx", "false", "--torchscript", "true"])
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model_fused.pt", "model_fused.torchscript.pt"]
    assert json.loads((out / "model.json").read_text())["torchscript_vs_pytorch_relative_error"] < 1e-5


def test_coreml_needs_the_extra_and_a_fixed_size(monkeypatch, tmp_path):
    """Without coremltools: an ImportError that says what to install; a network that takes any
    image size needs ``coreml_image_size``. Both before anything is written."""
    import sys

    from backbones import fuse_for_deployment, to_coreml
    from tasks.common.export import ExportContext, ExportOptions, fuse_and_export

    network = randomize_batchnorm(mobileone("s0", num_classes=4))
    monkeypatch.setitem(sys.modules, "coremltools", None)  # makes ``import coremltools`` fail
    with pytest.raises(ImportError, match=r'pip install -e "\.\[coreml\]"'):
        to_coreml(fuse_for_deployment(network), torch.randn(1, 3, 32, 32))
    with pytest.raises(ImportError, match=r"coreml"):
        fuse_and_export(network, torch.randn(2, 3, 32, 32), tmp_path / "a", {}, ExportOptions(onnx=False, coreml=True))
    with pytest.raises(ValueError, match=r"coreml_image_size"):
        fuse_and_export(network, torch.randn(2, 3, 32, 32), tmp_path / "b", {}, ExportOptions(onnx=False, coreml=True),
                        ExportContext(dynamic_image_size=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


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


def test_export_on_fit_end_passes_any_export_option_and_names_unknown_ones(monkeypatch):
    from types import SimpleNamespace

    from tasks.common import callbacks

    with pytest.raises(ValueError, match=r"unknown export option\(s\) \['int9'\]; expected some of \[.*'int8'"):
        callbacks.ExportOnFitEnd(options={"int9": True})
    calls = []
    monkeypatch.setattr(callbacks, "export_task", lambda module, datamodule, output, **options: calls.append((output, options)))
    callback = callbacks.ExportOnFitEnd("out", torchscript=True, options={"int8": True, "calibration_images": 16})
    trainer = SimpleNamespace(is_global_zero=True, interrupted=False, datamodule=None, default_root_dir="runs/a")
    callback.on_fit_end(trainer, None)
    assert calls == [("out", {"int8": True, "calibration_images": 16, "onnx": True, "torchscript": True, "tolerance": 1e-5})]
    callbacks.ExportOnFitEnd().on_fit_end(trainer, None)
    assert calls[-1][0] == os.path.join("runs/a", "exported"), "by default under the run's output folder"
