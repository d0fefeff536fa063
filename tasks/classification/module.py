"""Image classification with MobileOne as a LightningModule."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from backbones.atomic import atomic_write_file
from tasks.common.backbones import DEFAULT_BACKBONE, backbone_name, classifier_network, get_backbone
from tasks.common.callbacks import run_output
from tasks.common.module import BaseTask
from tasks.common.optim import warmup_cosine
from tasks.common.sampling import gather_on_rank_zero

log = logging.getLogger(__name__)


class ImageClassificationTask(BaseTask):
    """MobileOne classifier trained with the paper's recipe (SGD, cosine, label smoothing).

    Args:
        backbone: the network (``tasks.common.backbones``): ``"mobileone_s0"`` .. ``"mobileone_s4"``
            (MobileOne, the only one reparameterized at export), or a baseline trained with the
            same recipe: ``"mobilenet_v2"``, ``"mobilenet_v3_large"``, ``"efficientnet_b0"``
            (torchvision's whole network) or ``"timm:<name>"``.
        num_classes: classifier outputs (linked from the data by the CLI).
        class_names: names of the classes (linked from the data; kept in checkpoints for ``predict``).
        weights: initial weights: ``"apple"`` (Apple's ImageNet release of the MobileOne variant, train form,
            downloaded once into the weights cache), ``"hf-hub:<repo>"``, or a file: Apple's ``mobileone_sX_unfused.pth.tar`` (train form) or
            ``mobileone_sX.pth.tar`` (inference form: the train form is built from it, computing its
            function, and calibrated on training images at the start of ``fit``), or one of
            our ``.ckpt`` files. A classifier of another class count is re-initialized. For a
            torchvision baseline a torchvision state dict (or our ``.ckpt``), for timm a local file.
        backbone_kwargs: extra ``mobileone()`` arguments (``num_conv_branches``, ``use_se``, ...; MobileOne only).
        lr: learning rate for ``reference_batch_size`` images per step, scaled linearly with the
            global batch (per-device batch x devices x nodes x gradient accumulation).
        reference_batch_size: the batch size ``lr`` is given for.
        momentum / nesterov: SGD settings.
        weight_decay: initial weight decay of conv / linear weights (BN and biases get none);
            ``CosineWeightDecay`` anneals it.
        warmup_epochs: linear learning-rate warm-up before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of the peak.
        label_smoothing: cross-entropy label smoothing.
        channels_last: train and evaluate in channels-last memory format (CUDA devices only).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        num_classes: int = 1000,
        class_names: list[str] | None = None,
        weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        lr: float = 0.1,
        reference_batch_size: int = 256,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: nn.Module = classifier_network(backbone, num_classes, weights, backbone_kwargs)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        # top-5 accuracy only where it can be below 1 (more than 5 classes)
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None
        self.val_loss = MeanMetric()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.uses_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_loss(self, batch: Any) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", (logits.argmax(1) == labels).float().mean())
        return loss

    def evaluate(self, batch: Any, prefix: str) -> torch.Tensor:
        """Update the metrics with one batch; returns its logits."""
        images, labels = batch
        logits = self(images)
        self.val_loss(F.cross_entropy(logits, labels, reduction="none"))  # a mean over samples, also across processes
        self.log(f"{prefix}/loss", self.val_loss)
        self.val_acc1(logits, labels)
        self.log(f"{prefix}/acc1", self.val_acc1, prog_bar=True)
        if self.val_acc5 is not None:
            self.val_acc5(logits, labels)
            self.log(f"{prefix}/acc5", self.val_acc5)
        return logits

    def predict_batch(self, batch: Any) -> list[dict[str, Any]]:
        images, infos = batch
        probabilities = self(images).float().softmax(dim=1)
        top = probabilities.topk(min(5, probabilities.shape[1]), dim=1)
        names = self.hparams.class_names or [str(i) for i in range(probabilities.shape[1])]
        return [
            {"path": path, "top5": [(i, names[i], float(p)) for i, p in zip(indices.tolist(), scores.tolist())]}
            for path, indices, scores in zip((info["path"] for info in infos), top.indices, top.values)
        ]

    def lr_schedule(self, total_steps: int, steps_per_epoch: float) -> Callable[[int], float]:
        return warmup_cosine(total_steps, int(self.hparams.warmup_epochs * steps_per_epoch), self.hparams.min_lr_ratio)

    # export (see tasks.common.export.export_task)
    validation_metric = "val/acc1"
    weights_hparam = "weights"
    export_check_images = 32

    def export_metadata(self, datamodule: pl.LightningDataModule | None) -> dict[str, Any]:
        data = datamodule.hparams if datamodule is not None else {}
        backbone = self.hparams.backbone
        return {
            "task": "classification",
            "architecture": backbone_name(backbone),
            "build": get_backbone(backbone).deployment_build(backbone, self.hparams.num_classes, self.hparams.backbone_kwargs or {}),
            "num_classes": self.hparams.num_classes,
            "class_names": self.hparams.class_names,
            "image_size": data.get("eval_image_size"),
            "resize": data.get("eval_resize"),
            **self.input_normalization(datamodule),
            "input": "images: float32 (N, 3, H, W), RGB scaled to [0, 1], then (x - mean) / std",
            "output": "logits: float32 (N, num_classes)",
        }


class TopKPredictionWriter(pl.callbacks.BasePredictionWriter):
    """Write ``predict``'s top-5 classes and probabilities per image to a CSV file (atomically).

    Args:
        output: the CSV file (``path``, then ``index1, class1, probability1`` ... per image: the class
            index, its name from the model's ``class_names``, its probability), replaced if it exists;
            default ``predictions.csv`` under ``trainer.default_root_dir``.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any) -> None:
        rows = gather_on_rank_zero([row for batch in predictions for row in batch])
        if rows is None:
            return
        k = max((len(row["top5"]) for row in rows), default=0)
        header = ["path"] + [f"{field}{i}" for i in range(1, k + 1) for field in ("index", "class", "probability")]

        def write(path: Path) -> None:
            with open(path, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(header)
                for row in rows:
                    writer.writerow([row["path"]] + [v for index, name, p in row["top5"] for v in (index, name, f"{p:.6f}")])

        output = run_output(trainer, self.output, "predictions.csv")
        atomic_write_file(output, write)
        log.info("wrote top-%d predictions for %d images to %s", k, len(rows), output)
