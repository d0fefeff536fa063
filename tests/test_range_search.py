"""Activation ranges searched for the logits' error (backbones.quantization.search_activation_ranges):
the search keeps only what lowers the error it measures, the INT8 files take its ranges, and the export
searches them by default where the INT8 simulation covers the network (``--int8_range_search``)."""

import json

import pytest
import torch
from deployment import needs_executorch
from test_fused_start import APPLE_S0, IMAGENET_SAMPLE, imagenet_batch, require_shared
from test_runtimes import settled_s0

from backbones.quantization import (
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    ActivationQuantizer,
    calibrate_int8_simulation,
    int8_simulation_sites,
    prepare_with_searched_ranges,
    remove_int8_simulation,
    search_activation_ranges,
    simulate_int8,
)
from backbones.runtimes import ExecuTorchNetwork, to_executorch
from backbones.testing import relative_error
from tasks.common.export import ExportContext, ExportOptions, fuse_and_export

WIDENED = "stage2.3.reparam_conv"  # the layer whose input range the tests stretch 4x before the search


def _range(quantizer: ActivationQuantizer) -> tuple[float, float]:
    scale, zero_point = float(quantizer.scale), float(quantizer.zero_point)
    return (ACTIVATION_QMIN - zero_point) * scale, (ACTIVATION_QMAX - zero_point) * scale


@pytest.fixture(scope="module")
def network_and_images():
    torch.manual_seed(0)
    return settled_s0(num_classes=10), [torch.randn(8, 3, 64, 64) for _ in range(3)], torch.randn(16, 3, 64, 64)


def _calibrated(fused, calibration):
    simulated = calibrate_int8_simulation(simulate_int8(fused), calibration)
    low, high = _range(simulated.get_submodule(WIDENED).input_quantizer)
    simulated.get_submodule(WIDENED).input_quantizer.set_range(4 * low, 4 * high)
    return simulated


def test_the_search_keeps_only_what_lowers_the_logits_error(network_and_images):
    fused, calibration, images = network_and_images
    simulated = _calibrated(fused, calibration)
    before = {(site["module"], site["tensor"]): site for site in int8_simulation_sites(simulated)}
    ranges = {key: _range(simulated.get_submodule(key[0]).get_submodule(f"{key[1]}_quantizer")) for key in before}
    with torch.no_grad():
        reference = fused(images)
        error_before = relative_error(simulated(images), reference)
        rows = search_activation_ranges(simulated, fused, images)
        error_after = relative_error(simulated(images), reference)

    assert sorted((row["module"], row["tensor"]) for row in rows) == sorted(before), "every quantized tensor, once"
    # the error each row reports is the one of the network as chosen so far: the last one is the network's
    # (a wrong prefix cached for the later blocks would break this)
    assert rows[-1]["error"] == pytest.approx(error_after, rel=1e-4)
    errors = [row["error"] for row in rows]
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:])) and error_after < error_before
    assert any(row["fraction"] < 1 for row in rows)
    for row in rows:  # a range is scaled by its row's fraction and nothing else
        low, high = _range(simulated.get_submodule(row["module"]).get_submodule(f"{row['tensor']}_quantizer"))
        calibrated_low, calibrated_high = ranges[(row["module"], row["tensor"])]
        assert high == pytest.approx(row["fraction"] * calibrated_high, rel=1e-3, abs=1e-6)
        assert low == pytest.approx(row["fraction"] * calibrated_low, rel=1e-3, abs=1e-3 * high)


def test_on_apples_s0_the_searched_ranges_lower_the_error_on_images_the_search_did_not_see():
    """A random network's INT8 error is spread over every layer (0.57 of its logits here), so that one range
    hardly matters; on Apple's S0 (0.17) the input of stage3.19 does."""
    require_shared(APPLE_S0)
    require_shared(IMAGENET_SAMPLE)
    from backbones import load_checkpoint, mobileone

    fused = mobileone("s0", inference_mode=True)
    load_checkpoint(fused, str(APPLE_S0))
    fused.eval()
    network, sites, report = prepare_with_searched_ranges(fused, imagenet_batch(16).split(8), search_images=8)
    # measured (2-core AVX-512 VNNI Xeon): check error 0.17 calibrated -> 0.15 searched, stage3.19's input at 0.2-0.4 of its range
    assert report["search_images"] == report["check_images"] == 8 and report["kept"]
    assert report["check_error_searched"] < 0.95 * report["check_error_calibrated"]
    assert next(row for row in report["narrowed"] if row["module"] == "stage3.19.reparam_conv")["fraction"] <= 0.5
    assert sites is not None and len(sites) == 2 + 2 * (2 + 8 + 10 + 1) + 1 + 1
    assert isinstance(network, type(fused)) and not any(isinstance(m, ActivationQuantizer) for m in network.modules())


@needs_executorch
def test_the_executorch_program_takes_the_given_ranges(network_and_images):
    fused, calibration, images = network_and_images
    simulated = _calibrated(fused, calibration)
    plain, sites = remove_int8_simulation(simulated), int8_simulation_sites(simulated)
    given = ExecuTorchNetwork(to_executorch(plain, images[:2], calibration=calibration, activation_quantization=sites))
    observed = ExecuTorchNetwork(to_executorch(plain, images[:2], calibration=calibration))
    with torch.no_grad():
        simulation = simulated(images)
    # the stretched range is the simulation's, not what XNNPACK's observer would choose: the program with the
    # given ranges follows the simulation, the one with its own ranges does not
    assert relative_error(given(images), simulation) < 0.5 * relative_error(observed(images), simulation)
    with pytest.raises(ValueError, match="no such tensor"):
        to_executorch(plain, images[:2], calibration=calibration,
                      activation_quantization=[{"module": "stage9.0", "tensor": "input", "scale": 0.1, "zero_point": 0}])


def test_the_export_searches_the_ranges_of_a_mobileone_classifier_by_default(network_and_images, tmp_path):
    fused, calibration, images = network_and_images

    def calibration_report(folder: str, options: ExportOptions, context: ExportContext) -> dict:
        fuse_and_export(fused, images[:4], tmp_path / folder, {}, options, context)
        return json.loads((tmp_path / folder / "model.json").read_text())["int8_calibration"]

    whole = ExportContext(calibration=calibration)
    report = calibration_report("searched", ExportOptions(int8=True, int8_scheme="s8s8"), whole)
    search = report["range_search"]["127"]  # the s8s8 file's search: 127 weight levels
    assert list(report["range_search"]) == ["127"] and search["search_images"] == search["check_images"] == 12
    assert report["weight_rounding"] == {"127": "nearest"}
    # kept only if it lowers the error on the calibration images it did not search on; the file says which ranges it has
    assert search["kept"] == (search["check_error_searched"] < search["check_error_calibrated"])
    assert report["onnx_method"] == ("percentile, then searched for the logits' error" if search["kept"] else "percentile")
    assert calibration_report("off", ExportOptions(int8=True, int8_scheme="s8s8", int8_range_search=False), whole)["onnx_method"] == "percentile"
    # reduce_range's 64-level weights: GPTQ-style rounding and the calibrated ranges by default, the search on request
    report = calibration_report("reduce_range", ExportOptions(int8=True, int8_scheme="reduce_range"), whole)
    assert report["weight_rounding"] == {"64": "output_error"} and "range_search" not in report and report["onnx_method"] == "percentile"
    report = calibration_report("reduce_range_searched", ExportOptions(int8=True, int8_scheme="reduce_range", int8_range_search=True,
                                                                       int8_weight_rounding="nearest"), whole)
    assert report["weight_rounding"] == {"64": "nearest"} and list(report["range_search"]) == ["64"]

    # where the simulation does not cover the network, the calibrated ranges; an error where the search is required
    partial = ExportContext(calibration=calibration, quantized_modules=["stage1", "stage2"])
    report = calibration_report("partial", ExportOptions(int8=True), partial)
    assert report["onnx_method"] == "percentile" and "range_search" not in report
    with pytest.raises(ValueError, match=r"int8_range_search=True: only some modules are quantized \(stage1, stage2\)"):
        fuse_and_export(fused, images[:4], tmp_path / "refused", {}, ExportOptions(int8=True, int8_range_search=True), partial)
    with pytest.raises(ValueError, match="needs int8_preparation=True"):
        fuse_and_export(fused, images[:4], tmp_path / "refused", {}, ExportOptions(int8=True, int8_range_search=True, int8_preparation=False),
                        whole)
    with pytest.raises(ValueError, match="int8_weight_rounding='output_error' rounds the weights of the network prepared"):
        fuse_and_export(fused, images[:4], tmp_path / "refused", {},
                        ExportOptions(int8=True, int8_weight_rounding="output_error", int8_preparation=False), whole)
