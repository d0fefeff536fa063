"""Semantic segmentation with DeepLabV3 on MobileOne as a LightningModule."""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from backbones.atomic import atomic_write_file
from tasks.common.backbones import DEFAULT_BACKBONE, backbone_name
from tasks.common.callbacks import run_output
from tasks.common.module import BaseTask
from tasks.common.optim import parameter_groups, warmup_poly
from tasks.common.sampling import gather_on_rank_zero
from tasks.segmentation.data import voc_palette
from tasks.segmentation.deeplabv3 import DeepLabV3, DeepLabV3Logits, LogitsAsDeepLabV3Outputs

log = logging.getLogger(__name__)


def iou_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Per-class IoU (NaN for classes absent from both targets and predictions), mIoU over the
    classes present, and pixel accuracy, from a (target x prediction) confusion matrix."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
    present = ~iou.isnan()
    miou = iou[present].mean().item() if present.any() else float("nan")
    accuracy = (true_positive.sum() / confusion.sum().clamp(min=1)).item()
    return iou, miou, accuracy


class SemanticSegmentationTask(BaseTask):
    """DeepLabV3-MobileOne trained with cross-entropy (+ auxiliary FCN loss), evaluated by mIoU.

    Args:
        backbone: ``"mobileone_s0"`` .. ``"mobileone_s4"`` (MobileOne, the only one reparameterized)
            or a baseline under the same heads: ``"mobilenet_v2"``, ``"mobilenet_v3_large"``,
            ``"efficientnet_b0"`` (torchvision), ``"timm:<name>"`` (see ``tasks.common.backbones``).
        num_classes / class_names / ignore_index: linked from the data by the CLI.
        output_stride: 8 (ASPP 12/24/36) or 16 (6/12/18).
        aspp_channels: ASPP / head width (256 or 512).
        aux_loss_weight: weight of the auxiliary FCN head's loss on stage 3; 0 removes the head.
        backbone_weights: ImageNet checkpoint for the backbone (Apple's train- or inference-form file: a fused one is
            rebuilt in train form and calibrated at the start of ``fit``; or ours).
        backbone_kwargs: extra ``mobileone()`` arguments (``frozen_stages``, ``norm_eval``, ...; MobileOne only).
        lr: backbone learning rate for ``reference_batch_size`` images per step (linearly scaled
            with the global batch); the heads train at ``head_lr_multiplier`` times it.
        momentum / weight_decay: SGD settings (BN and biases get no weight decay).
        poly_power: the "poly" schedule's power, applied per step after ``warmup_epochs``.
        channels_last: channels-last memory format (CUDA devices only).
    """

    export_dynamic_image_size = True

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        num_classes: int = 21,
        class_names: list[str] | None = None,
        ignore_index: int = 255,
        output_stride: int = 8,
        aspp_channels: int = 256,
        aux_loss_weight: float = 0.4,
        backbone_weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        lr: float = 0.001,
        head_lr_multiplier: float = 10.0,
        reference_batch_size: int = 16,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        warmup_epochs: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = DeepLabV3(
            backbone, num_classes, output_stride, aspp_channels, aux_head=aux_loss_weight > 0,
            backbone_weights=backbone_weights, backbone_kwargs=backbone_kwargs,
        )
        self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.uses_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_loss(self, batch: Any) -> torch.Tensor:
        images, masks = batch
        outputs = self(images)
        loss = F.cross_entropy(outputs["out"], masks, ignore_index=self.hparams.ignore_index)
        if "aux" in outputs:
            aux = F.cross_entropy(outputs["aux"], masks, ignore_index=self.hparams.ignore_index)
            self.log("train/aux_loss", aux)
            loss = loss + self.hparams.aux_loss_weight * aux
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def evaluate(self, batch: Any, prefix: str) -> None:
        images, masks = batch
        logits = self(images)["out"]
        self.confusion.update(logits.argmax(1), masks)

    def log_epoch_metrics(self, prefix: str) -> None:
        iou, miou, accuracy = iou_from_confusion(self.confusion.compute())
        self.confusion.reset()
        self.log(f"{prefix}/mIoU", miou, prog_bar=True)
        self.log(f"{prefix}/pixel_acc", accuracy)
        names = self.hparams.class_names or [str(i) for i in range(len(iou))]
        for name, value in zip(names, iou.tolist()):
            if value == value:  # classes absent from targets and predictions have no IoU
                self.log(f"{prefix}/IoU/{name}", value)
        if self.final_evaluation:
            width = max(len(n) for n in names)
            rows = [f"{'class':<{width}}  IoU"] + [
                f"{name:<{width}}  {'   n/a' if value != value else f'{100 * value:6.2f}'}" for name, value in zip(names, iou.tolist())
            ]
            rows.append(f"{'mIoU':<{width}}  {100 * miou:6.2f}   pixel accuracy {100 * accuracy:.2f}")
            log.info("%s", "\n".join(rows))

    def predict_batch(self, batch: Any) -> list[dict[str, Any]]:
        images, infos = batch
        results = []
        for logits, info in zip(self(images)["out"], infos):
            logits = logits[:, : info["input_size"][0], : info["input_size"][1]]  # without the batch padding
            if tuple(info["input_size"]) != tuple(info["size"]):  # evaluated downscaled (eval_scale): back to the image
                logits = F.interpolate(logits[None], size=tuple(info["size"]), mode="bilinear", align_corners=False)[0]
            results.append({"path": info["path"], "mask": logits.argmax(0).to(torch.uint8).cpu().numpy()})
        return results

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """The backbone at ``lr``, the heads at ``head_lr_multiplier`` times it."""
        heads = nn.ModuleList([m for m in (self.model.head, self.model.aux_head) if m is not None])
        groups = parameter_groups(self.model.backbone, self.hparams.weight_decay)
        return groups + [{**group, "lr": lr * self.hparams.head_lr_multiplier} for group in parameter_groups(heads, self.hparams.weight_decay)]

    def lr_schedule(self, total_steps: int, steps_per_epoch: float) -> Callable[[int], float]:
        return warmup_poly(total_steps, self.hparams.poly_power, int(self.hparams.warmup_epochs * steps_per_epoch))

    # export (see tasks.common.export.export_task)
    validation_metric = "val/mIoU"
    weights_hparam = "backbone_weights"

    def export_network(self) -> nn.Module:
        model = copy.deepcopy(self.model)
        model.aux_head = None
        return DeepLabV3Logits(model)

    export_check_images = 4

    def deployed_model(self, network: nn.Module) -> nn.Module:
        """``network`` (images -> logits) with DeepLabV3's output dict."""
        return LogitsAsDeepLabV3Outputs(network)

    def export_metadata(self, datamodule: pl.LightningDataModule | None) -> dict[str, Any]:
        return {
            "task": "segmentation",
            "architecture": f"deeplabv3_{backbone_name(self.hparams.backbone)}",
            "output_stride": self.hparams.output_stride,
            "num_classes": self.hparams.num_classes,
            "class_names": self.hparams.class_names,
            "ignore_index": self.hparams.ignore_index,
            **self.input_normalization(datamodule),
            "input": "images: float32 (N, 3, H, W), any H and W, RGB scaled to [0, 1], then (x - mean) / std",
            "output": "logits: float32 (N, num_classes, H, W); the label map is argmax over dim 1",
        }


class MaskWriter(pl.callbacks.BasePredictionWriter):
    """Write ``predict``'s label masks as palette PNGs (``<stem>.png``) and colour overlays
    (``<stem>_overlay.jpg``) into ``output``.

    Args:
        output: folder for the masks and overlays (created; files of the same name replaced);
            default ``predictions/`` under ``trainer.default_root_dir``.
        alpha: opacity of the class colours in the overlays.
    """

    def __init__(self, output: str | None = None, alpha: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.alpha = alpha
        self.written = 0
        self.folder: Path | None = None  # set at the start of predict

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.written = 0
        self.folder = Path(run_output(trainer, self.output, "predictions"))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = gather_on_rank_zero([self.written])  # every process writes its own images
        if counts is not None:
            log.info("wrote %d masks (<stem>.png) and overlays (<stem>_overlay.jpg) to %s", sum(counts), self.folder)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        palette = voc_palette()
        colours = np.array(palette, dtype=np.uint8).reshape(256, 3)
        for item in prediction:
            stem = Path(item["path"]).stem
            mask = Image.fromarray(item["mask"], mode="P")
            mask.putpalette(palette)
            with Image.open(item["path"]) as original:
                image = np.asarray(original.convert("RGB"), dtype=np.float32)
            blend = (1 - self.alpha) * image + self.alpha * colours[item["mask"]]
            blend[item["mask"] == 0] = image[item["mask"] == 0]  # background stays as it was
            overlay = Image.fromarray(blend.round().astype(np.uint8))
            for name, picture, kind in ((f"{stem}.png", mask, "PNG"), (f"{stem}_overlay.jpg", overlay, "JPEG")):
                buffer = io.BytesIO()
                picture.save(buffer, format=kind)
                atomic_write_file(self.folder / name, lambda p, data=buffer.getvalue(): Path(p).write_bytes(data))
            self.written += 1
