"""What an export is asked to do (``ExportOptions``: the ``export`` subcommand's flags) and told
about the network and its data (``ExportContext``: the task's declared hooks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from tasks.common.export.checks import Agreement


@dataclass(frozen=True)
class ExportOptions:
    """What an export writes and how strictly it checks it: the ``export`` subcommand's flags that
    are not about data (see :func:`export_task` for each)."""

    onnx: bool = True
    torchscript: bool = False
    tolerance: float = 1e-5
    coreml: bool = False
    coreml_precision: Literal["float16", "float32"] = "float16"
    coreml_image_input: bool = False
    coreml_image_size: int | tuple[int, int] | None = None
    int8: bool = False
    executorch: bool = False
    calibration_method: Literal["minmax", "percentile", "entropy"] = "percentile"
    int8_scheme: Literal["s8s8", "u8u8", "reduce_range"] | None = None
    int8_preparation: bool = True
    int8_range_search: bool | None = None
    int8_weight_rounding: Literal["nearest", "output_error"] | None = None


@dataclass(frozen=True)
class ExportContext:
    """What the exporter is told about the network and its data (``export_task`` fills it from the
    task's declared hooks, ``tasks.common.module.BaseTask``).

    - ``dynamic_image_size``: the ONNX, TorchScript and ExecuTorch files take any height and width;
    - ``agreement(fused_output, trained_output)``: (predictions matched, predictions compared),
      default equal ``argmax`` over dim 1 (per image, or per pixel); ``deployment_agreement`` the
      same for a deployed file against the fused model (default ``agreement``);
    - ``quantized_modules``: INT8 quantizes only these submodules (default: the whole network);
    - ``output_names``: the CoreML program's output names;
    - ``calibration``: batches of real training inputs for INT8 calibration;
    - ``int8_activations``: ``backbones.quantization.int8_simulation_sites`` of a network trained
      in its INT8 arithmetic (its INT8 files are then made from the network as it is);
    - ``evaluate(network)``: the task's validation metrics with ``network`` in place of the trained
      one; ``metric`` the one the log lines quote.
    """

    dynamic_image_size: bool = False
    agreement: Agreement | None = None
    deployment_agreement: Agreement | None = None
    quantized_modules: Sequence[str] | None = None
    output_names: list[str] | None = None
    calibration: list[torch.Tensor] | None = None
    int8_activations: Sequence[dict[str, Any]] | None = None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    metric: str | None = None
