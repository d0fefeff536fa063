"""On a CUDA device: exact fusion, half precision, channels-last training of every task, the
benchmarks' CUDA paths. Run with ``python -m pytest -m gpu`` on a GPU machine (not in CI)."""

import copy
from pathlib import Path

import pytest
import torch

from backbones import mobileone, reparameterize_model
from backbones.testing import randomize_batchnorm, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CONFIGS = Path(__file__).parent / "configs"


@pytest.fixture
def exact_fp32():
    """Without TF32: cuDNN would otherwise round conv inputs to 10-bit mantissas (~1e-3 errors)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("variant", ["s0", "s1", "s2", "s3", "s4"])
@pytest.mark.parametrize("output_stride", [32, 8])
def test_fusion_on_cuda_is_exact(variant, output_stride, exact_fp32):
    model = mobileone(variant, output_stride=output_stride, out_indices=(1, 2, 3, 4) if output_stride != 32 else None)
    randomize_batchnorm(model)
    model = model.cuda().eval()
    fused = reparameterize_model(model)
    assert next(fused.parameters()).is_cuda, "the fused copy stays on the model's device"
    x = torch.randn(2, 3, 128, 128, device="cuda")
    with torch.no_grad():
        expected, actual = model(x), fused(x)
    pairs = zip(actual, expected) if isinstance(actual, (list, tuple)) else [(actual, expected)]
    for a, e in pairs:
        assert relative_error(a, e) < 3e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_model_in_half_precision_is_no_worse_than_the_train_form(dtype):
    """Half precision loses accuracy in any network; fusing must not add to it (nor overflow,
    e.g. through large folded BN scales). BN statistics are calibrated on random data so that
    activations have a trained network's scale (an uncalibrated random net overflows fp16 in
    either form)."""
    torch.manual_seed(0)
    model = mobileone("s0").cuda()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(8, 3, 224, 224, device="cuda"))
    fused = reparameterize_model(model.eval())
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        reference = fused(x)
        errors = {}
        for name, network in (("fused", fused), ("unfused", model)):
            half = copy.deepcopy(network).to(dtype=dtype, memory_format=torch.channels_last)
            output = half(x.to(dtype).contiguous(memory_format=torch.channels_last))
            assert torch.isfinite(output).all(), f"{name} overflows in {dtype}"
            errors[name] = relative_error(output.float(), reference)
    assert errors["fused"] <= 1.5 * errors["unfused"], errors


def _fit(main, config: str, workdir: Path, *extra: str) -> None:
    main(["fit", "--config", str(CONFIGS / config), "--trainer.default_root_dir", str(workdir), "--trainer.accelerator=gpu",
          "--trainer.precision=bf16-mixed", "--model.channels_last=true", "--trainer.fast_dev_run=2", *extra])


def test_classification_trains_channels_last_bf16_on_cuda(tmp_path):
    from tasks.classification.__main__ import main
    from tasks.classification.data import make_demo_dataset

    root = make_demo_dataset(tmp_path / "shapes", train_per_class=4, val_per_class=2, size=40)
    _fit(main, "classification.yaml", tmp_path, f"--data.root={root}")


def test_segmentation_trains_channels_last_bf16_on_cuda(tmp_path):
    from tasks.segmentation.__main__ import main
    from tasks.segmentation.data import make_demo_voc

    root = make_demo_voc(tmp_path / "VOCdevkit", train_images=4, val_images=2, size=64)
    _fit(main, "segmentation.yaml", tmp_path, f"--data.root={root}")


def test_detection_trains_channels_last_bf16_on_cuda(tmp_path):
    from tasks.detection.__main__ import main
    from tasks.detection.data import make_demo_coco

    root = make_demo_coco(tmp_path / "coco", train_images=4, val_images=4, size=96)
    _fit(main, "detection.yaml", tmp_path, f"--data.root={root}")


def test_export_of_a_cuda_model_is_checked_on_cpu(tmp_path):
    from tasks.common.export import fuse_and_export

    model = mobileone("s0", num_classes=5)
    randomize_batchnorm(model)
    report = fuse_and_export(model.cuda(), torch.randn(2, 3, 64, 64, device="cuda"), tmp_path, {"variant": "s0"})
    assert report["fused_vs_unfused_relative_error"] < 1e-5
    assert report["onnx_vs_pytorch_relative_error"] < 1e-5
    assert next(model.parameters()).is_cuda, "exporting does not move the caller's model"


def test_latency_and_train_throughput_run_on_cuda():
    from benchmarks.latency import measure as latency
    from benchmarks.train_throughput import measure as train_throughput

    rows = latency(["s0"], ["eager", "eager-fp16", "eager-bf16"], batch_sizes=[1, 8], rounds=3, warmup=2, device="cuda", peers=False)
    assert {r["backend"] for r in rows} == {"eager fp32", "eager fp16 channels_last", "eager bf16 channels_last"}
    assert all(r["median_ms"] > 0 and r["device"] == "cuda" for r in rows)
    rows = train_throughput(["s0"], batch_sizes=[8], precisions=["fp32", "bf16"], steps=2, warmup=1, device="cuda", peers=False)
    assert len(rows) == 2 and all(r["images_per_s"] > 0 for r in rows)
