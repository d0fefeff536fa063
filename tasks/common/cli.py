"""The command line shared by all tasks: LightningCLI with an ``export`` subcommand."""

from __future__ import annotations

import os
from typing import Any

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
) -> dict[str, Any]:
    """Export ``model``'s network in inference form, checked on real validation inputs.

    The task module provides ``export_network()``, ``export_inputs(datamodule)`` (a batch of
    preprocessed validation images) and ``export_metadata(datamodule)`` (what a deployment needs:
    classes, image size, normalization, ...), and may set ``export_dynamic_image_size`` to give
    the ONNX file dynamic height and width, and ``export_agreement(fused, trained)`` to measure
    how often the fused model's predictions match (default: equal argmax over dim 1).
    """
    inputs = model.export_inputs(datamodule)
    result = export_network(
        model.export_network(), inputs, output, model.export_metadata(datamodule), onnx, torchscript, tolerance,
        dynamic_image_size=getattr(model, "export_dynamic_image_size", False),
        agreement=getattr(model, "export_agreement", None),
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
    ) -> dict[str, Any]:
        """Reparameterize a trained model, check it, and write its inference-form weights and ONNX.

        Args:
            model: the task module (its weights come from ``ckpt_path`` when given).
            datamodule: supplies the real validation images the fused model is checked on.
            ckpt_path: a training checkpoint; with the EMA callback its ``state_dict`` holds the
                averaged weights, which are the ones exported.
            output: directory for ``model_fused.pt``, ``model.json``, ``model.onnx``.
            onnx: also write and check ``model.onnx`` (onnxruntime).
            torchscript: also write a TorchScript trace.
            tolerance: largest accepted relative error, fused vs unfused and ONNX vs PyTorch.
        """
        if ckpt_path is not None:
            if not os.path.isfile(ckpt_path):
                raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} does not exist")
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if "state_dict" not in checkpoint:
                raise ValueError(f"{ckpt_path!r} is not a Lightning checkpoint (no 'state_dict' key)")
            model.load_state_dict(checkpoint["state_dict"])
        return export_task(model, datamodule, output, onnx, torchscript, tolerance)


class TaskCLI(LightningCLI):
    """LightningCLI with the ``export`` subcommand and this repo's defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", TaskTrainer)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}
