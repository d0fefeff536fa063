"""The command line shared by all tasks: LightningCLI with an ``export`` subcommand."""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from tasks.common.export import export_network

__all__ = ["TaskCLI", "TaskTrainer", "export_task"]


def export_task(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    output: str,
    onnx: bool = True,
    torchscript: bool = False,
    tolerance: float = 1e-5,
    coreml: bool = False,
    coreml_precision: Literal["float16", "float32"] = "float16",
    coreml_image_input: bool = False,
    coreml_image_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Export ``model``'s network in inference form, checked on real validation inputs.

    The task module provides ``export_network()``, ``export_inputs(datamodule)`` (a batch of
    preprocessed validation images) and ``export_metadata(datamodule)`` (what a deployment needs:
    classes, image size, normalization, ...), and may set ``export_dynamic_image_size`` to give
    the ONNX file dynamic height and width, and ``export_agreement(fused, trained)`` to measure
    how often the fused model's predictions match (default: equal argmax over dim 1), and
    ``export_output_names`` (names of the network's outputs in the CoreML program).
    """
    inputs = model.export_inputs(datamodule)
    result = export_network(
        model.export_network(), inputs, output, model.export_metadata(datamodule), onnx, torchscript, tolerance,
        dynamic_image_size=getattr(model, "export_dynamic_image_size", False),
        agreement=getattr(model, "export_agreement", None),
        coreml=coreml,
        coreml_precision=coreml_precision,
        coreml_image_input=coreml_image_input,
        coreml_image_size=coreml_image_size,
        output_names=getattr(model, "export_output_names", None),
    )
    lines = [f"exported to {output}:"]
    lines += [f"  {name}: {path}" for name, path in sorted(result["files"].items())]
    lines += [f"  {key}: {value:.3e}" for key, value in result.items() if key.endswith("relative_error")]
    lines += [f"  {key}: {value:.6f}" for key, value in result.items() if key.endswith("agreement")]
    rank_zero_info("\n".join(lines))
    return result


class TaskTrainer(pl.Trainer):
    """A ``Trainer`` with an ``export`` method, which LightningCLI turns into a subcommand."""

    def export(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output: str = "exported",
        onnx: bool = True,
        torchscript: bool = False,
        tolerance: float = 1e-5,
        coreml: bool = False,
        coreml_precision: Literal["float16", "float32"] = "float16",
        coreml_image_input: bool = False,
        coreml_image_size: int | tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Reparameterize a trained model, check it, and write its inference-form weights and ONNX
        (and, on request, TorchScript and CoreML).

        Args:
            model: the task module (its weights come from ``ckpt_path`` when given).
            datamodule: supplies the real validation images the fused model is checked on.
            ckpt_path: a training checkpoint; with the EMA callback its ``state_dict`` holds the
                averaged weights, which are the ones exported.
            output: directory for ``model_fused.pt``, ``model.json``, ``model.onnx``.
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
        """
        if ckpt_path is not None:
            if not os.path.isfile(ckpt_path):
                raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} does not exist")
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if "state_dict" not in checkpoint:
                raise ValueError(f"{ckpt_path!r} is not a Lightning checkpoint (no 'state_dict' key)")
            model.load_state_dict(checkpoint["state_dict"])
        return export_task(
            model, datamodule, output, onnx, torchscript, tolerance,
            coreml=coreml, coreml_precision=coreml_precision, coreml_image_input=coreml_image_input,
            coreml_image_size=coreml_image_size,
        )


class TaskCLI(LightningCLI):
    """LightningCLI with the ``export`` subcommand and this repo's defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", TaskTrainer)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}
