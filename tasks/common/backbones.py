"""Backbones for the tasks' heads: MobileOne (the default) and the mobile networks it is compared with.

``--model.backbone`` names the network:

- ``"mobileone_s0"`` .. ``"mobileone_s4"``: MobileOne of that variant (the default ``mobileone_s0``;
  the only backbones that are reparameterized at export);
- ``"mobilenet_v2"``, ``"mobilenet_v3_large"``, ``"efficientnet_b0"``: torchvision's networks;
- ``"timm:<model name>"``: any timm model (``pip install timm``); dense tasks use its
  ``features_only`` form.

Dense tasks take two feature levels from every backbone, at the same places: C4, the output of the
last block at stride 16, and C5, the output of the last block (stride 32). For MobileOne these
are the ends of stages 3 and 4. At ``output_stride`` 16 or 8 the strided convolutions past that
stride become stride 1 and the later k x k convolutions are dilated instead (torchvision's
``replace_stride_with_dilation`` convention: the first convolution of a dilated block keeps the
previous dilation), so C4 and C5 both come out at the output stride. Weights start random unless
a checkpoint is given.

Every backbone is a :class:`Backbone` in the registry (``BACKBONES``), the one place that knows
how to build one; ``register_backbone("name", Backbone(...))`` adds another, and every task takes
it by name (``--model.backbone name``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from backbones import (
    VARIANTS,
    FeatureInfo,
    WeightsDownloadError,
    is_apple_weights,
    leave_out_unfitting_classifier,
    load_checkpoint,
    mark_folded_batchnorms_,
    mobileone,
    resolve_weights,
)

__all__ = ["BACKBONES", "BASELINE_BACKBONES", "DEFAULT_BACKBONE", "MOBILEONE_BACKBONES", "Backbone", "TorchvisionFeatures", "backbone_name",
           "classifier_network", "feature_extractor", "get_backbone", "register_backbone", "resolve_backbone_weights"]

log = logging.getLogger(__name__)

MOBILEONE_BACKBONES = tuple(f"mobileone_{variant}" for variant in VARIANTS)
DEFAULT_BACKBONE = "mobileone_s0"
BASELINE_BACKBONES = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0")
TIMM_PREFIX = "timm:"


def backbone_name(backbone: str) -> str:
    """A readable name for reports and export metadata: ``mobileone_s0``, ``mobilenet_v2``, ``resnet18`` (of ``timm:resnet18``)."""
    get_backbone(backbone)  # a registered one
    return backbone.removeprefix(TIMM_PREFIX)


def _timm() -> Any:
    try:
        import timm
    except ImportError as error:
        raise ImportError("'timm:<name>' backbones need timm: pip install timm") from error
    return timm


def _timm_weights(weights: str | None) -> dict[str, Any]:
    """timm's arguments for a local checkpoint file (never a download)."""
    if weights is None:
        return {"pretrained": False}
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"backbone weights {weights!r} do not exist")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": weights}}


def _read_torchvision_state_dict(path: str, network: nn.Module) -> dict[str, torch.Tensor]:
    """A torchvision state dict from ``path``: a plain ``.pth``, one wrapped in ``state_dict``, or
    one of our Lightning ``.ckpt`` files (task prefix such as ``network.`` stripped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights {path!r} do not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    first = next(iter(network.state_dict()))
    prefixes = [key[: -len(first)] for key in state if key.endswith(first)]
    if not prefixes:
        raise ValueError(f"{path} holds no {type(network).__name__} weights: no key ends with {first!r}")
    prefix = min(prefixes, key=len)
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _torchvision_network(name: str, weights: str | None, num_classes: int = 1000) -> nn.Module:
    network = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if weights:
        state = _read_torchvision_state_dict(weights, network)
        head, warning = leave_out_unfitting_classifier(state, network.state_dict(), "classifier.", weights)
        missing, unexpected = network.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in head]
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit torchvision's {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if warning:
            log.warning(warning)
        folded = mark_folded_batchnorms_(network)
        if folded:  # e.g. a quantized release dequantized: conv + BatchNorm fused, every BatchNorm an identity plus bias
            log.info("weights %s: %d BatchNorms hold folded weights (identity statistics); they are calibrated on "
                     "training images at the start of fit", weights, folded)
    return network


def classifier_network(
    backbone: str, num_classes: int, weights: str | None = None, backbone_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """A whole classification network with ``num_classes`` outputs, built by ``backbone``'s registered
    :class:`Backbone` (MobileOne in train form, from a fused file such as Apple's
    ``mobileone_sX.pth.tar`` too: see ``backbones.load_checkpoint``; a baseline's own network,
    torchvision's or timm's). ``weights`` as for :func:`feature_extractor`; a classifier of another
    class count is left freshly initialized (a warning says so), while weights of another width
    (another variant) raise ``load_checkpoint``'s error naming the file."""
    entry = _checked(backbone, backbone_kwargs)
    return entry.classifier(backbone, num_classes, resolve_backbone_weights(backbone, weights), **(backbone_kwargs or {}))


def _mobileone_classifier(variant: str, num_classes: int, weights: str | None, **kwargs: Any) -> nn.Module:
    network = mobileone(variant, num_classes=num_classes, **kwargs)
    if weights:
        report = load_checkpoint(network, weights)  # a classifier of another class count: re-initialized, with a warning
        log.info("loaded weights from %s%s%s", weights, f" (left out: {len(report.dropped)} keys)" if report.dropped else "",
                 f"; {report.from_fused} layers built in train form from its fused convolutions" if report.from_fused else "")
    return network


def _set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    kernel = conv.kernel_size[0]
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation * (kernel - 1) // 2,) * 2


def dilate_(features: nn.Module, output_stride: int) -> nn.Module:
    """In place: make the convolutions of ``features`` (in registration order, which is the
    forward order of torchvision's mobile networks) stop striding at ``output_stride`` and dilate
    the later k x k convolutions instead. Returns ``features``."""
    reduction, dilation = 1, 1
    for conv in (m for m in features.modules() if isinstance(m, nn.Conv2d)):
        stride = conv.stride[0]
        if stride > 1 and reduction * stride > output_stride:
            conv.stride = (1, 1)
            if conv.kernel_size[0] > 1:
                _set_dilation(conv, dilation)  # the strided conv keeps the previous dilation
            dilation *= stride
            continue
        reduction *= stride
        if conv.kernel_size[0] > 1 and dilation > 1:
            _set_dilation(conv, dilation)
    return features


class TorchvisionFeatures(nn.Module):
    """C4 and C5 of a torchvision mobile network's ``features`` (see the module docstring).

    The parameter names are the network's own (``features.<i>...``), so torchvision ImageNet
    checkpoints load (the classifier is dropped).
    """

    def __init__(self, name: str, output_stride: int = 32, weights: str | None = None) -> None:
        super().__init__()
        features = _torchvision_network(name, weights).features
        with torch.no_grad():
            probe, sizes, channels = torch.zeros(1, 3, 64, 64), [], []
            for block in features.eval():
                probe = block(probe)
                sizes.append(64 // probe.shape[-1])
                channels.append(probe.shape[1])
        self.taps = (max(i for i, r in enumerate(sizes) if r == 16), len(features) - 1)
        self.features = dilate_(features.train(), output_stride)
        self.feature_info = FeatureInfo(
            {"num_chs": channels[i], "reduction": min(sizes[i], output_stride), "module": f"features.{i}"} for i in self.taps
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self.taps:
                outputs.append(x)
        return outputs


class TimmFeatures(nn.Module):
    """C4 and C5 of a timm model's ``features_only`` form, dilated by timm itself."""

    def __init__(self, name: str, output_stride: int = 32, weights: str | None = None) -> None:
        super().__init__()
        timm = _timm()
        reductions = timm.create_model(name, features_only=True, pretrained=False).feature_info.reduction()
        taps = [max(i for i, r in enumerate(reductions) if r == target) for target in (16, 32) if target in reductions]
        if len(taps) != 2:
            raise ValueError(f"timm model {name!r} has no feature levels at strides 16 and 32 (it has {reductions})")
        self.body = timm.create_model(name, features_only=True, out_indices=taps, output_stride=output_stride, **_timm_weights(weights))
        self.feature_info = FeatureInfo(
            {"num_chs": c, "reduction": min(r, output_stride), "module": m}
            for c, r, m in zip(self.body.feature_info.channels(), self.body.feature_info.reduction(), self.body.feature_info.module_name())
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def resolve_backbone_weights(backbone: str, weights: str | None) -> str | None:
    """``weights`` as a local file. For MobileOne, ``"apple"`` is Apple's ImageNet release of the
    backbone's variant in train form (downloaded once into the weights cache, its SHA-256 checked on
    every use) and ``"hf-hub:<repo>"`` a Hugging Face Hub file (see ``backbones.resolve_weights``);
    any other value is a path, for every backbone."""
    return get_backbone(backbone).resolve_weights(backbone, weights) if weights is not None else None


def _local_weights(backbone: str, weights: str) -> str:
    if is_apple_weights(weights):
        raise ValueError(f"weights 'apple' are Apple's MobileOne releases; {backbone} takes a local file")
    return weights


def _mobileone_weights(variant: str, weights: str) -> str:
    try:
        return str(resolve_weights(weights, variant))
    except WeightsDownloadError as error:  # the library names its Python call; here, the task's flags
        raise WeightsDownloadError(f"{error}\nFrom the command line: --model.weights /path/to/file "
                                   "(--model.backbone_weights for detection and segmentation).") from error


def feature_extractor(
    backbone: str = DEFAULT_BACKBONE,
    output_stride: int = 32,
    weights: str | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """C4 and C5 of ``backbone`` as a module returning ``[C4, C5]`` with a timm-style ``feature_info``.

    ``weights``: for MobileOne an ImageNet checkpoint (Apple's or one of our ``.ckpt``; see
    ``backbones.load_checkpoint``), for torchvision networks a torchvision state dict or one of our
    classification ``.ckpt`` files, for timm a local file timm can load.
    """
    entry = _checked(backbone, backbone_kwargs)
    weights = resolve_backbone_weights(backbone, weights)
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return entry.features(backbone, output_stride, weights, **(backbone_kwargs or {}))


def _mobileone_features(variant: str, output_stride: int, weights: str | None, **kwargs: Any) -> nn.Module:
    network = mobileone(variant, out_indices=(3, 4), output_stride=output_stride, **kwargs)
    if weights:
        load_checkpoint(network, weights)
    return network


@dataclass(frozen=True)
class Backbone:
    """How the tasks build one backbone (or a family of them, named by a prefix such as ``"timm:"``).

    Each callable gets the ``--model.backbone`` name as given:

    - ``classifier(backbone, num_classes, weights, **backbone_kwargs)``: a whole network with
      ``num_classes`` outputs (classification), loaded from the local file ``weights`` if given;
    - ``features(backbone, output_stride, weights, **backbone_kwargs)``: a module returning
      ``[C4, C5]`` (the last outputs at strides 16 and 32, both at ``output_stride`` 8 or 16 when
      dilated) with a timm-style ``feature_info`` of two entries (detection, segmentation);
    - ``resolve_weights(backbone, weights)``: ``--model.weights`` as a local file (default: the path
      itself; named releases such as ``"apple"`` are the backbone's to resolve);
    - ``takes_kwargs``: whether ``--model.backbone_kwargs`` apply;
    - ``deployment_build(backbone, num_classes, backbone_kwargs)``: a Python expression that
      rebuilds the exported classifier, for ``model.json`` (default: ``classifier_network``'s call).
    """

    classifier: Callable[..., nn.Module]
    features: Callable[..., nn.Module]
    resolve_weights: Callable[[str, str], str] = _local_weights
    takes_kwargs: bool = False
    deployment_build: Callable[[str, int, dict[str, Any]], str] = (
        lambda backbone, num_classes, kwargs: f"tasks.common.backbones.classifier_network({backbone!r}, {num_classes})"
    )


BACKBONES: dict[str, Backbone] = {}
"""The registry: ``--model.backbone`` name (or a prefix ending in ``:``) → its :class:`Backbone`."""


def register_backbone(name: str, backbone: Backbone) -> None:
    """Make ``name`` a ``--model.backbone`` of every task (``"prefix:"`` for a family: ``"prefix:<anything>"``)."""
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is registered already")
    BACKBONES[name] = backbone


def get_backbone(name: str) -> Backbone:
    """The registered :class:`Backbone` of ``name``; a ``ValueError`` listing the registered ones otherwise."""
    if name in BACKBONES:
        return BACKBONES[name]
    prefix = name.split(":", 1)[0] + ":" if ":" in name else None
    if prefix in BACKBONES:
        return BACKBONES[prefix]
    known = ", ".join(repr(k + "<model name>" if k.endswith(":") else k) for k in BACKBONES)
    raise ValueError(f"unknown backbone {name!r}: expected one of {known}")


def _checked(backbone: str, backbone_kwargs: dict[str, Any] | None) -> Backbone:
    entry = get_backbone(backbone)
    if backbone_kwargs and not entry.takes_kwargs:
        raise ValueError(f"backbone_kwargs {sorted(backbone_kwargs)} apply to MobileOne only, not to {backbone!r}")
    return entry


def _mobileone_backbone(variant: str) -> Backbone:
    return Backbone(
        classifier=lambda backbone, num_classes, weights, **kwargs: _mobileone_classifier(variant, num_classes, weights, **kwargs),
        features=lambda backbone, output_stride, weights, **kwargs: _mobileone_features(variant, output_stride, weights, **kwargs),
        resolve_weights=lambda backbone, weights: _mobileone_weights(variant, weights),
        takes_kwargs=True,
        deployment_build=lambda backbone, num_classes, kwargs:
            f"backbones.mobileone({variant!r}, num_classes={num_classes}, inference_mode=True, **{kwargs or {}})",
    )


for _variant in VARIANTS:
    register_backbone(f"mobileone_{_variant}", _mobileone_backbone(_variant))
for _name in BASELINE_BACKBONES:
    register_backbone(_name, Backbone(
        classifier=lambda backbone, num_classes, weights: _torchvision_network(backbone, weights, num_classes),
        features=lambda backbone, output_stride, weights: TorchvisionFeatures(backbone, output_stride, weights),
    ))
register_backbone(TIMM_PREFIX, Backbone(
    classifier=lambda backbone, num_classes, weights:
        _timm().create_model(backbone.removeprefix(TIMM_PREFIX), num_classes=num_classes, **_timm_weights(weights)),
    features=lambda backbone, output_stride, weights: TimmFeatures(backbone.removeprefix(TIMM_PREFIX), output_stride, weights),
))
