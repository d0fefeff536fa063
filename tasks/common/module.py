"""Behaviour the tasks' LightningModules share."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class ChannelsLastMixin:
    """``channels_last`` hyperparameter support for a LightningModule, applied on CUDA devices only.

    On CPU (torch 2.14.1, oneDNN) the backward of a channels-last 1x1 stride-2 convolution with few
    input channels - MobileOne's stem scale branch - corrupts the heap ("corrupted size vs.
    prev_size"), and CPUs gain nothing from the format; it is skipped there with a log line.
    """

    @property
    def uses_channels_last(self) -> bool:
        return bool(self.hparams.channels_last) and self.device.type == "cuda"

    def on_fit_start(self) -> None:
        if self.uses_channels_last:
            self.to(memory_format=torch.channels_last)
        elif self.hparams.channels_last:
            log.warning("channels_last is applied on CUDA devices only; training in contiguous format on %s", self.device)
