"""A callback for ``tests/test_resume.py``: logs ``val/constant`` = 1.0 after every validation, a
monitored metric that never improves after the first epoch."""

import lightning.pytorch as pl


class ConstantMetric(pl.Callback):
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("val/constant", 1.0)
