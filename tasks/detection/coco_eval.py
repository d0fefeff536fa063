"""COCO box evaluation as a torchmetrics ``Metric`` that runs pycocotools' own ``COCOeval``."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from torchmetrics import Metric

__all__ = ["COCO_KEYS", "COCO_STATS", "LOGGED_NAMES", "CocoEvaluation", "coco_table"]

# COCOeval.stats, in order: torchmetrics' MeanAveragePrecision name, the name the task logs (None:
# not logged), and the line COCOeval.summarize() prints for it (kind, IoU, area, maxDets).
COCO_STATS = (
    ("map", "mAP", "Average Precision", "0.50:0.95", "all", 100),
    ("map_50", "mAP_50", "Average Precision", "0.50", "all", 100),
    ("map_75", "mAP_75", "Average Precision", "0.75", "all", 100),
    ("map_small", "mAP_small", "Average Precision", "0.50:0.95", "small", 100),
    ("map_medium", "mAP_medium", "Average Precision", "0.50:0.95", "medium", 100),
    ("map_large", "mAP_large", "Average Precision", "0.50:0.95", "large", 100),
    ("mar_1", None, "Average Recall", "0.50:0.95", "all", 1),
    ("mar_10", None, "Average Recall", "0.50:0.95", "all", 10),
    ("mar_100", None, "Average Recall", "0.50:0.95", "all", 100),
    ("mar_small", None, "Average Recall", "0.50:0.95", "small", 100),
    ("mar_medium", None, "Average Recall", "0.50:0.95", "medium", 100),
    ("mar_large", None, "Average Recall", "0.50:0.95", "large", 100),
)
COCO_KEYS = tuple(key for key, *_ in COCO_STATS)
LOGGED_NAMES = {key: logged for key, logged, *_ in COCO_STATS if logged is not None}


def coco_table(results: dict[str, torch.Tensor]) -> str:
    """The 12 lines of pycocotools' ``COCOeval.summarize()`` for ``CocoEvaluation``'s results."""
    lines = []
    for key, _, kind, iou, area, max_dets in COCO_STATS:
        short = "(AP)" if kind.startswith("Average P") else "(AR)"
        lines.append(f" {kind:<18} {short} @[ IoU={iou:<9} | area={area:>6} | maxDets={max_dets:>3} ] = {float(results[key]):0.3f}")
    return "\n".join(lines)


class CocoEvaluation(Metric):
    """Accumulates detections and ground truth per image (across batches and DDP processes) and
    evaluates them with ``pycocotools.cocoeval.COCOeval``: the numbers are COCO's own.

    ``update(predictions, targets)`` takes torchvision-style dicts: predictions with ``boxes``
    (x1 y1 x2 y2), ``scores``, ``labels``; targets with ``boxes``, ``labels``, ``image_id``, and
    optionally ``iscrowd`` and ``area`` (COCO's annotation area, used for small/medium/large).
    Images repeated by a distributed sampler are counted once.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # rows carry (image id, sample token) so that images survive DDP's concatenation of states
        for name in ("detections", "ground_truth", "images"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self._samples_seen = 0

    def update(self, predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        for prediction, target in zip(predictions, targets):
            token = float(rank * 2**24 + self._samples_seen)
            self._samples_seen += 1
            # every row on the metric's device (the model's, as Lightning moves it): DDP gathers them there
            image = torch.tensor([[float(target["image_id"]), token]], dtype=torch.float64, device=self.device)
            boxes = self._column(target["boxes"], 4)
            count = len(boxes)
            crowd = self._column(target.get("iscrowd", torch.zeros(count)))
            area = self._column(target.get("area", (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
            # ground truth rows: image id, token, x1 y1 x2 y2, label, iscrowd, area
            self.ground_truth.append(torch.cat([image.expand(count, 2), boxes, self._column(target["labels"]), crowd, area], 1))
            found = self._column(prediction["boxes"], 4)
            # detection rows: image id, token, x1 y1 x2 y2, label, score
            self.detections.append(torch.cat([image.expand(len(found), 2), found, self._column(prediction["labels"]),
                                              self._column(prediction["scores"])], 1))
            self.images.append(image)

    def _column(self, values: torch.Tensor, width: int = 1) -> torch.Tensor:
        return values.detach().to(self.device, torch.float64).reshape(-1, width)

    def reset(self) -> None:
        super().reset()
        self._samples_seen = 0

    def compute(self) -> dict[str, torch.Tensor]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        images = _rows(self.images, 2)
        first_token: dict[int, float] = {}
        for image_id, token in images.tolist():  # an image a sampler repeated counts once
            first_token[int(image_id)] = min(token, first_token.get(int(image_id), token))
        annotations, results = [], []
        for image_id, token, x1, y1, x2, y2, label, crowd, area in _rows(self.ground_truth, 9).tolist():
            if first_token[int(image_id)] == token:
                annotations.append({"id": len(annotations) + 1, "image_id": int(image_id), "category_id": int(label),
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": int(crowd)})
        for image_id, token, x1, y1, x2, y2, label, score in _rows(self.detections, 8).tolist():
            if first_token[int(image_id)] == token:
                results.append({"image_id": int(image_id), "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
        if not annotations:
            return {key: torch.tensor(-1.0) for key in COCO_KEYS}
        if not results:
            return {key: torch.tensor(0.0) for key in COCO_KEYS}
        labels = sorted({a["category_id"] for a in annotations} | {r["category_id"] for r in results})
        coco = COCO()
        coco.dataset = {"images": [{"id": i} for i in sorted(first_token)], "annotations": annotations,
                        "categories": [{"id": label} for label in labels]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
            evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return {key: torch.tensor(float(value)) for key, value in zip(COCO_KEYS, evaluation.stats)}


def _rows(state: list[torch.Tensor] | torch.Tensor, width: int) -> torch.Tensor:
    if isinstance(state, list):
        return torch.cat(state).reshape(-1, width) if state else torch.zeros(0, width, dtype=torch.float64)
    return state.reshape(-1, width)
