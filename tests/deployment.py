"""Shared by the tests of INT8 and ExecuTorch exports.

``needs_executorch``: marks a test ``executorch`` and skips it where the optional ``executorch``
package is absent, unless ``MOBILEONE_REQUIRE_EXECUTORCH=1`` (CI), where the tests run and fail on
the import.

``with_data_batchnorm``: a test checkpoint whose BatchNorm statistics match its weights, as a
trained network's do. The tests' networks train for a few steps only: their running statistics are still near the
initial ones while the weights have moved, so activations grow by orders of magnitude from layer
to layer in eval mode. Float exports reproduce that exactly, but INT8 cannot: XNNPACK refuses
quantization scales that far apart. The statistics are recomputed here as a plain average over
a few batches of normalized inputs, the way a longer training would have settled them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones.runtimes import executorch_available

_skip_without_executorch = pytest.mark.skipif(
    not executorch_available() and not os.environ.get("MOBILEONE_REQUIRE_EXECUTORCH"),
    reason='executorch is not installed: pip install -e ".[executorch]" (CI installs it)',
)


def needs_executorch(test):  # noqa: ANN001, ANN201 (a pytest decorator)
    """Marks ``test`` ``executorch`` (CI's second run selects those) and skips it without the package."""
    return pytest.mark.executorch(_skip_without_executorch(test))


def with_data_batchnorm(checkpoint: Path, task_class: type, network_of, image_size: int | tuple[int, int], output: Path) -> Path:
    """Write to ``output`` a copy of ``checkpoint`` whose BatchNorm statistics are averaged over
    4 batches of 4 normal inputs through ``network_of(task)`` in train mode; return ``output``."""
    task = task_class.load_from_checkpoint(checkpoint, map_location="cpu")
    network = network_of(task)
    network.train()
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            network(torch.randn(4, 3, *size, generator=generator))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["state_dict"] = task.state_dict()
    torch.save(state, output)
    return output
