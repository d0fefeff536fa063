"""Object detection with SSDLite-MobileOne as a LightningModule."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import batched_nms, box_iou
from torchvision.utils import draw_bounding_boxes

from backbones.atomic import atomic_write_file
from tasks.common.backbones import DEFAULT_BACKBONE, backbone_name
from tasks.common.callbacks import run_output
from tasks.common.module import BaseTask
from tasks.common.optim import warmup_cosine
from tasks.common.sampling import gather_on_rank_zero
from tasks.detection.coco_eval import LOGGED_NAMES, CocoEvaluation, coco_table
from tasks.detection.ssdlite import SSDRawOutputs, ssdlite

log = logging.getLogger(__name__)

SIZE_KEYS = ("map_small", "map_medium", "map_large")
TOPK_CANDIDATES = 1000  # best anchors per class kept before NMS (torchvision's SSD default)


class ObjectDetectionTask(BaseTask):
    """SSDLite-MobileOne trained with SSD's loss, evaluated with COCO mAP.

    Args:
        backbone: ``"mobileone_s0"`` .. ``"mobileone_s4"`` (MobileOne, the only one reparameterized)
            or a baseline under the same neck and head: ``"mobilenet_v2"``, ``"mobilenet_v3_large"``,
            ``"efficientnet_b0"`` (torchvision), ``"timm:<name>"`` (see ``tasks.common.backbones``).
        num_classes: categories + background (linked from the data).
        class_names: category names (linked from the data).
        category_ids: label 1..K -> the dataset's category id (linked from the data; COCO's ids have
            gaps): the ids the prediction writer and the export's metadata give. ``None``: the labels.
        image_size: network input size (320 in the paper's setup).
        backbone_weights: ImageNet checkpoint for the backbone (Apple's train- or inference-form file: a fused one is
            rebuilt in train form and calibrated at the start of ``fit``; or one of our classification
            ``.ckpt``; a torchvision state dict for torchvision backbones).
        backbone_kwargs: extra ``mobileone()`` arguments (MobileOne only).
        lr: learning rate for ``reference_batch_size`` images per step (linear scaling).
        momentum / weight_decay: SGD settings (BN and biases get no weight decay).
        warmup_iters: linear warm-up steps before the cosine decay.
        score_thresh / nms_thresh / detections_per_img: post-processing (mmdetection's SSDLite values).
        channels_last: channels-last memory format (CUDA devices only).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        num_classes: int = 81,
        class_names: list[str] | None = None,
        category_ids: dict[int, int] | None = None,
        image_size: int = 320,
        backbone_weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        lr: float = 0.015,
        reference_batch_size: int = 192,
        momentum: float = 0.9,
        weight_decay: float = 4e-5,
        warmup_iters: int = 500,
        score_thresh: float = 0.02,
        nms_thresh: float = 0.45,
        detections_per_img: int = 200,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ssdlite(
            backbone, num_classes, image_size, backbone_weights, backbone_kwargs,
            score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
        )
        self.val_map = CocoEvaluation()

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> Any:
        return self.model(images, targets)

    def training_loss(self, batch: Any) -> torch.Tensor:
        images, targets = batch
        losses = self.model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        loss = losses["bbox_regression"] + losses["classification"]
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log("train/loss_box", losses["bbox_regression"], batch_size=len(images))
        self.log("train/loss_cls", losses["classification"], batch_size=len(images))
        return loss

    def evaluate(self, batch: Any, prefix: str) -> None:
        images, targets = batch
        detections = self.model(images)
        self.val_map.update(
            [{k: d[k] for k in ("boxes", "scores", "labels")} for d in detections],
            [{k: t[k] for k in ("boxes", "labels", "iscrowd", "area", "image_id")} for t in targets],
        )

    def log_epoch_metrics(self, prefix: str) -> None:
        results = self.val_map.compute()
        self.val_map.reset()
        for key, name in LOGGED_NAMES.items():
            if key in SIZE_KEYS and float(results[key]) < 0:  # COCO's -1: no ground truth of that size, not a value
                continue
            self.log(f"{prefix}/{name}", float(results[key]), prog_bar=key == "map")
        if self.final_evaluation:
            log.info("%s", coco_table(results))

    def predict_batch(self, batch: Any) -> list[dict[str, Any]]:
        images, infos = batch
        detections = self.model(images)
        return [{"path": info["path"], **{k: v.cpu() for k, v in d.items()}} for info, d in zip(infos, detections)]

    def lr_schedule(self, total_steps: int, steps_per_epoch: float) -> Callable[[int], float]:
        return warmup_cosine(total_steps, min(self.hparams.warmup_iters, total_steps // 2))

    # export (see tasks.common.export.export_task)
    validation_metric = "val/mAP"
    weights_hparam = "backbone_weights"
    # INT8 covers SSDRawOutputs' backbone, neck and head; box decoding and softmax stay float32
    # (in XNNPACK, an INT8 decoding fails to compile; in onnxruntime it costs box precision)
    export_quantized_modules = ("features", "head")

    def export_network(self) -> nn.Module:
        return SSDRawOutputs(self.model, self.hparams.image_size)

    def input_normalization(self, datamodule: pl.LightningDataModule | None) -> dict[str, list[float]]:
        """The SSD model normalizes its inputs itself (its ``transform``, as torchvision's
        detectors do): the data module gives RGB in [0, 1]; the exported network takes them normalized."""
        return {"mean": list(self.model.transform.image_mean), "std": list(self.model.transform.image_std)}

    def export_form(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Images (RGB in [0, 1], any sizes) as the exported network takes them."""
        return export_form(images, self.hparams.image_size, **self.input_normalization(None))

    def export_images(self, batch: Any) -> torch.Tensor:
        return self.export_form(batch[0])

    def deployed_model(self, network: nn.Module) -> nn.Module:
        """``network`` (``SSDRawOutputs``' inputs and outputs) followed by the post-processing
        ``export_metadata`` documents, taking and returning what the trained SSD does."""
        return DeployedDetector(network, self._postprocess, self.hparams.image_size, self.hparams.score_thresh,
                                **self.input_normalization(None))

    def export_agreement(self, fused: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int]:
        """(detections of the trained model that the fused model reproduces, detections of the
        trained model): after NMS at the detector's own ``score_thresh``, as ``predict`` keeps them;
        reproduced = same class, box IoU >= 0.99, score within 1e-3."""
        return self._matched_detections(fused, reference, min_iou=0.99, max_score_difference=1e-3)

    def deployment_agreement(self, deployed: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int]:
        """(detections of the float32 model that a deployed file finds too, detections of the
        float32 model): both post-processed as ``predict`` keeps them; found = a detection of the
        same class at box IoU >= 0.5 (COCO's match criterion). Scores are not compared: an INT8
        file moves them by more than ``export_agreement``'s 1e-3."""
        return self._matched_detections(deployed, reference, min_iou=0.5, max_score_difference=None)

    def _matched_detections(
        self,
        candidate: tuple[torch.Tensor, torch.Tensor],
        reference: tuple[torch.Tensor, torch.Tensor],
        min_iou: float,
        max_score_difference: float | None,
    ) -> tuple[int, int]:
        """(reference detections with a candidate detection of the same class at box IoU >=
        ``min_iou`` and, unless None, a score within ``max_score_difference``; reference
        detections), both raw outputs post-processed at ``score_thresh``."""
        matched = total = 0
        for (boxes_c, scores_c), (boxes_r, scores_r) in zip(zip(*candidate), zip(*reference)):
            kept_c = self._postprocess(boxes_c, scores_c, self.hparams.score_thresh)
            kept_r = self._postprocess(boxes_r, scores_r, self.hparams.score_thresh)
            total += len(kept_r[0])
            if len(kept_r[0]) and len(kept_c[0]):
                same = (kept_r[2][:, None] == kept_c[2][None]) & (box_iou(kept_r[0], kept_c[0]) >= min_iou)
                if max_score_difference is not None:
                    same &= (kept_r[1][:, None] - kept_c[1][None]).abs() <= max_score_difference
                matched += int(same.any(1).sum())
        return matched, total

    def _postprocess(self, boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
        """torchvision's SSD post-processing of one image's decoded ``boxes`` and ``scores``: boxes
        clipped to the input; per class c >= 1 the anchors scoring above ``threshold``, at most
        the 1000 best; NMS per class; the ``detections_per_img`` best. Returns boxes, scores, labels."""
        boxes = boxes.clamp(min=0, max=self.hparams.image_size)
        kept_boxes, kept_scores, kept_labels = [], [], []
        for label in range(1, scores.shape[1]):
            score = scores[:, label]
            above = (score > threshold).nonzero(as_tuple=True)[0]
            score, best = score[above].topk(min(TOPK_CANDIDATES, len(above)))
            kept_boxes.append(boxes[above[best]])
            kept_scores.append(score)
            kept_labels.append(torch.full_like(best, label))
        box, score, label = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_labels)
        keep = batched_nms(box, score, label, self.hparams.nms_thresh)[: self.hparams.detections_per_img]
        return box[keep], score[keep], label[keep]

    def export_metadata(self, datamodule: pl.LightningDataModule | None) -> dict[str, Any]:
        return {
            "task": "detection",
            "architecture": f"ssdlite_{backbone_name(self.hparams.backbone)}",
            "image_size": self.hparams.image_size,
            "class_names": ["background", *(self.hparams.class_names or [])],
            "category_ids": {str(k): v for k, v in self.hparams.category_ids.items()} if self.hparams.category_ids else None,
            **self.input_normalization(datamodule),
            "input": f"images: float32 (N, 3, {self.hparams.image_size}, {self.hparams.image_size}): the image resized "
            "(bilinear) to that size, RGB scaled to [0, 1], then (x - mean) / std",
            "outputs": "boxes: (N, A, 4) x1 y1 x2 y2 in input pixels; scores: (N, A, num_classes) softmax, column 0 = background",
            "post_processing": f"clip boxes to [0, {self.hparams.image_size}]; per class c >= 1: keep anchors with score > "
            f"{self.hparams.score_thresh}, at most the {TOPK_CANDIDATES} best per class, NMS per class at IoU {self.hparams.nms_thresh}; "
            f"keep the {self.hparams.detections_per_img} best over all classes; "
            "scale boxes by (original width / image_size, original height / image_size)",
        }


def export_form(images: list[torch.Tensor], image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Images (RGB in [0, 1], any sizes) as the exported network takes them: each resized
    (bilinear) to ``image_size`` squared and normalized with ``mean`` / ``std``, as one batch."""
    mean_, std_ = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    resized = [F.interpolate(i[None].cpu(), size=(image_size, image_size), mode="bilinear", align_corners=False)[0] for i in images]
    return torch.stack([(i - mean_) / std_ for i in resized])


class DeployedDetector(nn.Module):
    """A detector as a deployment runs the exported network: ``export_form`` -> ``network``
    (decoded boxes and class probabilities, as ``SSDRawOutputs``) -> ``postprocess(boxes, scores,
    score_thresh)`` (score threshold, per-class NMS, top-k) -> boxes scaled back to each original
    image. Answers like torchvision's SSD in evaluation (a list of ``boxes`` / ``scores`` / ``labels`` dicts)."""

    def __init__(
        self,
        network: nn.Module,
        postprocess: Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, ...]],
        image_size: int,
        score_thresh: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.network, self.postprocess = network, postprocess
        self.image_size, self.score_thresh, self.mean, self.std = image_size, score_thresh, mean, std

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> list[dict[str, torch.Tensor]]:
        boxes, scores = self.network(export_form(images, self.image_size, self.mean, self.std))
        detections = []
        for image, image_boxes, image_scores in zip(images, boxes, scores):
            kept_boxes, kept_scores, labels = self.postprocess(image_boxes, image_scores, self.score_thresh)
            height, width = image.shape[-2:]
            scale = torch.tensor([width, height, width, height], dtype=kept_boxes.dtype) / self.image_size
            detections.append({"boxes": kept_boxes * scale, "scores": kept_scores, "labels": labels})
        return detections


class DetectionWriter(pl.callbacks.BasePredictionWriter):
    """Write ``predict``'s detections as a COCO-style results json (``detections.json``: file name,
    category id, bbox x y w h, score) and images with the boxes drawn (``<stem>.jpg``) into ``output``.

    Args:
        output: folder for ``detections.json`` and the drawings (created; files of the same name
            replaced); default ``predictions/`` under ``trainer.default_root_dir``.
        draw_threshold: smallest score of a box drawn (``detections.json`` holds every detection kept).
    """

    def __init__(self, output: str | None = None, draw_threshold: float = 0.3) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.draw_threshold = draw_threshold

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        folder = Path(run_output(trainer, self.output, "predictions"))
        category_ids = pl_module.hparams.category_ids or {}
        names = ["background", *(pl_module.hparams.class_names or [])]
        results = []
        for item in (row for batch in predictions for row in batch):
            for box, score, label in zip(item["boxes"].tolist(), item["scores"].tolist(), item["labels"].tolist()):
                results.append({
                    "file_name": Path(item["path"]).name,
                    "category_id": category_ids.get(label, label),
                    "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)],
                    "score": round(score, 5),
                })
            keep = item["scores"] >= self.draw_threshold
            with Image.open(item["path"]) as original:
                image = torch.from_numpy(np.asarray(original.convert("RGB")).copy()).permute(2, 0, 1)
            labels = [f"{names[int(label)]} {s:.2f}" for label, s in zip(item["labels"][keep], item["scores"][keep])]
            drawn = draw_bounding_boxes(image, item["boxes"][keep], labels=labels, colors="red", width=2)
            buffer = io.BytesIO()
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=92)
            stem = Path(item["path"]).stem
            atomic_write_file(folder / f"{stem}.jpg", lambda p, data=buffer.getvalue(): Path(p).write_bytes(data))
        # each process drew its own images; the results of all go into one file, written by rank 0
        gathered = gather_on_rank_zero([(sum(len(batch) for batch in predictions), results)])
        if gathered is None:
            return
        results = [result for _, part in gathered for result in part]
        content = json.dumps(results)
        atomic_write_file(folder / "detections.json", lambda p: Path(p).write_text(content))
        log.info("wrote %d detections for %d images to %s (detections.json, drawn <stem>.jpg)",
                 len(results), sum(images for images, _ in gathered), folder)
