"""MobileOne (Vasu et al., CVPR 2023): the network, its layers and their reparameterization.

Module names follow Apple's reference implementation so that Apple's published checkpoints
(``mobileone_sX_unfused.pth.tar`` for the train form, ``mobileone_sX.pth.tar`` for the inference
form) load with ``load_state_dict(strict=True)``.

Additions over the reference: dilated features at output stride 16 / 8 that stay exactly
reparameterizable, ``out_indices`` / ``feature_info`` feature extraction, ``frozen_stages`` and
``norm_eval`` for fine-tuning, and fusion computed in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VARIANTS",
    "FeatureInfo",
    "MobileOne",
    "MobileOneBlock",
    "SEBlock",
    "calibrate_from_fused_",
    "mark_folded_batchnorms_",
    "reparameterize_model",
]

# The paper's variants as data. ``num_se_blocks`` counts, per stage 1..4, how many of the stage's
# last blocks (a block = depthwise layer + pointwise layer) carry squeeze-excitation.
VARIANTS: dict[str, dict[str, Any]] = {
    "s0": {"width_multipliers": (0.75, 1.0, 1.0, 2.0), "num_conv_branches": 4, "num_se_blocks": (0, 0, 0, 0)},
    "s1": {"width_multipliers": (1.5, 1.5, 2.0, 2.5), "num_conv_branches": 1, "num_se_blocks": (0, 0, 0, 0)},
    "s2": {"width_multipliers": (1.5, 2.0, 2.5, 4.0), "num_conv_branches": 1, "num_se_blocks": (0, 0, 0, 0)},
    "s3": {"width_multipliers": (2.0, 2.5, 3.0, 4.0), "num_conv_branches": 1, "num_se_blocks": (0, 0, 0, 0)},
    "s4": {"width_multipliers": (3.0, 3.5, 3.5, 4.0), "num_conv_branches": 1, "num_se_blocks": (0, 0, 5, 1)},
}

DEFAULT_BLOCKS_PER_STAGE = (2, 8, 10, 1)
STAGE_BASE_WIDTHS = (64, 128, 256, 512)


class SEBlock(nn.Module):
    """Squeeze-and-excitation with Apple's parameter names (``reduce``, ``expand``)."""

    def __init__(self, channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        hidden = int(channels * rd_ratio)
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(scale))))
        return x * scale


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, dilation: int, groups: int
) -> nn.Sequential:
    branch = nn.Sequential()
    branch.add_module(
        "conv",
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
    )
    branch.add_module("bn", nn.BatchNorm2d(out_channels))
    return branch


def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding (bias-free) conv kernel, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fuse {bn}: it has no running statistics (track_running_stats=False); "
            "fusing needs the running mean and variance, never batch statistics"
        )
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return kernel.double() * scale.reshape(-1, 1, 1, 1), beta - bn.running_mean.double() * scale


class MobileOneBlock(nn.Module):
    """One MobileOne layer.

    Train form: ``num_conv_branches`` conv-BN branches (``rbr_conv``), a 1x1 conv-BN "scale"
    branch (``rbr_scale``, when ``kernel_size > 1``) and a BN "skip" branch (``rbr_skip``, when
    input and output shapes agree), summed, then optional squeeze-excitation, then ReLU.
    Inference form: one conv with bias (``reparam_conv``), then SE and ReLU.

    Every branch uses the same stride and dilation, so :meth:`reparameterize` is exact for any
    dilation: the 1x1 and identity kernels land on the centre tap of the dilated kxk kernel.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size of the conv branches.
        stride: stride of every branch.
        padding: zero padding of the kxk branches; default ``dilation * (kernel_size // 2)``.
        dilation: dilation of the kxk branches.
        groups: conv groups (``in_channels`` for a depthwise layer).
        inference_mode: build the fused single-conv form directly.
        use_se: add squeeze-excitation before the activation.
        num_conv_branches: number of parallel kxk conv-BN branches (k in the paper).
        use_skip: build the BN skip branch; default (None) follows Apple's rule
            ``in_channels == out_channels and stride == 1``. The network passes the value for the
            layer's nominal stride so that dilated layers keep the branches (and checkpoint keys)
            of the original strided layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        inference_mode: bool = False,
        use_se: bool = False,
        num_conv_branches: int = 1,
        use_skip: bool | None = None,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"MobileOneBlock needs an odd kernel_size, got {kernel_size}")
        if num_conv_branches < 1:
            raise ValueError(f"num_conv_branches must be >= 1, got {num_conv_branches}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.padding = dilation * (kernel_size // 2) if padding is None else padding
        self.groups = groups
        self.num_conv_branches = num_conv_branches
        self.inference_mode = inference_mode

        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU(inplace=True)  # on a tensor the block itself just made

        if inference_mode:
            self.reparam_conv = self._make_fused_conv()
            return
        if use_skip is None:
            use_skip = in_channels == out_channels and stride == 1
        self.rbr_skip = nn.BatchNorm2d(in_channels) if use_skip else None
        self.rbr_conv = nn.ModuleList(
            _conv_bn(in_channels, out_channels, kernel_size, stride, self.padding, dilation, groups)
            for _ in range(num_conv_branches)
        )
        self.rbr_scale = None
        if kernel_size > 1:
            scale_padding = self.padding - dilation * (kernel_size // 2)
            self.rbr_scale = _conv_bn(in_channels, out_channels, 1, stride, scale_padding, 1, groups)

    def _make_fused_conv(self) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        # summed in place into the first branch's output: BatchNorm's backward does not need it
        out = self.rbr_conv[0](x)
        for branch in self.rbr_conv[1:]:
            out += branch(x)
        if self.rbr_scale is not None:
            out += self.rbr_scale(x)
        if self.rbr_skip is not None:
            out += self.rbr_skip(x)
        return self.activation(self.se(out))

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel and bias of the equivalent single conv, in float64 (uses BN running stats)."""
        kernel = torch.zeros(0, dtype=torch.float64)
        bias = torch.zeros(0, dtype=torch.float64)
        for branch in self.rbr_conv:
            k, b = _fuse_bn(branch.conv.weight, branch.bn)
            kernel, bias = (k, b) if kernel.numel() == 0 else (kernel + k, bias + b)
        centre = self.kernel_size // 2
        if self.rbr_scale is not None:
            k, b = _fuse_bn(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            kernel = kernel + F.pad(k, [centre] * 4)
            bias = bias + b
        if self.rbr_skip is not None:
            in_per_group = self.in_channels // self.groups
            identity = torch.zeros(
                self.in_channels, in_per_group, self.kernel_size, self.kernel_size,
                dtype=torch.float64, device=kernel.device,
            )
            channels = torch.arange(self.in_channels, device=kernel.device)
            identity[channels, channels % in_per_group, centre, centre] = 1.0
            k, b = _fuse_bn(identity, self.rbr_skip)
            kernel = kernel + k
            bias = bias + b
        return kernel, bias

    def train_form_state_from_fused(self, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
        """This train-form layer's branch parameters and buffers (``rbr_*`` keys, relative to it; the
        squeeze-excitation is the fused file's own) computing the fused conv
        (``weight``, ``bias``) exactly in eval mode: the fused kernel in the first conv branch,
        whose BatchNorm passes it through (running mean 0, variance 1, weight sqrt(1 + eps), bias
        ``bias``, until ``calibrate_from_fused_`` gives it the statistics of real inputs); every
        other branch (conv, scale, skip) keeps its initialized conv weights behind a BatchNorm of
        weight 0 and bias 0, so it adds nothing at first and learns from the first step."""
        if self.inference_mode:
            raise ValueError("train_form_state_from_fused builds the train form: this layer is in inference form")
        state = {key: value.detach().clone() for key, value in self.state_dict().items() if key.startswith("rbr_")}
        if tuple(weight.shape) != tuple(state["rbr_conv.0.conv.weight"].shape) or tuple(bias.shape) != (self.out_channels,):
            raise ValueError(f"fused conv of shapes {tuple(weight.shape)} / {tuple(bias.shape)} does not fit this layer "
                             f"({tuple(state['rbr_conv.0.conv.weight'].shape)} / ({self.out_channels},))")
        norms = [f"rbr_conv.{i}.bn" for i in range(self.num_conv_branches)]
        norms += ["rbr_scale.bn"] * (self.rbr_scale is not None) + ["rbr_skip"] * (self.rbr_skip is not None)
        for name in norms:
            state[f"{name}.running_mean"].zero_()
            state[f"{name}.running_var"].fill_(1.0)
            state[f"{name}.weight"].zero_()
            state[f"{name}.bias"].zero_()
        first = self.rbr_conv[0].bn
        state["rbr_conv.0.conv.weight"] = weight.detach().to(state["rbr_conv.0.conv.weight"].dtype).clone()
        state["rbr_conv.0.bn.weight"].fill_((1.0 + first.eps) ** 0.5)
        state["rbr_conv.0.bn.bias"] = bias.detach().to(state["rbr_conv.0.bn.bias"].dtype).clone()
        return state

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuse the branches into ``reparam_conv`` in place. A no-op in inference form."""
        if self.inference_mode:
            return
        reference = self.rbr_conv[0].conv.weight
        kernel, bias = self.fused_kernel_bias()
        fused = self._make_fused_conv().to(device=reference.device, dtype=reference.dtype)
        fused.weight.copy_(kernel.to(reference.dtype))
        fused.bias.copy_(bias.to(reference.dtype))
        del self.rbr_conv, self.rbr_scale, self.rbr_skip
        self.reparam_conv = fused
        self.inference_mode = True
        self.from_fused = False  # no train-form layers left to calibrate

    def extra_repr(self) -> str:
        form = "inference" if self.inference_mode else f"train, {self.num_conv_branches} conv branches"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, groups={self.groups}, {form}"
        )


class FeatureInfo(list):
    """timm-style feature description: one dict per level with ``num_chs``, ``reduction``, ``module``."""

    def channels(self) -> list[int]:
        return [level["num_chs"] for level in self]

    def reduction(self) -> list[int]:
        return [level["reduction"] for level in self]

    def module_name(self) -> list[str]:
        return [level["module"] for level in self]


class MobileOne(nn.Module):
    """MobileOne backbone / classifier.

    ``stage0`` is the 3x3 stride-2 stem; ``stage1..stage4`` are ``nn.Sequential`` stacks of
    alternating 3x3 depthwise and 1x1 pointwise :class:`MobileOneBlock` layers, the first
    depthwise layer of each stage with stride 2.

    Args:
        width_multipliers: multipliers of the base widths 64/128/256/512 of stages 1..4.
        num_blocks_per_stage: blocks (depthwise + pointwise pairs) per stage.
        num_conv_branches: kxk conv branches per layer of stages 1..4.
        stem_conv_branches: conv branches of the stem (Apple's code always uses 1).
        num_se_blocks: per stage, how many of its last blocks use squeeze-excitation.
        num_classes: classifier outputs; 0 builds no classifier (``forward`` returns pooled features).
        inference_mode: build the fused form directly (e.g. to load ``mobileone_sX.pth.tar``).
        out_indices: stages (0 = stem .. 4) to return; when set, the model is a feature
            extractor: ``forward`` returns a list of feature maps, no classifier is built and
            stages after the last requested one are not built either.
        output_stride: 32, 16 or 8 (or any power of two >= 2). Stride-2 layers of the late
            stages become stride 1, and later kxk layers are dilated instead (torchvision's
            ``replace_stride_with_dilation`` convention: the first layer of a dilated stage
            keeps the previous dilation). Branch structure and parameter shapes do not change,
            so ImageNet checkpoints load and fusion stays exact.
        frozen_stages: freeze stages 0..frozen_stages (parameters and BN statistics); -1 none.
        norm_eval: keep every BatchNorm in eval mode while training (fine-tuning with small batches).
        in_channels: image channels.
    """

    def __init__(
        self,
        width_multipliers: Sequence[float],
        num_blocks_per_stage: Sequence[int] = DEFAULT_BLOCKS_PER_STAGE,
        num_conv_branches: int = 1,
        stem_conv_branches: int = 1,
        num_se_blocks: Sequence[int] = (0, 0, 0, 0),
        num_classes: int = 1000,
        inference_mode: bool = False,
        out_indices: Sequence[int] | None = None,
        output_stride: int = 32,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(width_multipliers) != 4 or len(num_blocks_per_stage) != 4 or len(num_se_blocks) != 4:
            raise ValueError(
                "width_multipliers, num_blocks_per_stage and num_se_blocks need one value per stage 1..4, got "
                f"{tuple(width_multipliers)}, {tuple(num_blocks_per_stage)}, {tuple(num_se_blocks)}"
            )
        for stage, (blocks, se_blocks) in enumerate(zip(num_blocks_per_stage, num_se_blocks), start=1):
            if blocks < 1 or not 0 <= se_blocks <= blocks:
                raise ValueError(
                    f"stage{stage}: need >= 1 block and 0 <= num_se_blocks <= blocks, got {blocks} blocks, "
                    f"{se_blocks} SE blocks"
                )
        if output_stride < 2 or output_stride > 32 or output_stride & (output_stride - 1):
            raise ValueError(f"output_stride must be 2, 4, 8, 16 or 32, got {output_stride}")
        if out_indices is not None:
            out_indices = tuple(int(i) for i in out_indices)
            if not out_indices or any(i not in range(5) for i in out_indices) or len(set(out_indices)) != len(out_indices):
                raise ValueError(f"out_indices must be distinct stage indices in 0..4, got {out_indices}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")

        self.width_multipliers = tuple(width_multipliers)
        self.num_blocks_per_stage = tuple(num_blocks_per_stage)
        self.inference_mode = inference_mode
        self.out_indices = out_indices
        self.output_stride = output_stride
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        last_stage = max(out_indices) if out_indices is not None else 4
        stem_width = min(64, int(64 * width_multipliers[0]))
        self.stage0 = MobileOneBlock(
            in_channels, stem_width, 3, stride=2, inference_mode=inference_mode,
            num_conv_branches=stem_conv_branches,
        )
        info = [{"num_chs": stem_width, "reduction": 2, "module": "stage0"}]
        in_planes, current_stride, dilation = stem_width, 2, 1
        for stage in range(1, last_stage + 1):
            planes = int(STAGE_BASE_WIDTHS[stage - 1] * width_multipliers[stage - 1])
            first_dilation = dilation
            if current_stride * 2 > output_stride:
                stride, dilation = 1, dilation * 2
            else:
                stride, current_stride = 2, current_stride * 2
            blocks = num_blocks_per_stage[stage - 1]
            first_se_block = blocks - num_se_blocks[stage - 1]
            layers: list[nn.Module] = []
            for block in range(blocks):
                use_se = block >= first_se_block
                layers.append(
                    MobileOneBlock(
                        in_planes, in_planes, 3,
                        stride=stride if block == 0 else 1,
                        dilation=first_dilation if block == 0 else dilation,
                        groups=in_planes, inference_mode=inference_mode, use_se=use_se,
                        num_conv_branches=num_conv_branches, use_skip=block > 0,
                    )
                )
                layers.append(
                    MobileOneBlock(
                        in_planes, planes, 1, inference_mode=inference_mode, use_se=use_se,
                        num_conv_branches=num_conv_branches,
                    )
                )
                in_planes = planes
            self.add_module(f"stage{stage}", nn.Sequential(*layers))
            info.append({"num_chs": planes, "reduction": current_stride, "module": f"stage{stage}"})

        self.num_features = in_planes
        if out_indices is None:
            self.feature_info = FeatureInfo(info)
            self.num_classes = num_classes
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.linear = nn.Linear(in_planes, num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.feature_info = FeatureInfo(info[i] for i in out_indices)
            self.num_classes = 0
        self._freeze_stages()

    @property
    def stages(self) -> list[nn.Module]:
        """``stage0 .. stageN`` in order (N = 4, or the last stage a feature extractor needs)."""
        return [getattr(self, f"stage{i}") for i in range(5) if hasattr(self, f"stage{i}")]

    def _freeze_stages(self) -> None:
        for stage in self.stages[: self.frozen_stages + 1]:
            stage.eval()
            for param in stage.parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> MobileOne:
        """Set train mode, keeping frozen stages (and, with ``norm_eval``, every BatchNorm) in eval."""
        super().train(mode)
        if mode:
            self._freeze_stages()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Stage outputs: the last one, or the list at ``out_indices`` for a feature extractor."""
        outputs = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if self.out_indices is not None and index in self.out_indices:
                outputs.append(x)
        if self.out_indices is None:
            return x
        order = sorted(self.out_indices)
        return [outputs[order.index(i)] for i in self.out_indices]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool, flatten (``torch.flatten``, which CoreML converts) and classifier."""
        return self.linear(torch.flatten(self.gap(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        features = self.forward_features(x)
        if self.out_indices is not None:
            return features
        return self.forward_head(features)


def variant_config(variant: str, what: str = "variant") -> dict[str, Any]:
    """A copy of the :class:`MobileOne` arguments of ``variant`` ("s0" .. "s4", also "mobileone_s0" ..,
    any case); a ``ValueError`` naming the known variants for any other name."""
    name = variant.lower().removeprefix("mobileone_")
    if name not in VARIANTS:
        raise ValueError(f"unknown MobileOne {what} {variant!r}; expected one of {sorted(VARIANTS)}")
    return dict(VARIANTS[name])


def mark_folded_batchnorms_(model: nn.Module) -> int:
    """Mark (``from_fused``) the BatchNorms of ``model`` that carry folded weights: running mean 0,
    ``running_var + eps`` = 1 and weight 1 in every channel, so that they only add a bias (the conv
    before them holds the folded BatchNorm, as in torchvision's quantized releases). Train mode
    (batch statistics) would destroy their function; ``calibrate_from_fused_`` gives them the
    statistics of real inputs first. Only BatchNorms right after a conv in a ``nn.Sequential`` are
    considered. Returns how many were marked."""
    marked = 0
    for _, bn in _conv_batchnorm_pairs(model):
        folded = (
            bool((bn.running_mean == 0).all()) and bool((bn.weight == 1).all())
            and bool(((bn.running_var.double() + bn.eps) - 1.0).abs().max() < 1e-6)
        )
        if folded:
            bn.from_fused = True
            marked += 1
    return marked


def _conv_batchnorm_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every (conv, BatchNorm) pair of ``model``: consecutive children of a ``nn.Sequential``."""
    pairs = []
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            children = list(module.children())
            pairs += [(a, b) for a, b in zip(children, children[1:]) if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)]
    return pairs


def _layers_to_calibrate(model: nn.Module) -> list[tuple[nn.Module, nn.Conv2d, nn.BatchNorm2d]]:
    """(marked module, conv, BatchNorm) of every layer marked ``from_fused``: a MobileOne layer's
    first conv branch, or a marked BatchNorm and the conv before it."""
    layers = [(m, m.rbr_conv[0].conv, m.rbr_conv[0].bn) for m in model.modules()
              if isinstance(m, MobileOneBlock) and getattr(m, "from_fused", False)]
    return layers + [(bn, conv, bn) for conv, bn in _conv_batchnorm_pairs(model) if getattr(bn, "from_fused", False)]


@torch.no_grad()
def calibrate_from_fused_(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], object] | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """In place: give the layers built from a fused file (marked ``from_fused``: the MobileOne layers
    that ``load_checkpoint`` rebuilt in train form, the BatchNorms that ``mark_folded_batchnorms_``
    found) the BatchNorm statistics of real inputs, so that their train-mode (batch statistics)
    outputs match the fused network's as their eval-mode outputs already do.

    ``forward(model, batch)`` (default ``model(batch)``) runs each of ``batches`` (the task's
    training images) in eval mode; the conv before each marked BatchNorm records the per-channel
    mean and variance of its output (float64), and the BatchNorm is set to running mean ``mu``,
    variance ``var``, weight ``sqrt(var + eps)``, bias ``fused bias + mu``: the eval-mode function
    is unchanged, exactly. ``all_reduce`` sums a tensor over processes (distributed training: every
    process then sets the same statistics). Returns the number of layers calibrated (0: nothing marked).
    """
    layers = _layers_to_calibrate(model)
    if not layers:
        return 0
    sums: dict[nn.Conv2d, list[torch.Tensor]] = {}

    def record(conv: nn.Conv2d, args: Any, output: torch.Tensor) -> None:
        values = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
        totals = [values.sum(1), values.square().sum(1), torch.full_like(values[:, 0], values.shape[1])]
        sums[conv] = totals if conv not in sums else [a + b for a, b in zip(sums[conv], totals)]

    for _, conv, bn in layers:  # the pair's eval-mode function a * conv(x) + c, with a folded into the conv (a = 1 until a
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()  # train-mode forward has moved the statistics)
        conv.weight.copy_(conv.weight.double() * scale.view(-1, *[1] * (conv.weight.ndim - 1)))
        bias = bn.bias.double() - bn.running_mean.double() * scale
        if conv.bias is not None:  # its bias moves into the BatchNorm's
            bias += conv.bias.double() * scale
            conv.bias.zero_()
        bn.bias.copy_(bias)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_((1.0 + bn.eps) ** 0.5)
    handles = [conv.register_forward_hook(record) for _, conv, _ in layers]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        for batch in batches:
            (forward or (lambda network, inputs: network(inputs)))(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if len(sums) != len(layers):
        raise RuntimeError(f"calibration saw {len(sums)} of the {len(layers)} layers built from a fused file: no batch reached the others")
    for marked, conv, bn in layers:
        total, squares, count = sums[conv] if all_reduce is None else [all_reduce(t) for t in sums[conv]]
        mean = total / count
        variance = (squares / count - mean.square()).clamp_min(0.0)
        fused_bias = bn.bias.double().clone()  # running mean 0, variance 1, weight sqrt(1 + eps): the bias is the function's
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(variance)
        bn.weight.copy_((variance + bn.eps).sqrt())
        bn.bias.copy_(fused_bias + mean)
        marked.from_fused = False
    return len(layers)


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Return a fused deep copy of ``model``, in eval mode; ``model`` itself is not changed.

    Every submodule with a ``reparameterize()`` method (every :class:`MobileOneBlock`, in a bare
    backbone or anywhere inside a detector or segmenter) is fused into a single conv from its BN
    running statistics, computed in float64 and cast back to the parameters' dtype. Batch statistics
    are never used, whatever mode ``model`` is in; the copy is returned in eval mode because the
    fused model equals the original's *eval-mode* function. Fusing a fused model is a no-op.
    """
    fused = copy.deepcopy(model)
    fused.eval()
    for module in list(fused.modules()):
        if isinstance(module, MobileOne):
            module.inference_mode = True
        elif callable(getattr(module, "reparameterize", None)):
            module.reparameterize()
    return fused
