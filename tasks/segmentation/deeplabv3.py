"""DeepLabV3 on a dilated MobileOne (or a baseline backbone), built from torchvision's ASPP and FCN head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead

from tasks.common.backbones import DEFAULT_BACKBONE, feature_extractor

__all__ = ["ASPP_RATES", "DeepLabV3", "DeepLabV3Logits"]

# The DeepLabV3 paper's atrous rates for each output stride.
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


class DeepLabV3(nn.Module):
    """DeepLabV3: MobileOne features at output stride 8 or 16 -> ASPP -> 3x3 conv -> classifier.

    Args:
        backbone: a name of ``tasks.common.backbones``: ``"mobileone_s0"`` .. ``"mobileone_s4"``, or a
            baseline (``"mobilenet_v2"``, ...) dilated to the same output stride; its C4 feeds the
            auxiliary head and its C5 the ASPP, as MobileOne's stages 3 and 4 do.
        num_classes: segmentation classes.
        output_stride: 8 (ASPP rates 12/24/36) or 16 (6/12/18); the backbone's late stages are dilated.
        aspp_channels: width of the ASPP branches and of the head.
        aux_head: add torchvision's FCN head on the stage-3 feature (stride 8 or 16), trained with an
            auxiliary loss.
        backbone_weights: an ImageNet checkpoint for the backbone (Apple's or ours; the classifier is
            dropped).
        backbone_kwargs: extra ``mobileone()`` arguments (``frozen_stages``, ``norm_eval``, ...).

    ``forward`` returns ``{"out": logits}`` at the input resolution, plus ``"aux"`` in training
    mode when the auxiliary head exists.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        num_classes: int = 21,
        output_stride: int = 8,
        aspp_channels: int = 256,
        aux_head: bool = True,
        backbone_weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise ValueError(f"output_stride must be 8 or 16 for DeepLabV3, got {output_stride}")
        self.backbone = feature_extractor(backbone, output_stride, backbone_weights, backbone_kwargs)
        stage3_channels, stage4_channels = self.backbone.feature_info.channels()
        self.head = nn.Sequential(
            ASPP(stage4_channels, ASPP_RATES[output_stride], out_channels=aspp_channels),
            nn.Conv2d(aspp_channels, aspp_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(aspp_channels),
            nn.ReLU(),
            nn.Conv2d(aspp_channels, num_classes, 1),
        )
        self.aux_head = FCNHead(stage3_channels, num_classes) if aux_head else None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = images.shape[-2:]
        stage3, stage4 = self.backbone(images)
        outputs = {"out": F.interpolate(self.head(stage4), size=size, mode="bilinear", align_corners=False)}
        if self.aux_head is not None and self.training:
            outputs["aux"] = F.interpolate(self.aux_head(stage3), size=size, mode="bilinear", align_corners=False)
        return outputs


class DeepLabV3Logits(nn.Module):
    """The deployable function: images -> per-pixel class logits (no auxiliary head)."""

    def __init__(self, model: DeepLabV3) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["out"]


class LogitsAsDeepLabV3Outputs(nn.Module):
    """The other way round: a deployed function (images -> logits) answering like ``DeepLabV3``
    in evaluation (``{"out": logits}``), so that validation can run an exported file."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.network(images)}
