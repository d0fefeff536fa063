"""``export_task``: a task's checkpoint exported with its declared hooks and its data."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from backbones.runtimes import default_int8_scheme, int8_cpu
from tasks.common.batches import count_images, first_images
from tasks.common.export.checks import since
from tasks.common.export.fuse import fuse_and_export
from tasks.common.export.options import ExportContext, ExportOptions
from tasks.common.export.validation import validation_metrics

log = logging.getLogger(__name__)


def export_task(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    output: str,
    *,
    onnx: bool = True,
    torchscript: bool = False,
    tolerance: float = 1e-5,
    coreml: bool = False,
    coreml_precision: Literal["float16", "float32"] = "float16",
    coreml_image_input: bool = False,
    coreml_image_size: int | tuple[int, int] | None = None,
    int8: bool = False,
    executorch: bool = False,
    calibration_images: int = 256,
    calibration_method: Literal["minmax", "percentile", "entropy"] = "percentile",
    int8_scheme: Literal["s8s8", "u8u8", "reduce_range"] | None = None,
    int8_preparation: bool = True,
    int8_range_search: bool | None = None,
    int8_weight_rounding: Literal["nearest", "output_error"] | None = None,
    validation_batches: int | None = None,
) -> dict[str, Any]:
    """Export ``model``'s network in inference form, checked on real validation inputs; the options
    are the ``export`` subcommand's flags (``TaskTrainer.export`` passes them on).

    ``model`` is a ``tasks.common.module.BaseTask``: every hook called here is declared there, with
    its default and what it means (``export_network``, ``export_batches``, ``export_inputs``,
    ``export_metadata``, ``validating_with``, ``validation_metric``, ``export_dynamic_image_size``,
    ``export_quantized_modules``, ``export_agreement``, ``deployment_agreement``,
    ``int8_simulation``); they become ``fuse_and_export``'s :class:`ExportContext`, the flags
    below its :class:`ExportOptions`.

    Args:
        model: the task module.
        datamodule: supplies the real validation images the fused model is checked on.
        output: the export folder, replaced as a whole.
        onnx: also write and check ``model.onnx`` (onnxruntime).
        torchscript: also write ``model_fused.torchscript.pt``, a trace checked against PyTorch.
        tolerance: largest accepted relative error, fused vs unfused, ONNX and TorchScript vs PyTorch.
        coreml: also write ``model.mlpackage``, a CoreML ML program (needs ``pip install -e ".[coreml]"``;
            batch 1 at the checked images' size; checked for structure only, CoreML runs on macOS).
        coreml_precision: the ML program's compute precision (float16 runs on the Neural Engine).
        coreml_image_input: make the CoreML input an RGB image (pixels 0-255, normalized inside
            the model) instead of a normalized float32 tensor.
        coreml_image_size: the CoreML input's fixed size, ``S`` or ``[H, W]`` (default: the size of
            the checked images; required for segmentation, whose other exports take any size).
        int8: also write ``model.int8.onnx`` (onnxruntime static INT8 quantization, QDQ format,
            per-channel weights) and, with ``executorch``, ``model.int8.pte``; both are
            calibrated on ``calibration_images`` training images of the data config.
        executorch: also write ``model.pte``, an ExecuTorch program for the XNNPACK delegate
            (Android, iOS, Linux; needs ``pip install -e ".[executorch]"``).
        calibration_images: how many training images (augmented as for training) INT8 calibration sees.
        calibration_method: how ``model.int8.onnx``'s activation ranges are set from them:
            ``percentile`` (99.999%, the default: on Apple's S0 and MobileNetV2, prepared, the
            closest to float32; ``benchmarks.int8_methods``), ``minmax`` (the observed range) or
            ``entropy`` (onnxruntime's methods); ``model.int8.pte`` uses the XNNPACK quantizer's histogram observer.
        int8_scheme: ``model.int8.onnx``'s integer types (``backbones.runtimes.INT8_SCHEMES``);
            default: the one onnxruntime computes exactly, without saturation, on this CPU (s8s8
            with VNNI, reduce_range on x86 without VNNI; ``$MOBILEONE_INT8_CPU`` = ``vnni`` /
            ``no-vnni`` exports for the other kind). Recorded in ``model.json`` with the CPU's flags.
        int8_preparation: quantize a copy of the fused network prepared for INT8 (the same
            function; ``backbones.quantization.prepare_for_int8``): MobileOne's activations
            equalized per channel, each quantized layer's bias corrected for its weights' int8
            rounding. Off: the fused network as it is (plain post-training quantization). Neither
            for a network trained in its INT8 arithmetic (the task's ``int8_simulation()``): its
            INT8 file is made in the scheme and with the activation ranges of the training (and
            ``executorch`` is refused for one trained in ``reduce_range``, not XNNPACK's s8s8).
        int8_range_search: with ``int8_preparation``: after calibration, narrow each activation's
            range where that brings the INT8 logits closer to float32's on 64 calibration images
            (``backbones.quantization.prepare_with_searched_ranges``; 3-4 minutes for S0 at 224 px on 2
            cores); both INT8 files get those ranges. Default (None): wherever the INT8 simulation
            covers the network (a MobileOne classifier without squeeze-excitation, every layer
            quantized) with 127-level weights (s8s8 and XNNPACK; not ``reduce_range``, where it
            lowered the logits' error but cost top-1 on Apple's S0); ``model.json`` records it.
            True: required, ``reduce_range`` included (an error where it does not apply); False: the
            calibrated ranges.
        int8_weight_rounding: with ``int8_preparation``, how weights reach their int8 grid:
            ``nearest`` (then each bias corrected for the mean error) or ``output_error`` (GPTQ-style:
            column by column, each rounding error compensated in the columns not yet rounded for the
            layer's output on the calibration images; ``backbones.quantization.round_weights_for_output_error``).
            Default (None): ``output_error`` for ``reduce_range``'s 64-level weights, ``nearest`` for
            127 levels (s8s8, XNNPACK), as measured best on Apple's S0 (``benchmarks/RESULTS.md``).
        validation_batches: with ``int8`` or ``executorch``, every written runtime file and the
            fused model are run through the validation split and their metrics recorded in
            ``model.json``; this limits that to the first batches (default: the whole split).
    """
    inputs = model.export_inputs(datamodule)
    simulation = model.int8_simulation() if int8 else None
    if simulation is not None:
        if int8_scheme is not None and int8_scheme != simulation["scheme"]:
            raise ValueError(f"int8_scheme={int8_scheme!r}: this network was trained for INT8 in {simulation['scheme']!r}, "
                             "the scheme its INT8 file is made in (train again with another --model.int8_scheme for another)")
        int8_scheme = simulation["scheme"]
        if executorch and int8_scheme != "s8s8":
            # Measured (benchmarks.int8_qat, Apple's S0): XNNPACK's int8 of a network trained for the 64-level
            # reduce_range grid lost 15-20 points of top-1, while its onnxruntime file kept float32's accuracy.
            raise ValueError(f"executorch=True with int8: this network was trained for INT8 in {int8_scheme!r} "
                             "(weights on a 64-level grid), XNNPACK quantizes in s8s8 (127 levels) and loses its "
                             "accuracy; export without --executorch, or train with --model.int8_scheme s8s8 for both files")
        if int8_scheme != default_int8_scheme(int8_cpu()):
            log.warning("the INT8 file is made in %s, which onnxruntime does not compute exactly on this CPU (%s): its "
                        "validation here is not what the target CPU computes", int8_scheme, int8_cpu())
    calibration = None
    if int8:
        if calibration_images < 1:
            raise ValueError(f"calibration_images={calibration_images}: INT8 quantization needs at least one calibration image")
        started = time.perf_counter()
        calibration = first_images(model.export_batches(datamodule, "fit"), calibration_images)
        log.info("read %d training images for INT8 calibration (%.1f s)", count_images(calibration), since(started))

    def evaluate(network: nn.Module) -> dict[str, float]:
        return validation_metrics(model, datamodule, network, validation_batches)

    options = ExportOptions(
        onnx=onnx, torchscript=torchscript, tolerance=tolerance, coreml=coreml, coreml_precision=coreml_precision,
        coreml_image_input=coreml_image_input, coreml_image_size=coreml_image_size, int8=int8, executorch=executorch,
        calibration_method=calibration_method, int8_scheme=int8_scheme, int8_preparation=int8_preparation,
        int8_range_search=int8_range_search, int8_weight_rounding=int8_weight_rounding,
    )
    context = ExportContext(
        dynamic_image_size=model.export_dynamic_image_size,
        agreement=model.export_agreement,
        deployment_agreement=model.deployment_agreement,
        quantized_modules=model.export_quantized_modules,
        calibration=calibration,
        int8_activations=simulation["activations"] if simulation is not None else None,
        evaluate=evaluate if int8 or executorch else None,
        metric=model.validation_metric,
    )
    result = fuse_and_export(model.export_network(), inputs, output, model.export_metadata(datamodule), options, context)
    lines = [f"exported to {output}:"]
    lines += [f"  {name}: {path}" for name, path in sorted(result["files"].items())]
    lines += [f"  {key}: {value:.3e}" for key, value in result.items() if key.endswith("relative_error")]
    if result.get("fused_vs_unfused_agreement") is not None:
        lines.append(f"  fused_vs_unfused_agreement: {result['fused_vs_unfused_agreement']:.6f}"
                     f" ({result['fused_vs_unfused_agreement_count']} predictions)")
    for name, record in result.get("deployed", {}).items():
        value = (record.get("validation") or {}).get(model.validation_metric)
        if value is not None:
            lines.append(f"  {name}: {model.validation_metric} {value:.4f}")
    rank_zero_info("\n".join(lines))
    return result
