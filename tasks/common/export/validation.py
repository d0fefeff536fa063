"""The task's validation run with an exported file's runner in place of the trained network."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import lightning.pytorch as pl
from torch import nn


@contextlib.contextmanager
def _only_warnings_from(*names: str) -> Iterator[None]:
    """Raise the named loggers to WARNING inside the context."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# What an evaluation Trainer would print: "GPU available: ...", "LOCAL_RANK ...", and the tasks' result
# tables (the export logs one line per evaluated file instead; model.json keeps every metric).
_EVALUATION_NOISE = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "tasks")


def validation_metrics(
    model: pl.LightningModule, datamodule: pl.LightningDataModule, network: nn.Module, limit_batches: int | None = None
) -> dict[str, float]:
    """The task's validation metrics when ``network`` (the export form: preprocessed images in,
    the exported outputs out) runs in place of the trained network (``model.validating_with``),
    on CPU, on the whole validation split or its first ``limit_batches`` batches."""
    attached = model._trainer, datamodule.trainer
    try:
        with _only_warnings_from(*_EVALUATION_NOISE), model.validating_with(network):
            evaluator = pl.Trainer(
                accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=limit_batches or 1.0,
            )
            (metrics,) = evaluator.validate(model, datamodule=datamodule, verbose=False)
    finally:
        model.trainer, datamodule.trainer = attached
    return {key: float(value) for key, value in metrics.items()}
