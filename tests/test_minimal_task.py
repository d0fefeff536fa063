"""A fourth task written on the base classes alone, as docs/architecture.md describes: its model,
its data reading and its metric (here: name an image's dominant colour, judged by the negative
log-likelihood, lower is better). It runs fit, validate and export through ``TaskCLI`` like the
three tasks of the repository."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from torchmetrics import MeanMetric

from tasks.common.backbones import classifier_network
from tasks.common.cli import TaskCLI
from tasks.common.data import BaseDataModule
from tasks.common.module import BaseTask


class DominantColourData(BaseDataModule):
    """Random images of random tints; the label is the channel (R, G or B) of the strongest tint."""

    def __init__(self, images: int = 64, image_size: int = 32, batch_size: int = 8, num_workers: int = 0) -> None:
        super().__init__(batch_size, batch_size, num_workers, pin_memory=False, persistent_workers=False)
        self.images, self.image_size = images, image_size

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        tint = torch.rand(self.images, 3, 1, 1, generator=generator)
        images = tint * torch.rand(self.images, 3, self.image_size, self.image_size, generator=generator)
        targets = tint.flatten(1).argmax(1)
        split = self.images * 3 // 4
        self.train_dataset = TensorDataset(images[:split], targets[:split])
        self.val_dataset = TensorDataset(images[split:], targets[split:])


class DominantColourTask(BaseTask):
    """MobileOne (any registered backbone) with three outputs, trained with cross-entropy."""

    validation_metric = "val/nll"
    validation_metric_mode = "min"
    export_check_images = 16  # the export compares the fused and trained networks' top class on 16 images

    def __init__(
        self,
        backbone: str = "mobileone_s0",
        lr: float = 0.05,
        reference_batch_size: int = 8,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = classifier_network(backbone, num_classes=3)
        self.val_nll = MeanMetric()

    def training_loss(self, batch: Any) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.model(images), labels)
        self.log("train/loss", loss)
        return loss

    def evaluate(self, batch: Any, prefix: str) -> None:
        images, labels = batch
        self.val_nll.update(F.cross_entropy(self.model(images), labels), weight=len(labels))
        self.log(f"{prefix}/nll", self.val_nll)

    def lr_schedule(self, total_steps: int, steps_per_epoch: float) -> Callable[[int], float]:
        return lambda step: 1.0 - step / max(1, total_steps)

    def export_metadata(self, datamodule: Any) -> dict[str, Any]:
        return {"task": "dominant colour", "outputs": "(N, 3): logits of red, green, blue"}


class DominantColourCLI(TaskCLI):
    data_to_model = ()  # no class names to link


def cli(*args: str) -> TaskCLI:
    return DominantColourCLI(DominantColourTask, DominantColourData, args=list(args))


def test_a_task_on_the_base_classes_alone_fits_validates_and_exports(tmp_path):
    trainer = [f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.devices=1",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "", "version": "fit"}}
    fit = cli("fit", *trainer, "--trainer.max_epochs=3", f"--trainer.logger={json.dumps(logger)}",
              '--trainer.callbacks=[{"class_path": "tasks.common.callbacks.TaskCheckpoint", "init_args": {"filename": "best"}}]')
    checkpoint = fit.trainer.checkpoint_callback
    with open(tmp_path / "fit" / "metrics.csv") as handle:
        errors = [float(row["val/nll"]) for row in csv.DictReader(handle) if row.get("val/nll")]
    assert len(errors) == 3 and all(np.isfinite(errors)) and min(errors) != max(errors)
    # the checkpoints follow the metric the task declares, lower is better
    assert (checkpoint.monitor, checkpoint.mode) == ("val/nll", "min")
    assert float(checkpoint.best_model_score) == pytest.approx(min(errors))
    best = Path(checkpoint.best_model_path)
    assert best.name == "best.ckpt"

    validate = cli("validate", *trainer, "--trainer.logger=false", f"--ckpt_path={best}")
    assert float(validate.trainer.callback_metrics["val/nll"]) == pytest.approx(min(errors), rel=1e-5)

    out = tmp_path / "exported"
    cli("export", *trainer, f"--ckpt_path={best}", f"--output={out}")
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["task"] == "dominant colour"
    assert metadata["fused_vs_unfused_relative_error"] < 1e-5 and metadata["fused_vs_unfused_agreement"] == 1.0
    task = DominantColourTask.load_from_checkpoint(best).eval()
    images = torch.rand(4, 3, 32, 32)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        assert np.allclose(exported, task.model(images).numpy(), rtol=1e-4, atol=1e-5)


def test_a_task_that_saves_no_optimizer_settings_is_named():
    class Careless(DominantColourTask):
        def __init__(self) -> None:
            BaseTask.__init__(self)
            self.model = torch.nn.Linear(3, 3)

    with pytest.raises(TypeError, match=r"Careless has no hyperparameter lr, reference_batch_size, momentum, weight_decay, "
                                        r"channels_last: a BaseTask takes"):
        Careless().setup("fit")
