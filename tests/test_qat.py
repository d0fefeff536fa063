"""Quantization-aware distillation: the INT8 simulation (backbones.quantization.simulate_int8) computes
what the exported INT8 file computes, with the weights the file holds, and the task trains and exports
through its command line."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_fused_start import APPLE_S0, IMAGENET_SAMPLE, imagenet_batch, require_shared
from test_runtimes import settled_s0

from backbones.export import to_onnx_bytes
from backbones.quantization import (
    ActivationQuantizer,
    calibrate_int8_simulation,
    int8_simulation_sites,
    int8_weights,
    prepare_for_int8,
    remove_int8_simulation,
    simulate_int8,
)
from backbones.runtimes import INT8_WEIGHT_LEVELS, OnnxRuntimeNetwork, quantize_onnx
from backbones.testing import relative_error
from tasks.classification.data import make_demo_dataset
from tasks.classification.qat import QuantizationAwareDistillation, main

CONFIG = str(Path(__file__).parent / "configs" / "classification.yaml")
# reduce_range: 7-bit weights, which onnxruntime computes exactly on x86 CPUs with and without VNNI
SCHEME = "reduce_range"


@pytest.fixture(scope="module")
def calibrated():
    """(fused float32 S0, its calibrated INT8 simulation, calibration batches, other images)."""
    torch.manual_seed(0)
    fused = settled_s0(num_classes=10)
    calibration = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    simulated = calibrate_int8_simulation(simulate_int8(fused, INT8_WEIGHT_LEVELS[SCHEME]), calibration)
    return fused, simulated, calibration, torch.randn(16, 3, 64, 64)


def test_the_simulation_removed_is_the_network_post_training_quantization_prepares(calibrated):
    fused, simulated, calibration, images = calibrated
    with torch.no_grad():
        assert relative_error(remove_int8_simulation(simulate_int8(fused))(images), fused(images)) < 1e-6, "uncalibrated: the same weights"
        prepared = prepare_for_int8(fused, calibration, INT8_WEIGHT_LEVELS[SCHEME])
        # float32 rounding in another order (amplified to ~1e-5 by a random network; up to ~1e-4 where it moves a
        # weight across a rounding tie, which depends on the CPU and the thread count), where the preparation
        # itself (bias correction) moves the output by ~0.25
        removed, prepared_output = remove_int8_simulation(simulated)(images), prepared(images)
        assert relative_error(removed, prepared_output) < 1e-3 < 0.1 < relative_error(prepared_output, fused(images))
        assert relative_error(simulated(images), fused(images)) > 1e-3, "calibrated, it rounds"


def test_only_the_float_weights_are_trained(calibrated):
    _, simulated, _, _ = calibrated
    names = {name.rsplit(".", 1)[-1] for name, _ in simulated.named_parameters()}
    assert names == {"weight", "bias"}
    buffers = {name.rsplit(".", 1)[-1] for name, _ in simulated.named_buffers()}
    assert buffers == {"scale", "zero_point", "calibrated", "output_scale", "input_scale"}
    quantizers = [m for m in simulated.modules() if isinstance(m, ActivationQuantizer)]
    assert len(quantizers) == len(int8_simulation_sites(simulated)) == 2 + 2 * (2 + 8 + 10 + 1) + 1 + 1, \
        "the input of the stem and of the 42 layers' convolutions and the classifier, the last block's output, the logits"


def test_the_int8_file_computes_what_the_simulation_computes(calibrated):
    fused, simulated, calibration, images = calibrated
    plain = remove_int8_simulation(simulated)
    sites = int8_simulation_sites(simulated)
    quantized = quantize_onnx(to_onnx_bytes(plain, images[:2]), calibration, "percentile", scheme=SCHEME, activation_quantization=sites)

    graph = onnx.load_from_string(quantized).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # every activation the file quantizes has the simulation's scale and zero point
    activations = {tuple(node.input[1:3]) for node in graph.node if node.op_type == "QuantizeLinear"}
    in_file = sorted((float(initializers[s]), int(initializers[z])) for s, z in activations)
    assert in_file == sorted((site["scale"], site["zero_point"]) for site in sites)  # float32 values, equal exactly
    # the weights the file holds are the simulation's, rounded as it rounds them
    for name, _ in plain.named_modules():
        if name in ("stage1.0.reparam_conv", "stage3.5.reparam_conv", "linear"):
            stored = initializers[f"{name}.weight_quantized"].astype(np.float64)
            step = initializers[f"{name}.weight_scale"].astype(np.float64).reshape((-1,) + (1,) * (stored.ndim - 1))
            expected = int8_weights(simulated.get_submodule(name).equalized_weight().detach(), INT8_WEIGHT_LEVELS[SCHEME])
            # equal but for float32 rounding (1 ulp) of the equalized weights; one int8 step off would be >= 1/64 of a step's code
            np.testing.assert_allclose(stored * step, expected.double().numpy().reshape(stored.shape), rtol=1e-6, atol=1e-9)

    with torch.no_grad():
        simulation, file_output, float32 = simulated(images), OnnxRuntimeNetwork(quantized)(images), fused(images)
    # Equal up to rounding ties, which the kernel's requantization (a float multiplier) breaks otherwise, and
    # which add up over 43 layers: 0.09 of the logits' norm on Apple's S0 (INT8 vs float32: 0.17); here
    # 0.10 (INT8 vs float32: 0.47), and the top class the simulation's on 15 of 16 images (float32's: 10).
    assert relative_error(file_output, simulation) < 0.3 * relative_error(file_output, float32)
    assert (file_output.argmax(1) == simulation.argmax(1)).float().mean() >= 0.8


def test_on_apples_s0_the_int8_file_follows_the_simulation_far_closer_than_float32():
    """Apple's real S0 and real ImageNet images: what quantization-aware training optimizes is what the
    file computes, which post-training figures (file vs float32) cannot show."""
    require_shared(APPLE_S0)
    require_shared(IMAGENET_SAMPLE)
    from backbones import load_checkpoint, mobileone

    fused = mobileone("s0", inference_mode=True)
    load_checkpoint(fused, str(APPLE_S0))
    fused.eval()
    calibration, images = imagenet_batch(32), imagenet_batch(16, offset=250)
    simulated = calibrate_int8_simulation(simulate_int8(fused, INT8_WEIGHT_LEVELS[SCHEME]), calibration.split(16))
    quantized = quantize_onnx(to_onnx_bytes(remove_int8_simulation(simulated), images[:1]), calibration.split(16), scheme=SCHEME,
                              activation_quantization=int8_simulation_sites(simulated))
    with torch.no_grad():
        simulation, file_output, float32 = simulated(images), OnnxRuntimeNetwork(quantized)(images), fused(images)
    # measured (2-core AVX-512 VNNI Xeon): file vs simulation 0.10, file vs float32 0.21
    assert relative_error(file_output, simulation) < 0.6 * relative_error(file_output, float32)
    assert torch.equal(file_output.argmax(1), simulation.argmax(1)) or (file_output.argmax(1) == simulation.argmax(1)).sum() >= 15


def test_unlabelled_training_images_are_read_at_any_depth_without_labels(tmp_path):
    from tasks.classification.data import ImageFolderDataModule

    data = make_demo_dataset(tmp_path / "shapes", train_per_class=2, val_per_class=1, size=16)
    (data / "train" / "circle" / "nested").mkdir()
    (data / "train" / "square" / "00000.jpg").rename(data / "train" / "circle" / "nested" / "moved.jpg")
    (tmp_path / "classes.txt").write_text("\n".join(sorted(p.name for p in (data / "val").iterdir())) + "\n")
    module = ImageFolderDataModule(str(data), classes=str(tmp_path / "classes.txt"), unlabelled_train=True, num_workers=0)
    module.setup("fit")
    samples = module.train_dataset.samples
    assert len(samples) == 10 and {label for _, label in samples} == {-1}, "every image of the 5 folders, no label"
    assert any(path.name == "moved.jpg" for path, _ in samples)
    with pytest.raises(ValueError, match="unlabelled_train: .* the classes need a list"):
        ImageFolderDataModule(str(data), unlabelled_train=True)


def test_distillation_needs_the_float32_weights():
    with pytest.raises(ValueError, match="--model.weights"):
        QuantizationAwareDistillation(num_classes=5)


@pytest.fixture(scope="module")
def weights_and_data(tmp_path_factory):
    """A float32 S0 file (random weights, BatchNorm statistics of random images) and a tiny ImageFolder:
    ``classes.txt``, labelled ``val/`` and unlabelled ``train/`` images."""
    folder = tmp_path_factory.mktemp("qat")
    data = make_demo_dataset(folder / "shapes", train_per_class=4, val_per_class=3, size=40)
    (folder / "classes.txt").write_text("\n".join(sorted(p.name for p in (data / "val").iterdir())) + "\n")
    torch.manual_seed(0)
    network = settled_s0(num_classes=5)  # fused: loaded as Apple's inference-form files are
    torch.save(network.state_dict(), folder / "s0.pth")
    return folder / "s0.pth", data, folder / "classes.txt"


def run(subcommand, weights_and_data, workdir, *extra):
    weights, data, classes = weights_and_data
    return main([subcommand, "--config", CONFIG, "--data.root", str(data), f"--data.classes={classes}", "--data.unlabelled_train=true",
                 f"--model.weights={weights}", f"--model.int8_scheme={SCHEME}", "--model.lr=0.01", "--model.calibration_batches=2",
                 "--trainer.default_root_dir", str(workdir), *extra])


def test_distillation_fits_and_exports_the_int8_file_it_trained_for(weights_and_data, tmp_path):
    run("fit", weights_and_data, tmp_path)
    (checkpoint,) = tmp_path.glob("**/last.ckpt")
    task = QuantizationAwareDistillation.load_from_checkpoint(checkpoint, map_location="cpu")
    assert task.calibrated and not any(p.requires_grad for p in task.teacher.parameters())
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(key.startswith("_teacher") for key in state), "the teacher is rebuilt from the weights, not checkpointed"
    assert not torch.equal(state["model.linear.weight"], task.teacher.linear.weight), "the student was trained"

    out = tmp_path / "exported"
    run("export", weights_and_data, tmp_path, f"--ckpt_path={checkpoint}", f"--output={out}", "--int8=true", "--calibration_images=8")
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["int8_calibration"]["onnx_scheme"] == SCHEME
    assert metadata["int8_calibration"]["onnx_method"].startswith("the ranges of quantization-aware training")
    validation = metadata["deployed"]["model.int8.onnx"]["validation"]
    assert {"val/acc1", "val/agreement", "val/float32_acc1"} <= set(validation)
    graph = onnx.load(out / "model.int8.onnx").graph
    initializers = {i.name: float(numpy_helper.to_array(i)) for i in graph.initializer if i.name.endswith("_scale") and i.dims == []}
    scales = sorted(initializers[node.input[1]] for node in graph.node if node.op_type == "QuantizeLinear")
    assert scales == sorted(site["scale"] for site in int8_simulation_sites(task.model))

    with pytest.raises(ValueError, match="trained for INT8 in 'reduce_range'"):
        run("export", weights_and_data, tmp_path, f"--ckpt_path={checkpoint}", f"--output={tmp_path / 'other'}", "--int8=true",
            "--int8_scheme=s8s8")
    with pytest.raises(ValueError, match="XNNPACK quantizes in s8s8"):  # its ExecuTorch INT8 program lost 15-20 points
        run("export", weights_and_data, tmp_path, f"--ckpt_path={checkpoint}", f"--output={tmp_path / 'other'}", "--int8=true",
            "--executorch=true")
    assert not (tmp_path / "other").exists(), "refused before anything was written"
