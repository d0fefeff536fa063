"""Making a fused MobileOne INT8-friendly before post-training quantization, without changing its function.

Reparameterization leaves MobileOne's activations with a few channels many times larger than the
others (in Apple's S0, the inputs of stage 3's layers). A per-tensor int8 activation step set by
those channels erases the small ones: plain post-training quantization cost S0 10.4 points of
ImageNet top-1 on held-out images, mostly through its activations (``benchmarks/RESULTS.md``, INT8
on real ImageNet weights). Two exact transforms remove that:

- ``equalize_activations``: between two consecutive layers, scale each channel of the first layer's
  output by ``t_c`` and divide the second layer's input weights by it (ReLU commutes with a positive
  scale). When the second layer is depthwise, this is free for per-channel int8 weights (its whole
  kernel of channel c is scaled) and channels are equalized fully; when it is a dense 1x1, dividing
  its input columns coarsens its per-output-channel weight step, and the scale is the square root
  (SmoothQuant's migration strength 0.5).
- ``correct_weight_rounding_bias``: the mean output shift that rounding each layer's weights to
  int8 causes on calibration images, subtracted from its bias (Nagel et al.'s empirical bias
  correction, "Data-Free Quantization", 2019).

``prepare_for_int8`` applies both; the export (``tasks.common.export``) quantizes its copy by default.
Imports only torch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbones.network import MobileOne, MobileOneBlock

__all__ = [
    "DENSE_MIGRATION", "correct_weight_rounding_bias", "equalize_activations", "equalized_pairs", "int8_weights", "prepare_for_int8",
]

DENSE_MIGRATION = 0.5  # how much of an activation channel's range moves into a dense 1x1 layer's weights
MAX_CHANNEL_SCALE = 1e4  # no channel is scaled up by more (a near-silent channel would otherwise be blown up)


def _call(model: nn.Module, batch: Any) -> None:
    model(batch)


def _calibrate_with_input_hooks(model: nn.Module, layers: Sequence[nn.Module], make_hook: Callable[[int], Callable],
                                calibration: Iterable[Any], forward: Callable[[nn.Module, Any], None]) -> None:
    """Run every calibration batch through ``model`` with ``make_hook(i)`` watching the input of ``layers[i]``."""
    handles = [layer.register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        for batch in calibration:
            forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def equalized_pairs(model: nn.Module) -> list[tuple[MobileOneBlock, MobileOneBlock]]:
    """The (first, second) pairs of consecutive fused MobileOne layers whose connecting activation
    ``equalize_activations`` may rescale: the first layer's output feeds only the second (never a
    returned feature level, e.g. a detector's C4), passes no squeeze-excitation, and both are plain
    convolutions followed by ReLU."""
    pairs = []
    for network in (m for m in model.modules() if isinstance(m, MobileOne)):
        chain: list[MobileOneBlock] = []
        for index, stage in enumerate(network.stages):
            layers = [stage] if isinstance(stage, MobileOneBlock) else list(stage)
            for layer in layers:
                if chain:
                    pairs.append((chain[-1], layer))
                chain.append(layer)
            if network.out_indices is not None and index in network.out_indices:
                chain = []  # a returned feature level: its channels must keep their scale
    return [(a, b) for a, b in pairs
            if a.inference_mode and b.inference_mode and isinstance(a.se, nn.Identity)
            and type(a.reparam_conv) is nn.Conv2d and type(b.reparam_conv) is nn.Conv2d
            and a.reparam_conv.out_channels == b.reparam_conv.in_channels]


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


@torch.no_grad()
def _channel_maxima(model: nn.Module, convs: list[nn.Conv2d], calibration: Iterable[Any],
                    forward: Callable[[nn.Module, Any], None]) -> list[torch.Tensor]:
    """Per input channel of each of ``convs``, the largest absolute input value over ``calibration``."""
    maxima: list[torch.Tensor | None] = [None] * len(convs)

    def record(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            value = args[0].detach().abs().amax(dim=(0, 2, 3)).double()
            maxima[index] = value if maxima[index] is None else torch.maximum(maxima[index], value)
        return hook

    _calibrate_with_input_hooks(model, convs, record, calibration, forward)
    if any(m is None for m in maxima):
        raise ValueError("the calibration batches never reached some of the layers to equalize (or none were given)")
    return maxima  # type: ignore[return-value]


@torch.no_grad()
def equalize_activations(model: nn.Module, calibration: Iterable[Any], dense_migration: float = DENSE_MIGRATION,
                         forward: Callable[[nn.Module, Any], None] = _call) -> nn.Module:
    """A copy of ``model`` (fused, eval mode) with the activation between each pair of
    ``equalized_pairs`` rescaled per channel: channel c multiplied by
    ``t_c = (R / r_c) ** a`` (``r_c`` its largest value on ``calibration``, ``R`` the largest over
    channels; ``a`` 1 when the second layer is depthwise, ``dense_migration`` when it is dense),
    the first layer's weights and bias multiplied by ``t_c``, the second layer's input weights
    divided by it. The same function (float rounding aside); the int8 step of the activation is
    shared more evenly by its channels. ``forward(model, batch)`` runs one calibration batch
    (default ``model(batch)``)."""
    model = copy.deepcopy(model).eval()
    pairs = equalized_pairs(model)
    if not pairs:
        return model
    maxima = _channel_maxima(model, [b.reparam_conv for _, b in pairs], calibration, forward)
    for (first, second), largest in zip(pairs, maxima):
        conv_a, conv_b = first.reparam_conv, second.reparam_conv
        power = 1.0 if _is_depthwise(conv_b) else dense_migration
        scale = torch.where(largest > 0, (largest.max() / largest.clamp(min=1e-30)) ** power, torch.ones_like(largest))
        scale = scale.clamp(max=MAX_CHANNEL_SCALE)
        conv_a.weight.copy_((conv_a.weight.double() * scale.view(-1, 1, 1, 1)).to(conv_a.weight.dtype))
        conv_a.bias.copy_((conv_a.bias.double() * scale).to(conv_a.bias.dtype))
        if _is_depthwise(conv_b):
            conv_b.weight.copy_((conv_b.weight.double() / scale.view(-1, 1, 1, 1)).to(conv_b.weight.dtype))
        else:
            groups, per_group = conv_b.groups, conv_b.in_channels // conv_b.groups
            columns = scale.view(groups, 1, per_group).expand(groups, conv_b.out_channels // groups, per_group)
            conv_b.weight.copy_((conv_b.weight.double() / columns.reshape(conv_b.out_channels, per_group, 1, 1)).to(conv_b.weight.dtype))
    return model


def int8_weights(weight: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """``weight`` rounded as symmetric per-output-channel int8 quantizers round it (onnxruntime's,
    XNNPACK's): step = largest magnitude of the channel / ``levels`` (127; 64 with onnxruntime's
    ``reduce_range``), then back to float."""
    step = weight.detach().flatten(1).abs().amax(1).clamp(min=1e-30) / levels
    step = step.view(-1, *[1] * (weight.dim() - 1))
    return torch.clamp(torch.round(weight / step), -levels, levels) * step


def _quantized_layers(model: nn.Module, modules: Sequence[str] | None) -> Iterator[nn.Module]:
    """The convolutions and linear layers with a bias, inside the submodules named ``modules`` if given."""
    roots = [model.get_submodule(name) for name in modules] if modules else [model]
    seen: set[int] = set()
    for root in roots:
        for module in root.modules():
            if type(module) in (nn.Conv2d, nn.Linear) and module.bias is not None and id(module) not in seen:
                seen.add(id(module))
                yield module


@torch.no_grad()
def correct_weight_rounding_bias(model: nn.Module, calibration: Iterable[Any], levels: int = 127,
                                 forward: Callable[[nn.Module, Any], None] = _call, modules: Sequence[str] | None = None) -> nn.Module:
    """A copy of ``model`` (fused, eval mode) in which every convolution and linear layer with a
    bias has it lowered by the mean, per output channel, of what rounding its weights to int8
    (``int8_weights``) adds to its output, measured on the float inputs the layer sees on
    ``calibration``. Unbiased layers are left as they are; with ``modules`` (submodule names: the
    part of the network that will be quantized) only the layers inside them are corrected."""
    model = copy.deepcopy(model).eval()
    layers = list(_quantized_layers(model, modules))
    shifts: list[torch.Tensor | None] = [None] * len(layers)
    counts = [0] * len(layers)
    errors = [int8_weights(layer.weight, levels) - layer.weight for layer in layers]

    def record(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            if isinstance(module, nn.Linear):
                added = F.linear(x, errors[index]).reshape(-1, module.out_features)
            else:
                added = module._conv_forward(x, errors[index], None).transpose(0, 1).reshape(module.out_channels, -1).t()
            total = added.double().sum(0)
            shifts[index] = total if shifts[index] is None else shifts[index] + total
            counts[index] += added.shape[0]
        return hook

    _calibrate_with_input_hooks(model, layers, record, calibration, forward)
    for layer, shift, count in zip(layers, shifts, counts):
        if shift is not None:
            layer.bias.sub_((shift / count).to(layer.bias.dtype))
    return model


def prepare_for_int8(model: nn.Module, calibration: Iterable[Any], levels: int | None = 127, dense_migration: float = DENSE_MIGRATION,
                     forward: Callable[[nn.Module, Any], None] = _call, modules: Sequence[str] | None = None) -> nn.Module:
    """``equalize_activations`` then ``correct_weight_rounding_bias`` (of the layers in ``modules``, if
    given): a copy of ``model`` computing the same function, ready for a per-channel int8 quantizer
    whose weights have ``levels`` steps each side of 0 (127; 64 for onnxruntime's ``reduce_range``;
    None for asymmetric weights: no bias correction)."""
    calibration = list(calibration)
    equalized = equalize_activations(model, calibration, dense_migration, forward)
    if levels is None:
        return equalized
    return correct_weight_rounding_bias(equalized, calibration, levels, forward, modules)
