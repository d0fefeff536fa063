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

- ``round_weights_for_output_error`` (instead of nearest rounding and bias correction): each
  layer's weights rounded column by column, every column's rounding error compensated in the
  columns not yet rounded through the inverse of the layer's input second moments (Frantar et al.'s
  GPTQ, 2023), the mean error left moved into the bias. It matters where weights are coarse:
  onnxruntime's ``reduce_range`` (64 levels each side).

``prepare_for_int8`` applies them; the export (``tasks.common.export``) quantizes its copy by default,
and for a MobileOne classifier also searches the activation ranges for the logits' error
(``prepare_with_searched_ranges``, below the quantization-aware simulation it runs on).
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
    "DENSE_MIGRATION", "RANGE_FRACTIONS", "ActivationQuantizer", "Int8SimulatedConv2d", "Int8SimulatedLinear",
    "activation_range", "activation_scale_and_zero_point", "calibrate_int8_simulation", "correct_weight_rounding_bias", "equalization_scales",
    "equalize_activations", "equalized_pairs", "int8_simulation_sites", "int8_simulation_unsupported", "int8_weights", "prepare_for_int8",
    "prepare_with_searched_ranges", "remove_int8_simulation", "round_weights_for_output_error", "search_activation_ranges", "simulate_int8",
]

WEIGHT_ROUNDINGS = ("nearest", "output_error")  # nearest + bias correction; GPTQ-style (round_weights_for_output_error)
GPTQ_DAMPING = 0.01  # of the mean diagonal of a layer's input second moments, added to it (GPTQ's default)
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
def equalization_scales(model: nn.Module, calibration: Iterable[Any], dense_migration: float = DENSE_MIGRATION,
                        forward: Callable[[nn.Module, Any], None] = _call) -> list[tuple[MobileOneBlock, MobileOneBlock, torch.Tensor]]:
    """For each pair of ``equalized_pairs(model)`` (fused, eval mode): ``(first, second, t)``, ``t`` the
    float64 per-channel factor ``equalize_activations`` multiplies the connecting activation by."""
    pairs = equalized_pairs(model)
    if not pairs:
        return []
    maxima = _channel_maxima(model, [b.reparam_conv for _, b in pairs], calibration, forward)
    scales = []
    for (first, second), largest in zip(pairs, maxima):
        power = 1.0 if _is_depthwise(second.reparam_conv) else dense_migration
        scale = torch.where(largest > 0, (largest.max() / largest.clamp(min=1e-30)) ** power, torch.ones_like(largest))
        scales.append((first, second, scale.clamp(max=MAX_CHANNEL_SCALE)))
    return scales


def _input_columns(conv: nn.Conv2d | nn.Linear, per_input_channel: torch.Tensor) -> torch.Tensor:
    """``per_input_channel`` (one value per input channel) laid out as ``conv.weight``'s input
    dimension, broadcastable against the weight (grouped convolutions included)."""
    if isinstance(conv, nn.Linear):
        return per_input_channel.view(1, -1)
    groups, per_group = conv.groups, conv.in_channels // conv.groups
    columns = per_input_channel.view(groups, 1, per_group).expand(groups, conv.out_channels // groups, per_group)
    return columns.reshape(conv.out_channels, per_group, 1, 1)


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
    for first, second, scale in equalization_scales(model, calibration, dense_migration, forward):
        conv_a, conv_b = first.reparam_conv, second.reparam_conv
        conv_a.weight.copy_((conv_a.weight.double() * scale.view(-1, 1, 1, 1)).to(conv_a.weight.dtype))
        conv_a.bias.copy_((conv_a.bias.double() * scale).to(conv_a.bias.dtype))
        conv_b.weight.copy_((conv_b.weight.double() / _input_columns(conv_b, scale)).to(conv_b.weight.dtype))
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


def _patches(layer: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (groups, inputs per output of a group, samples): the columns its weights multiply."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, layer.in_features).t().unsqueeze(0)
    columns = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    count, width, positions = columns.shape
    return columns.view(count, layer.groups, width // layer.groups, positions).permute(1, 2, 0, 3).reshape(layer.groups, width // layer.groups, -1)


def _round_layer_for_output_error(layer: nn.Conv2d | nn.Linear, second: torch.Tensor, mean: torch.Tensor, levels: int) -> None:
    """GPTQ on one layer, in place: ``second`` its input columns' second moments per group, ``mean`` their means."""
    original = layer.weight.detach().double().flatten(1)
    groups, width = mean.shape
    weights = original.view(groups, -1, width).clone()
    step = (original.abs().amax(1).clamp(min=1e-30) / levels).view(groups, -1)
    diagonal = torch.diagonal(second, dim1=-2, dim2=-1)
    damped = second + torch.diag_embed((diagonal <= 0).double() + GPTQ_DAMPING * diagonal.mean(-1, keepdim=True).expand(-1, width))
    inverse_root = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    codes = torch.zeros_like(weights)
    for column in range(width):
        value = weights[:, :, column]
        chosen = torch.clamp(torch.round(value / step), -levels, levels)
        codes[:, :, column] = chosen
        error = (value - chosen * step) / inverse_root[:, column, column].unsqueeze(1)
        weights[:, :, column + 1:] -= error.unsqueeze(-1) * inverse_root[:, column, column + 1:].unsqueeze(1)
    flat = codes.view(original.shape)
    # keep each channel's largest weight at +-levels steps: the quantizer derives the step from it
    largest = original.abs().argmax(1)
    rows = torch.arange(len(flat))
    flat[rows, largest] = torch.where(flat.abs().amax(1) < levels, torch.sign(original[rows, largest]) * levels, flat[rows, largest])
    rounded = flat * step.reshape(-1, 1)
    shift = torch.einsum("gow,gw->go", (original - rounded).view(groups, -1, width), mean).reshape(-1)
    layer.weight.copy_(rounded.view_as(layer.weight).to(layer.weight.dtype))
    layer.bias.add_(shift.to(layer.bias.dtype))


@torch.no_grad()
def round_weights_for_output_error(model: nn.Module, calibration: Iterable[Any], levels: int = 127,
                                   forward: Callable[[nn.Module, Any], None] = _call, modules: Sequence[str] | None = None) -> nn.Module:
    """A copy of ``model`` (fused, eval mode) whose convolution and linear layers with a bias (inside
    ``modules`` if given) hold weights already on their symmetric per-output-channel grid of
    ``levels`` steps (``int8_weights`` leaves them unchanged), each layer rounded column by column
    with GPTQ's error compensation on the float inputs it sees on ``calibration``, and its bias
    shifted by the mean output error left (the role of ``correct_weight_rounding_bias``)."""
    model = copy.deepcopy(model).eval()
    layers = list(_quantized_layers(model, modules))
    moments: list[torch.Tensor | None] = [None] * len(layers)
    sums: list[torch.Tensor | None] = [None] * len(layers)
    counts = [0] * len(layers)

    def record(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            columns = _patches(module, args[0].detach().float())
            second, first = torch.einsum("gil,gjl->gij", columns, columns).double(), columns.sum(-1).double()
            moments[index] = second if moments[index] is None else moments[index] + second
            sums[index] = first if sums[index] is None else sums[index] + first
            counts[index] += columns.shape[-1]
        return hook

    _calibrate_with_input_hooks(model, layers, record, calibration, forward)
    for layer, second, first, count in zip(layers, moments, sums, counts):
        if second is not None:
            _round_layer_for_output_error(layer, second / count, first / count, levels)
    return model


def _rounded_for_int8(model: nn.Module, calibration: list[Any], levels: int, forward: Callable[[nn.Module, Any], None],
                      modules: Sequence[str] | None, weight_rounding: str) -> nn.Module:
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise ValueError(f"weight rounding {weight_rounding!r}: expected one of {WEIGHT_ROUNDINGS}")
    if weight_rounding == "output_error":
        return round_weights_for_output_error(model, calibration, levels, forward, modules)
    return correct_weight_rounding_bias(model, calibration, levels, forward, modules)


def prepare_for_int8(model: nn.Module, calibration: Iterable[Any], levels: int | None = 127, dense_migration: float = DENSE_MIGRATION,
                     forward: Callable[[nn.Module, Any], None] = _call, modules: Sequence[str] | None = None,
                     weight_rounding: str = "nearest") -> nn.Module:
    """``equalize_activations`` then, for the layers in ``modules`` if given, ``correct_weight_rounding_bias``
    (``weight_rounding="nearest"``) or ``round_weights_for_output_error`` (``"output_error"``): a copy of
    ``model`` computing the same function (up to the weights' rounding with ``"output_error"``), ready for a
    per-channel int8 quantizer whose weights have ``levels`` steps each side of 0 (127; 64 for
    onnxruntime's ``reduce_range``; None for asymmetric weights: equalization only)."""
    calibration = list(calibration)
    equalized = equalize_activations(model, calibration, dense_migration, forward)
    if levels is None:
        return equalized
    return _rounded_for_int8(equalized, calibration, levels, forward, modules, weight_rounding)


# Quantization-aware training: the fused network computing what its INT8 file will compute.
#
# ``simulate_int8`` gives a fused MobileOne classifier the arithmetic of its onnxruntime INT8 file:
# every convolution and linear layer uses its weights rounded per output channel (``int8_weights``),
# and every tensor that onnxruntime's QDQ quantizer quantizes (each layer's input, the last block's
# output, the logits) goes through an int8 quantize-dequantize with a fixed scale and zero point
# (asymmetric, [-128, 127]). Rounding passes gradients straight through (the straight-through
# estimator), so the float weights can be trained to suit the rounding. The equalization of
# ``equalize_activations`` is kept as fixed per-channel factors beside the weights instead of being
# applied to them: the trained parameters stay those of the original network (well conditioned for
# SGD), and the quantizers see the equalized weights and activations. ``int8_simulation_sites`` gives
# the scales and zero points to write into the INT8 file (``backbones.runtimes.quantize_onnx``'s
# ``activation_quantization``), ``remove_int8_simulation`` the plain fused network with the
# equalization applied: the float32 network that file quantizes.

ACTIVATION_QMIN, ACTIVATION_QMAX = -128, 127  # onnxruntime's int8 activations (s8s8, reduce_range)
ACTIVATION_PERCENTILE = 99.999  # the range a quantizer covers, as onnxruntime's percentile calibration


def _round_straight_through(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def activation_scale_and_zero_point(low: float, high: float) -> tuple[float, int]:
    """The int8 (asymmetric, [-128, 127]) scale and zero point covering ``[low, high]`` widened to
    hold 0, as onnxruntime computes them from a calibrated range."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / (ACTIVATION_QMAX - ACTIVATION_QMIN)
    if not scale > 0:
        scale = 1.0
    scale = float(torch.tensor(scale, dtype=torch.float32))  # the value a float32 scale in the file holds
    zero_point = int(round(ACTIVATION_QMIN - low / scale))
    return scale, max(ACTIVATION_QMIN, min(ACTIVATION_QMAX, zero_point))


def activation_range(scale: float, zero_point: int | float) -> tuple[float, float]:
    """The (low, high) that an int8 (asymmetric, [-128, 127]) scale and zero point cover: the inverse
    of ``activation_scale_and_zero_point``."""
    return (ACTIVATION_QMIN - float(zero_point)) * float(scale), (ACTIVATION_QMAX - float(zero_point)) * float(scale)


class ActivationQuantizer(nn.Module):
    """Per-tensor int8 quantize-dequantize with a fixed scale and zero point (buffers, in the
    checkpoint); the identity until ``calibrated``. While ``observed`` is a list, it records each
    batch's (low, high) percentile range instead and passes the input through."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("calibrated", torch.tensor(False))
        self.observed: list[tuple[float, float]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed is not None:
            values = x.detach().flatten().float()
            k = max(1, int(values.numel() * (1 - ACTIVATION_PERCENTILE / 100)))
            self.observed.append((float(-(-values).topk(k).values[-1]), float(values.topk(k).values[-1])))
            return x
        if not bool(self.calibrated):
            return x
        return self.integers(x) * self.scale

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s int8 codes less the zero point (integer-valued floats; straight-through gradient)."""
        q = torch.clamp(_round_straight_through(x / self.scale) + self.zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX)
        return q - self.zero_point

    def set_range(self, low: float, high: float) -> None:
        scale, zero_point = activation_scale_and_zero_point(low, high)
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)
        self.calibrated.fill_(True)

    def range(self) -> tuple[float, float]:
        """The (low, high) the quantizer covers (``set_range``'s, widened to hold 0)."""
        return activation_range(float(self.scale), float(self.zero_point))

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}" if bool(self.calibrated) else "not calibrated"


class _Int8SimulatedLayer:
    """What the simulated convolution and linear layers share: fixed equalization factors
    (``output_scale`` per output channel, ``input_scale`` per input channel), weights rounded to
    ``weight_levels`` per output channel, an ``input_quantizer`` and an optional ``output_quantizer``."""

    weight: nn.Parameter
    bias: nn.Parameter
    weight_levels: int

    def _add_simulation(self, levels: int, in_features: int, out_features: int, quantize_output: bool) -> None:
        self.weight_levels = levels
        self.register_buffer("output_scale", torch.ones(out_features))
        self.register_buffer("input_scale", torch.ones(in_features))
        self.input_quantizer = ActivationQuantizer()
        self.output_quantizer = ActivationQuantizer() if quantize_output else nn.Identity()

    def equalized_weight(self) -> torch.Tensor:
        """The weight the INT8 file holds before rounding: equalization factors applied."""
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return self.weight * self.output_scale.view(shape) / _input_columns(self, self.input_scale)

    def equalized_bias(self) -> torch.Tensor:
        return self.bias * self.output_scale

    def simulated_weight(self) -> torch.Tensor:
        weight = self.equalized_weight()
        return weight + (int8_weights(weight, self.weight_levels) - weight).detach()

    def _simulated_forward(self, x: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``op`` (the layer's convolution or matrix product, without bias) as the INT8 kernel computes
        it once the input quantizer is calibrated: integer input codes times integer weight codes
        (exact sums in float32 below 2**24), plus the bias rounded to the int32 step
        ``input scale x weight scale``, times that step."""
        quantizer = self.input_quantizer
        if not bool(quantizer.calibrated) or quantizer.observed is not None:
            return op(quantizer(x), self.simulated_weight()) + _channels(self.equalized_bias(), x.dim())
        weight = self.equalized_weight()
        weight_step = weight.detach().flatten(1).abs().amax(1).clamp(min=1e-30) / self.weight_levels
        codes = torch.clamp(_round_straight_through(weight / weight_step.view((-1,) + (1,) * (weight.dim() - 1))),
                            -self.weight_levels, self.weight_levels)
        step = quantizer.scale * weight_step  # float32, as onnxruntime's bias scale
        bias = _round_straight_through(self.equalized_bias() / step)
        return (op(quantizer.integers(x), codes) + _channels(bias, x.dim())) * _channels(step, x.dim())


def _channels(per_channel: torch.Tensor, dims: int) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over an NC... (``dims``-dimensional) output."""
    return per_channel.view((1, -1) + (1,) * (dims - 2))


class Int8SimulatedConv2d(_Int8SimulatedLayer, nn.Conv2d):
    """``nn.Conv2d`` computing as its INT8 form does (see ``simulate_int8``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(self._simulated_forward(x, lambda x, weight: self._conv_forward(x, weight, None)))


class Int8SimulatedLinear(_Int8SimulatedLayer, nn.Linear):
    """``nn.Linear`` computing as its INT8 form does (see ``simulate_int8``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(self._simulated_forward(x, F.linear))


class _QuantizedOutput(nn.Module):
    """``module`` followed by an ``ActivationQuantizer`` (the last block's activation)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.output_quantizer = ActivationQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(self.module(x))


def _simulated_copy(layer: nn.Conv2d | nn.Linear, levels: int, quantize_output: bool) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        new: nn.Module = Int8SimulatedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                                             layer.dilation, layer.groups, True, layer.padding_mode, device="meta")
        new._add_simulation(levels, layer.in_channels, layer.out_channels, quantize_output)
    else:
        new = Int8SimulatedLinear(layer.in_features, layer.out_features, True, device="meta")
        new._add_simulation(levels, layer.in_features, layer.out_features, quantize_output)
    new.weight, new.bias = layer.weight, layer.bias
    return new.to(layer.weight.device)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_simulated_network(model: nn.Module) -> MobileOne:
    if not isinstance(model, MobileOne) or model.out_indices is not None:
        raise ValueError(f"INT8 simulation is defined for a MobileOne classifier (returning logits), got {type(model).__name__}"
                         + (f" returning feature levels {model.out_indices}" if isinstance(model, MobileOne) else ""))
    blocks = [m for m in model.modules() if isinstance(m, MobileOneBlock)]
    if not blocks or not all(b.inference_mode for b in blocks):
        raise ValueError("INT8 simulation needs the fused (inference-form) network: reparameterize it first")
    if any(not isinstance(b.se, nn.Identity) for b in blocks):
        raise ValueError("INT8 simulation does not cover squeeze-excitation blocks (use_se): their Mul / Sigmoid quantization is not simulated")
    return model


def int8_simulation_unsupported(model: nn.Module) -> str | None:
    """Why ``simulate_int8`` cannot model ``model`` (None: it can)."""
    try:
        _check_simulated_network(model)
    except ValueError as error:
        return str(error)
    return None


def simulate_int8(model: nn.Module, levels: int = 127) -> nn.Module:
    """A copy of ``model`` (a fused MobileOne classifier without squeeze-excitation) whose layers
    compute as onnxruntime's INT8 QDQ file of it does: weights rounded to ``levels`` per output
    channel (127 for s8s8 and XNNPACK, 64 for ``reduce_range``), and an ``ActivationQuantizer`` on
    every tensor that file quantizes (each layer's input: the image and every block's output; the
    last block's output; the logits). The quantizers pass values through until calibrated
    (``calibrate_int8_simulation``). Parameters are the original network's; buffers hold the
    equalization factors and the quantizers' ranges."""
    model = copy.deepcopy(_check_simulated_network(model)).eval()
    layers = dict((name, module) for name, module in model.named_modules() if id(module) in {id(m) for m in _quantized_layers(model, None)})
    for name, layer in layers.items():
        _set_submodule(model, name, _simulated_copy(layer, levels, quantize_output=isinstance(layer, nn.Linear)))
    last = [m for m in model.modules() if isinstance(m, MobileOneBlock)][-1]
    last.activation = _QuantizedOutput(last.activation)
    return model


def _simulated_layers(model: nn.Module) -> list[tuple[str, _Int8SimulatedLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _Int8SimulatedLayer)]


@torch.no_grad()
def calibrate_int8_simulation(model: nn.Module, calibration: Iterable[Any], dense_migration: float = DENSE_MIGRATION,
                              forward: Callable[[nn.Module, Any], None] = _call, weight_rounding: str = "nearest") -> nn.Module:
    """Prepare ``simulate_int8``'s network on ``calibration`` (in place; returned): the equalization
    factors of ``equalize_activations``, each layer's bias corrected for its weights' int8 rounding
    (``correct_weight_rounding_bias``; with ``weight_rounding="output_error"`` its weights replaced by
    ``round_weights_for_output_error``'s instead, expressed before the equalization factors), then each
    quantizer's range: the mean over batches of the batch's 0.001 % / 99.999 % percentiles. Every
    quantizer is recalibrated."""
    calibration = list(calibration)
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    for quantizer in quantizers:
        quantizer.calibrated.fill_(False)
    plain = remove_int8_simulation(model)
    names = {id(m): name for name, m in plain.named_modules()}
    layers = dict(_simulated_layers(model))
    for first, second, scale in equalization_scales(plain, calibration, dense_migration, forward):
        layers[names[id(first.reparam_conv)]].output_scale.mul_(scale.to(torch.float32))
        layers[names[id(second.reparam_conv)]].input_scale.mul_(scale.to(torch.float32))
    levels = {m.weight_levels for m in layers.values()}
    rounded = _rounded_for_int8(remove_int8_simulation(model), calibration, levels.pop() if len(levels) == 1 else 127, forward, None,
                                weight_rounding)
    for name, layer in layers.items():
        if weight_rounding == "output_error":  # undo the factors: equalized_weight() gives back the rounded weights
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            on_grid = rounded.get_submodule(name).weight.double()
            layer.weight.copy_(on_grid / layer.output_scale.double().view(shape) * _input_columns(layer, layer.input_scale.double()))
        layer.bias.copy_(rounded.get_submodule(name).bias / layer.output_scale)
    for quantizer in quantizers:
        quantizer.observed = []
    try:
        for batch in calibration:
            forward(model, batch)
        for quantizer in quantizers:
            if not quantizer.observed:
                raise ValueError("the calibration batches never reached some of the quantized tensors (or none were given)")
            lows, highs = zip(*quantizer.observed)
            quantizer.set_range(sum(lows) / len(lows), sum(highs) / len(highs))
    finally:
        for quantizer in quantizers:
            quantizer.observed = None
    return model


@torch.no_grad()
def remove_int8_simulation(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every simulated layer back to a plain ``nn.Conv2d`` / ``nn.Linear``
    holding its equalized float weights and bias (computed in float64), and no quantizer: the
    float32 network whose INT8 file ``simulate_int8``'s network computes."""
    model = copy.deepcopy(model)
    for name, layer in _simulated_layers(model):
        if isinstance(layer, nn.Conv2d):
            plain: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                                         layer.dilation, layer.groups, True, layer.padding_mode)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        weight = layer.weight.double() * layer.output_scale.double().view(shape) / _input_columns(layer, layer.input_scale.double())
        plain.weight = nn.Parameter(weight.to(layer.weight.dtype))
        plain.bias = nn.Parameter((layer.bias.double() * layer.output_scale.double()).to(layer.bias.dtype))
        _set_submodule(model, name, plain.to(layer.weight.device))
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantizedOutput)]:
        _set_submodule(model, name, module.module)
    return model


def int8_simulation_sites(model: nn.Module) -> list[dict[str, Any]]:
    """The calibrated quantizers of ``simulate_int8``'s network as the INT8 export needs them:
    ``{"module": <submodule name of the plain network>, "tensor": "input" | "output", "scale": float,
    "zero_point": int}`` (the input of a convolution / linear layer, or the output of a layer or of
    the last block's activation)."""
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, _Int8SimulatedLayer):
            quantizers = [("input", module.input_quantizer), ("output", module.output_quantizer)]
        elif isinstance(module, _QuantizedOutput):
            quantizers = [("output", module.output_quantizer)]
        else:
            continue
        for tensor, quantizer in quantizers:
            if isinstance(quantizer, ActivationQuantizer):
                if not bool(quantizer.calibrated):
                    raise ValueError(f"the {tensor} quantizer of {name} is not calibrated (calibrate_int8_simulation)")
                sites.append({"module": name, "tensor": tensor, "scale": float(quantizer.scale), "zero_point": int(quantizer.zero_point)})
    return sites


# Activation ranges chosen for the logits' error. A calibrated range covers (nearly) every value a tensor
# takes; where a few large values stretch it, the int8 step erases the small ones, which the rest of the
# network may need more than it needs the large ones to stay exact. On Apple's S0 the input of the last
# pointwise layer of stage 3 is such a tensor: clipped to about a third of its 99.999th percentile, the
# logits' error of that tensor alone in int8 halves (benchmarks/RESULTS.md, "Activation ranges searched
# for the logits' error"), while a criterion local to the layer (its own output's error) prefers the full
# range. So the search measures the logits.

RANGE_FRACTIONS = (0.85, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2)  # of a calibrated range, each tried
RANGE_SEARCH_IMAGES = 64  # calibration images the search measures the logits' error on


def _forward_units(model: MobileOne) -> list[nn.Module | Callable[[torch.Tensor], torch.Tensor]]:
    """The network as a chain: every block of every stage, then the head (pooling, classifier)."""
    units: list[nn.Module | Callable[[torch.Tensor], torch.Tensor]] = []
    for stage in model.stages:
        units.extend(stage.children() if isinstance(stage, nn.Sequential) else [stage])
    return units + [model.forward_head]


def _quantizers_in_call_order(model: nn.Module, images: torch.Tensor) -> list[ActivationQuantizer]:
    """The quantizers of a ``simulate_int8`` network in the order its forward applies them (a calibrated
    layer applies its input quantizer through ``integers``, not by calling it: the layers are hooked)."""
    order: list[ActivationQuantizer] = []
    handles = []
    for module in model.modules():
        if isinstance(module, _Int8SimulatedLayer):
            handles.append(module.register_forward_pre_hook(lambda m, args: order.append(m.input_quantizer)))
        if isinstance(module, (_Int8SimulatedLayer, _QuantizedOutput)) and isinstance(module.output_quantizer, ActivationQuantizer):
            handles.append(module.register_forward_hook(lambda m, args, output: order.append(m.output_quantizer)))
    try:
        model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def search_activation_ranges(model: nn.Module, float_model: nn.Module, images: torch.Tensor,
                             fractions: Sequence[float] = RANGE_FRACTIONS) -> list[dict[str, Any]]:
    """Narrow the ranges of ``model``'s quantizers (a ``simulate_int8`` network, calibrated by
    ``calibrate_int8_simulation``; changed in place) where that brings its logits on ``images``
    closer to ``float_model``'s (relative error ``||y_int8 - y|| / ||y||``).

    Greedy, in the order the network computes: each quantizer's range is scaled by each of
    ``fractions`` (every quantizer before it already chosen, every one after it as calibrated) and
    keeps the one with the lowest error, or its own. Only the blocks from the quantizer's on are
    recomputed. Returns one row per quantizer: ``{"module", "tensor", "fraction", "error"}`` (the
    error with the choice made)."""
    _check_simulated_network(model)
    model.eval()
    images = images.float()
    reference = float_model.eval()(images)
    units = _forward_units(model)
    owner = {}  # quantizer -> index of the unit that computes it
    for index, unit in enumerate(units):
        for module in (unit.modules() if isinstance(unit, nn.Module) else model.linear.modules()):
            owner.setdefault(id(module), index)
    sites = {}  # quantizer -> (module, "input" | "output"), as int8_simulation_sites names them
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer):
            owner_name, _, attribute = name.rpartition(".")
            sites[id(module)] = (owner_name, attribute.removesuffix("_quantizer"))

    def error_from(index: int, x: torch.Tensor) -> float:
        for unit in units[index:]:
            x = unit(x)
        return float((x - reference).norm() / reference.norm())

    rows = []
    x, computed = images, 0  # x: the input of units[computed]
    for quantizer in _quantizers_in_call_order(model, images):
        index = owner[id(quantizer)]
        for unit in units[computed:index]:
            x = unit(x)
        computed = index
        low, high = quantizer.range()
        best_fraction, best_error = 1.0, error_from(index, x)
        for fraction in fractions:  # every one: the error is not monotone in the range (each step rounds differently)
            quantizer.set_range(low * fraction, high * fraction)
            error = error_from(index, x)
            if error < best_error:
                best_fraction, best_error = fraction, error
        quantizer.set_range(low * best_fraction, high * best_fraction)
        module, tensor = sites[id(quantizer)]
        rows.append({"module": module, "tensor": tensor, "fraction": best_fraction, "error": best_error})
    return rows


def prepare_with_searched_ranges(model: nn.Module, calibration: Iterable[torch.Tensor], levels: int = 127,
                                 search_images: int = RANGE_SEARCH_IMAGES,
                                 weight_rounding: str = "nearest") -> tuple[nn.Module, list[dict[str, Any]] | None, dict[str, Any]]:
    """``prepare_for_int8``'s transforms (through ``calibrate_int8_simulation``, with ``weight_rounding``) for ``model``, a fused
    MobileOne classifier, and activation ranges searched for the logits' error
    (``search_activation_ranges``) on the first calibration images (half of them, at most
    ``search_images``), kept only if they also lower the error on the other calibration images.

    Returns the prepared float32 network, its INT8 file's activation ranges (``int8_simulation_sites``,
    for ``quantize_onnx`` / ``to_executorch``'s ``activation_quantization``; None where the search was
    not kept: calibrate as usual) and a report: the narrowed rows, the check images' count and their
    logits' error with the calibrated and the searched ranges, and whether the search was kept."""
    calibration = list(calibration)
    simulation = calibrate_int8_simulation(simulate_int8(model, levels), calibration, weight_rounding=weight_rounding)
    images = torch.cat([torch.as_tensor(batch) for batch in calibration]).float()
    searched = min(search_images, len(images) // 2)
    if searched < 1:
        raise ValueError(f"the range search needs at least 2 calibration images (one to search on, one to check), got {len(images)}")
    search, check = images[:searched], images[searched:]
    with torch.no_grad():
        reference = torch.cat([model.eval()(part) for part in check.split(32)])

        def check_error() -> float:
            return float((torch.cat([simulation(part) for part in check.split(32)]) - reference).norm() / reference.norm())

        calibrated = copy.deepcopy(simulation.state_dict())
        error_before = check_error()
        rows = search_activation_ranges(simulation, model, search)
        error_after = check_error()
    kept = error_after < error_before
    if not kept:
        simulation.load_state_dict(calibrated)
    report = {"search_images": len(search), "check_images": len(check), "check_error_calibrated": error_before,
              "check_error_searched": error_after, "kept": kept, "narrowed": [row for row in rows if row["fraction"] < 1.0]}
    return remove_int8_simulation(simulation), int8_simulation_sites(simulation) if kept else None, report
