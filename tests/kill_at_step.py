"""A callback that SIGKILLs its own training process at a given step, for the resume tests."""

import os
import signal

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """Kill the process (no cleanup, like a preempted node) before optimizer step ``step`` runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
