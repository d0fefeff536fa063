"""SSDLite on MobileOne (or a baseline backbone), on torchvision's SSD building blocks, set up as mmdetection's SSDLite."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops.misc import Conv2dNormActivation

from tasks.common.backbones import DEFAULT_BACKBONE, feature_extractor
from tasks.common.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ANCHOR_MAX_SIZES",
    "ANCHOR_MIN_SIZES",
    "ANCHOR_STRIDES",
    "SSDLiteFeatures",
    "SSDRawOutputs",
    "anchor_generator",
    "ssdlite",
]

# mmdetection's SSDLite anchors at 320x320 (its ssdlite_mobilenetv2 config; docs/detection.md): per level stride, min and max size; ratios {2, 3}.
ANCHOR_STRIDES = (16, 32, 64, 107, 160, 320)
ANCHOR_MIN_SIZES = (48, 100, 150, 202, 253, 304)
ANCHOR_MAX_SIZES = (100, 150, 202, 253, 304, 320)
EXTRA_WIDTHS = (512, 256, 256, 128)
# mmdetection's SSDLite BatchNorm: eps 1e-3, momentum 0.03 (PyTorch convention)
SSDLITE_NORM = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.03)


def _extra_level(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 to half width, 3x3 depthwise stride 2, 1x1 to full width; BN + ReLU6 after each."""
    middle = out_channels // 2
    block = partial(Conv2dNormActivation, norm_layer=SSDLITE_NORM, activation_layer=nn.ReLU6)
    return nn.Sequential(
        block(in_channels, middle, kernel_size=1),
        block(middle, middle, kernel_size=3, stride=2, groups=middle),
        block(middle, out_channels, kernel_size=1),
    )


def _normal_init(module: nn.Module, std: float = 0.03) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class SSDLiteFeatures(nn.Module):
    """Six feature levels for SSDLite: the backbone's C4 (stride 16; MobileOne's stage 3) and C5
    (stride 32; stage 4), then four depthwise-separable extra levels of widths 512, 256, 256, 128.

    ``backbone`` returns ``[C4, C5]`` and has a timm-style ``feature_info``
    (``tasks.common.backbones.feature_extractor``)."""

    def __init__(self, backbone: nn.Module, extra_widths: Sequence[int] = EXTRA_WIDTHS) -> None:
        super().__init__()
        self.backbone = backbone
        channels = backbone.feature_info.channels()[-1]
        extras = []
        for width in extra_widths:
            extras.append(_extra_level(channels, width))
            channels = width
        self.extra = nn.ModuleList(extras)
        _normal_init(self.extra)
        self.out_channels = [*backbone.feature_info.channels(), *extra_widths]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = list(self.backbone(images))
        for extra in self.extra:
            levels.append(extra(levels[-1]))
        return OrderedDict((str(i), level) for i, level in enumerate(levels))


def anchor_generator(image_size: int = 320) -> DefaultBoxGenerator:
    """torchvision's default-box generator set to mmdetection's SSDLite anchors (6 per location).

    At 320 px the anchors are exactly mmdetection's (strides 16..320, min sizes 48..304). At other
    sizes the sizes scale with the image and the centres spread evenly over each feature map.
    """
    scales = [s / 320 for s in (*ANCHOR_MIN_SIZES, ANCHOR_MAX_SIZES[-1])]
    steps = list(ANCHOR_STRIDES) if image_size == 320 else None
    return DefaultBoxGenerator([[2, 3]] * len(ANCHOR_STRIDES), scales=scales, steps=steps, clip=False)


def ssdlite(
    backbone: str = DEFAULT_BACKBONE,
    num_classes: int = 81,
    image_size: int = 320,
    backbone_weights: str | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    score_thresh: float = 0.02,
    nms_thresh: float = 0.45,
    detections_per_img: int = 200,
    topk_candidates: int = 1000,
    iou_thresh: float = 0.5,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> SSD:
    """SSDLite on ``backbone`` (MobileOne by default) as a torchvision ``SSD`` (``num_classes``
    includes background at index 0).

    ``backbone`` is a name of ``tasks.common.backbones``: ``"mobileone_s0"`` .. ``"mobileone_s4"``, or a
    baseline network (``mobilenet_v2``, ...) under the same neck, head, anchors and loss.

    torchvision's SSD supplies IoU-``iou_thresh`` matching (plus each ground truth's best anchor),
    box coding with weights (10, 10, 5, 5) = stds (0.1, 0.1, 0.2, 0.2), smooth-L1 + cross-entropy
    with 3:1 hard negative mining, resizing to ``image_size`` and normalization, and per-class NMS
    post-processing; the head is torchvision's depthwise-separable ``SSDLiteHead`` (ReLU6).
    """
    features = SSDLiteFeatures(feature_extractor(backbone, 32, backbone_weights, backbone_kwargs))
    anchors = anchor_generator(image_size)
    head = SSDLiteHead(features.out_channels, anchors.num_anchors_per_location(), num_classes, SSDLITE_NORM)
    _normal_init(head)
    return SSD(
        features,
        anchors,
        (image_size, image_size),
        num_classes,
        image_mean=list(image_mean),
        image_std=list(image_std),
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=topk_candidates,
        iou_thresh=iou_thresh,
    )


class SSDRawOutputs(nn.Module):
    """The deployable network: a normalized ``image_size`` x ``image_size`` batch -> decoded boxes
    (N, A, 4; x1 y1 x2 y2 in input pixels) and class probabilities (N, A, num_classes; softmax,
    column 0 = background). Post-processing (score threshold, per-class NMS, top-k, rescaling to
    the original image) is left to the deployment, as docs/detection.md documents."""

    def __init__(self, model: SSD, image_size: int) -> None:
        super().__init__()
        self.features = model.backbone
        self.head = model.head
        self.weights = model.box_coder.weights
        self.clip = model.box_coder.bbox_xform_clip
        with torch.no_grad():
            dummy = torch.zeros(1, 3, image_size, image_size)
            levels = list(self.features.eval()(dummy).values())
            anchors = model.anchor_generator(ImageList(dummy, [(image_size, image_size)]), levels)[0]
        self.register_buffer("anchors", anchors)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.head(list(self.features(images).values()))
        regression, logits = head["bbox_regression"], head["cls_logits"]
        wx, wy, ww, wh = self.weights
        widths = self.anchors[:, 2] - self.anchors[:, 0]
        heights = self.anchors[:, 3] - self.anchors[:, 1]
        centre_x = self.anchors[:, 0] + 0.5 * widths
        centre_y = self.anchors[:, 1] + 0.5 * heights
        x = regression[..., 0] / wx * widths + centre_x
        y = regression[..., 1] / wy * heights + centre_y
        w = torch.exp((regression[..., 2] / ww).clamp(max=self.clip)) * widths
        h = torch.exp((regression[..., 3] / wh).clamp(max=self.clip)) * heights
        boxes = torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], dim=-1)
        return boxes, logits.softmax(dim=-1)
