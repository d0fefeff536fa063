"""MobileOne as an OpenMMLab backbone: registered as ``MobileOne`` in mmdet's and mmseg's ``MODELS``.

Optional: nothing else in :mod:`backbones` imports this module or OpenMMLab. Import it yourself, or
let a config do it::

    custom_imports = dict(imports=["backbones.openmmlab"], allow_failed_imports=False)
    model = dict(backbone=dict(type="MobileOne", arch="s1", out_indices=(1, 2, 3, 4), output_stride=8,
                               init_cfg=dict(type="Pretrained", checkpoint="mobileone_s1_unfused.pth.tar")))

It needs mmengine, and registers into every one of mmdet / mmseg that is installed (install the
stack with ``bash scripts/install_openmmlab.sh``).

The backbone is :class:`backbones.MobileOne` itself (a subclass that is also an mmengine
``BaseModule``), so its state-dict keys are Apple's (``backbone.stage0...``),
:func:`backbones.reparameterize_model` fuses it inside a whole detector / segmentor, and
``init_cfg=dict(type="Pretrained", checkpoint=...)`` loads Apple's ``mobileone_sX_unfused.pth.tar``
(or ``mobileone_sX.pth.tar`` into ``inference_mode=True``), a Lightning ``.ckpt`` of this repo, or an
mmdet / mmseg checkpoint (``prefix="backbone."``) with :func:`backbones.load_checkpoint`: strictly,
with an error listing the keys that do not fit, instead of mmengine's silent ``strict=False``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

try:
    from mmengine.logging import print_log
    from mmengine.model import BaseModule
except ImportError as error:  # pragma: no cover - exercised only without mmengine
    raise ImportError(
        "backbones.openmmlab needs mmengine (and mmdet and/or mmsegmentation); install the OpenMMLab stack "
        "with `bash scripts/install_openmmlab.sh`. The rest of `backbones` works without it."
    ) from error

from backbones.checkpoint import load_checkpoint
from backbones.network import MobileOne, variant_config

__all__ = ["MobileOneBackbone", "REGISTERED_IN", "resolve_arch"]  # and FixedSSDHead when mmdet is installed

# Registries this module adds ``MobileOne`` to, when the package is installed.
_REGISTRIES = {"mmdet": "mmdet.registry", "mmseg": "mmseg.registry"}


def resolve_arch(arch: str | dict[str, Any]) -> dict[str, Any]:
    """The :class:`MobileOne` arguments of ``arch``: a variant name ("s0" .. "s4", "mobileone_s0" ..)
    or a dict of architecture arguments (``width_multipliers``, ``num_conv_branches``, ...)."""
    if isinstance(arch, dict):
        return dict(arch)
    return variant_config(str(arch), what="arch")


class MobileOneBackbone(MobileOne, BaseModule):
    """MobileOne feature extractor in OpenMMLab's backbone conventions (registered as ``MobileOne``).

    ``forward`` returns a tuple of the stage outputs at ``out_indices`` (0 = the stride-2 stem,
    1..4 = stages 1..4 at strides 4, 8, 16, 32 before dilation), in that order.

    Args:
        arch: variant name ("s0" .. "s4") or a dict of :class:`MobileOne` architecture arguments.
        out_indices: stages to return; stages after the last one are not built.
        output_stride: 32, 16 or 8: late stride-2 layers become stride 1 and later layers dilate
            (exactly fusable, and ImageNet checkpoints still load).
        frozen_stages: freeze the stem and stages 1..``frozen_stages`` (weights and BN statistics);
            -1 freezes nothing, 0 the stem only.
        norm_eval: keep every BatchNorm of the backbone in eval mode while training.
        inference_mode: build the fused form (e.g. to load Apple's ``mobileone_sX.pth.tar``).
        in_channels: image channels.
        init_cfg: mmengine init config. ``dict(type="Pretrained", checkpoint=PATH)`` (optional
            ``prefix``, e.g. ``"backbone."``, and ``weights_only``, default True) loads with
            :func:`backbones.load_checkpoint`; the classifier of an ImageNet checkpoint is dropped.
        **overrides: further :class:`MobileOne` arguments overriding the variant's table entry
            (``num_conv_branches``, ``num_se_blocks``, ``num_blocks_per_stage``, ...).
    """

    def __init__(
        self,
        arch: str | dict[str, Any] = "s0",
        out_indices: Sequence[int] = (1, 2, 3, 4),
        output_stride: int = 32,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        inference_mode: bool = False,
        in_channels: int = 3,
        init_cfg: dict | list[dict] | None = None,
        **overrides: Any,
    ) -> None:
        config = resolve_arch(arch)
        unknown = sorted(set(overrides) - {"width_multipliers", "num_blocks_per_stage", "num_conv_branches",
                                             "stem_conv_branches", "num_se_blocks"})
        if unknown:
            raise TypeError(
                f"MobileOne backbone got unexpected arguments {unknown}; it takes arch, out_indices, "
                "output_stride, frozen_stages, norm_eval, inference_mode, in_channels, init_cfg and the "
                "architecture overrides width_multipliers, num_blocks_per_stage, num_conv_branches, "
                "stem_conv_branches, num_se_blocks"
            )
        config.update(overrides)
        # MobileOne.__init__ reaches BaseModule.__init__ through super() (with init_cfg=None).
        super().__init__(
            **config,
            out_indices=tuple(out_indices),
            output_stride=output_stride,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            inference_mode=inference_mode,
            in_channels=in_channels,
            num_classes=0,
        )
        # A feature extractor has no classes; mmdet's NumClassCheckHook checks every module that has
        # a `num_classes` attribute against the data set, so the backbone must not have one.
        del self.num_classes
        self.arch = arch
        self.init_cfg = copy.deepcopy(init_cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.forward_features(x))

    def init_weights(self) -> None:
        """Load a ``Pretrained`` checkpoint with :func:`backbones.load_checkpoint`; otherwise mmengine's init."""
        cfg = self.init_cfg
        if not (isinstance(cfg, dict) and cfg.get("type") == "Pretrained"):
            super().init_weights()
            return
        if self._is_init:
            return
        checkpoint = cfg.get("checkpoint")
        if not checkpoint:
            raise ValueError(f"MobileOne init_cfg {dict(cfg)} has type 'Pretrained' but no 'checkpoint' path")
        checkpoint = os.fspath(checkpoint)
        if re.match(r"^[a-z][a-z0-9+.-]*://", checkpoint):
            raise ValueError(
                f"MobileOne init_cfg checkpoint {checkpoint!r} is a URL; nothing here downloads weights at run "
                "time: download the file (Apple's are listed at https://github.com/apple/ml-mobileone) and "
                "give its local path"
            )
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(
                f"MobileOne init_cfg checkpoint {checkpoint!r} does not exist. Download it (Apple's "
                "mobileone_sX_unfused.pth.tar from https://github.com/apple/ml-mobileone) and point "
                "model.backbone.init_cfg.checkpoint at it, or set model.backbone.init_cfg=None to train "
                "from scratch"
            )
        try:
            report = load_checkpoint(
                self,
                checkpoint,
                prefix=cfg.get("prefix"),
                weights_only=cfg.get("weights_only", True),
            )
        except ValueError as error:  # includes CheckpointMismatchError
            hint = (
                " (an mmdet / mmseg / Lightning checkpoint you trust: add weights_only=False to the init_cfg)"
                if "weights_only" in str(error)
                else ""
            )
            raise type(error)(f"MobileOne backbone init_cfg {dict(cfg)}: {error}{hint}") from error
        prefix = f" (prefix {report.prefix!r})" if report.prefix else ""
        dropped = f", left out {len(report.dropped)} keys (classifier / unbuilt stages)" if report.dropped else ""
        print_log(f"MobileOne: loaded {checkpoint}{prefix}{dropped}", logger="current")
        self._is_init = True


if importlib.util.find_spec("mmdet") is not None:
    from mmdet.models.dense_heads import SSDHead

    class FixedSSDHead(SSDHead):
        """mmdet's ``SSDHead`` with its inference fixed (registered in mmdet as ``FixedSSDHead``).

        In mmdet 3.3.0 ``SSDHead.predict`` fails with "'SSDHead' object has no attribute 'loss_cls'"
        (mmdetection issues #11063, #11780): the shared post-processing reads ``self.loss_cls``, which
        SSDHead (with its own hard-negative-mining loss) never builds. ``loss_cls = None`` sends it to
        the softmax branch that SSD needs; training and everything else are SSDHead's own.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not hasattr(self, "loss_cls"):
                self.loss_cls = None


def _register_one(registry: Any, scope: str, name: str, cls: type) -> None:
    existing = registry.module_dict.get(name)
    if existing is cls:
        return
    if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise KeyError(
            f"{scope}'s MODELS registry already has a different {name!r} ({existing.__module__}."
            f"{existing.__qualname__}); backbones.openmmlab will not overwrite it"
        )
    # New, or this module imported a second time (e.g. reloaded): (re)place it.
    registry.register_module(name=name, module=cls, force=existing is not None)


def _register() -> tuple[str, ...]:
    """Add ``MobileOne`` to the ``MODELS`` registry of every installed mmdet / mmseg (and ``FixedSSDHead`` to mmdet's)."""
    registered = []
    for scope, module_name in _REGISTRIES.items():
        if importlib.util.find_spec(scope) is None:
            continue
        registry = importlib.import_module(module_name).MODELS
        _register_one(registry, scope, "MobileOne", MobileOneBackbone)
        if scope == "mmdet":
            _register_one(registry, scope, "FixedSSDHead", FixedSSDHead)
        registered.append(scope)
    if not registered:
        raise ImportError(
            "backbones.openmmlab found neither mmdet nor mmseg to register MobileOne in; install the OpenMMLab "
            "stack with `bash scripts/install_openmmlab.sh`"
        )
    return tuple(registered)


REGISTERED_IN: tuple[str, ...] = _register()
