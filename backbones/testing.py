"""Helpers shared by the tests and the benchmark scripts: non-default BatchNorm statistics
(and ``relative_error``, the metric of ``backbones.export``, for the tests' convenience)."""

from __future__ import annotations

import torch
from torch import nn

from backbones.export import relative_error

__all__ = ["randomize_batchnorm", "relative_error"]


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-default statistics and affine parameters, in place; returns ``model``.

    running mean ~ U(-0.5, 0.5), running var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ U(-0.5, 0.5).
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * (high - low) + low
        tensor.copy_(values.to(tensor.dtype))

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            uniform(module.running_mean, -0.5, 0.5)
            uniform(module.running_var, 0.5, 2.0)
            uniform(module.weight, 0.5, 1.5)
            uniform(module.bias, -0.5, 0.5)
    return model
