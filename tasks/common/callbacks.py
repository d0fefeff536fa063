"""Callbacks the recipes need: checkpoints that always keep the last state, weight-decay annealing,
progressive resolution, export at the end of fit."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from tasks.common.export import export_task

__all__ = ["CosineWeightDecay", "ExportOnFitEnd", "FreezeBatchNormStatistics", "ProgressiveResolution", "TaskCheckpoint"]

# the keyword options of export_task (those of the export subcommand)
EXPORT_OPTIONS = tuple(name for name, p in inspect.signature(export_task).parameters.items() if p.kind is p.KEYWORD_ONLY)


TASK_METRIC = "validation_metric"  # TaskCheckpoint's default monitor: the metric the task declares


def run_output(trainer: pl.Trainer, given: str | None, name: str) -> str:
    """Where a run writes an output: ``given``, else ``name`` under ``trainer.default_root_dir``, the
    run's one folder (its logs and checkpoints, predictions, exports)."""
    return given if given is not None else os.path.join(trainer.default_root_dir, name)


class TaskCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the latest state.

    Lightning 2.6's ``ModelCheckpoint`` with a ``monitor`` rewrites ``last.ckpt`` only at the
    epochs where it also writes a top-k checkpoint, so after epochs without improvement ``last``
    lags behind and ``--ckpt_path last`` repeats them. This one writes ``last.ckpt`` at the end of
    every epoch (after its validation) and, with ``last_every_n_train_steps``, also every that many
    optimizer steps, for epochs too long to lose. The top-k checkpoints follow ``monitor`` as
    usual; by default they follow the metric the task declares (``validation_metric`` and
    ``validation_metric_mode`` of ``BaseTask``: ``val/acc1``, ``val/mAP``, ``val/mIoU``, higher is
    better). Files are written through Lightning's atomic save (a temporary file moved into place).

    Args:
        monitor: the logged metric the top-k checkpoints follow; ``"validation_metric"`` (the
            default): the task's declared one; ``None``: none (``ModelCheckpoint``'s meaning).
        mode: ``"max"`` or ``"min"``; default the task's declared mode for its metric, else ``"min"``
            (``ModelCheckpoint``'s default).
        last_every_n_train_steps: also write ``last.ckpt`` every this many steps (0: epoch ends only);
            a run resumed from such a checkpoint continues at the next batch, bit for bit.
        save_last: as ``ModelCheckpoint``'s, but ``True`` by default.
        *args, **kwargs: ``ModelCheckpoint``'s other arguments.
    """

    def __init__(
        self,
        *args: Any,
        monitor: str | None = TASK_METRIC,
        mode: Literal["min", "max"] | None = None,
        save_last: bool | Literal["link"] = True,
        last_every_n_train_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, monitor=monitor, mode=mode or "min", save_last=save_last, **kwargs)
        if last_every_n_train_steps < 0:
            raise ValueError(f"last_every_n_train_steps must be >= 0, got {last_every_n_train_steps}")
        self.last_every_n_train_steps = last_every_n_train_steps
        self._given_mode = mode
        self._step_of_last = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor == TASK_METRIC:  # before the checkpoint's state is restored: its key names the metric
            metric = getattr(pl_module, "validation_metric", None)
            if metric is None:
                raise ValueError(f"TaskCheckpoint follows the task's validation_metric, which {type(pl_module).__name__} does not "
                                 "declare: give monitor (and mode)")
            self.monitor = metric
            self.mode = self._given_mode or pl_module.validation_metric_mode
            if self.mode not in ("min", "max"):
                raise ValueError(f"{type(pl_module).__name__}.validation_metric_mode must be 'min' or 'max', not {self.mode!r}")
            # the worst value, as ModelCheckpoint's (private) mode setter sets it
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
        super().setup(trainer, pl_module, stage)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._step_of_last = trainer.global_step

    def _save_last_if_behind(self, trainer: pl.Trainer) -> None:
        if (
            self.save_last
            and self._step_of_last != trainer.global_step
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and not trainer.fast_dev_run
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # not on an epoch's last batch: the epoch-end save follows, after validation and the epoch-end
        # hooks, and a run resumed from it continues exactly (one saved before them does not, with EMA)
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self.last_every_n_train_steps and trainer.global_step % self.last_every_n_train_steps == 0 and not last_batch:
            self._save_last_if_behind(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)


class CosineWeightDecay(pl.Callback):
    """Anneal weight decay from ``start`` to ``end`` with a cosine over the epochs of ``fit``.

    Epoch ``e`` of ``E`` trains with ``end + (start - end) * (1 + cos(pi * e / (E - 1))) / 2``:
    ``start`` in the first epoch, ``end`` in the last. Only parameter groups that apply weight
    decay are changed (those marked ``apply_weight_decay`` by ``parameter_groups``, or else those
    created with a non-zero weight decay).
    """

    def __init__(self, start: float = 1e-4, end: float = 1e-5) -> None:
        self.start = start
        self.end = end

    def value(self, epoch: int, max_epochs: int) -> float:
        progress = min(1.0, epoch / max(1, max_epochs - 1))
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weight_decay = self.value(trainer.current_epoch, trainer.max_epochs or 1)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if group.setdefault("apply_weight_decay", group.get("weight_decay", 0.0) > 0):
                    group["weight_decay"] = weight_decay
        pl_module.log("train/weight_decay", weight_decay, on_step=False, on_epoch=True)


class FreezeBatchNormStatistics(pl.Callback):
    """From epoch ``start_epoch`` on, train with every BatchNorm in eval mode: its running statistics,
    recomputed first over ``recalibration_batches`` training batches (an exact average, not the
    moving one), stay fixed, and the last epochs fit the weights to the statistics that validation
    and the fused export use instead of to each batch's own.

    For short runs on small batches, where a network comes to rely on batch statistics that no fixed
    statistics reproduce (measured on the detection demo: see its config). Distributed: the
    recalibrated statistics are averaged over processes. A run resumed after ``start_epoch`` keeps
    the checkpoint's statistics (one resumed within it recalibrates again).
    """

    def __init__(self, start_epoch: int, recalibration_batches: int = 20) -> None:
        if start_epoch < 0 or recalibration_batches < 1:
            raise ValueError(f"start_epoch must be >= 0 and recalibration_batches >= 1, got {start_epoch}, {recalibration_batches}")
        self.start_epoch = start_epoch
        self.recalibration_batches = recalibration_batches

    @staticmethod
    def batchnorms(pl_module: pl.LightningModule) -> list[torch.nn.Module]:
        return [m for m in pl_module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()
    def recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        norms = self.batchnorms(pl_module)
        momenta = [bn.momentum for bn in norms]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
        pl_module.eval()  # the task's inference forward (no targets needed), its BatchNorms on batch statistics
        for bn in norms:
            bn.train()
        seen = 0
        for batch in trainer.train_dataloader:
            if batch is None:
                continue
            pl_module(pl_module.transfer_batch_to_device(batch, pl_module.device, 0)[0])
            seen += 1
            if seen == self.recalibration_batches:
                break
        pl_module.train()
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
            if trainer.world_size > 1:
                bn.running_mean.copy_(trainer.strategy.reduce(bn.running_mean, reduce_op="mean"))
                bn.running_var.copy_(trainer.strategy.reduce(bn.running_var, reduce_op="mean"))
        rank_zero_info(f"FreezeBatchNormStatistics: {len(norms)} BatchNorms recalibrated on {seen} training batches; "
                       f"their statistics stay fixed from epoch {self.start_epoch}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.start_epoch:
            self.recalibrate(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch >= self.start_epoch:  # Lightning sets train mode again after each validation
            for bn in self.batchnorms(pl_module):
                bn.eval()


class ProgressiveResolution(pl.Callback):
    """Grow the training image size during ``fit``: ``sizes[i]`` from epoch ``milestones[i - 1]`` on.

    E.g. ``sizes=[160, 192, 224], milestones=[37, 112]``. The datamodule needs a writable
    ``train_image_size`` (read by the training transform in the workers) and, as every task's
    ``BaseDataModule`` has, ``train_loader_hooks``. This callback alone sets the size: when a
    training loader is built (the first epoch's, or the resumed one's: Lightning starts that
    loader's workers before any epoch hook runs) and at the end of each epoch for the next one,
    when no worker is producing samples, so a batch never mixes sizes.
    """

    def __init__(self, sizes: Sequence[int], milestones: Sequence[int]) -> None:
        if len(milestones) != len(sizes) - 1 or list(milestones) != sorted(milestones):
            raise ValueError(
                f"ProgressiveResolution needs len(sizes) - 1 increasing milestones, got sizes={list(sizes)}, "
                f"milestones={list(milestones)}"
            )
        self.sizes = list(sizes)
        self.milestones = list(milestones)

    def size_at(self, epoch: int) -> int:
        return self.sizes[sum(epoch >= m for m in self.milestones)]

    def apply(self, datamodule: pl.LightningDataModule, epoch: int) -> None:
        """Set ``datamodule``'s training size to that of ``epoch``."""
        size = self.size_at(epoch)
        if datamodule.train_image_size != size:
            rank_zero_info(f"ProgressiveResolution: training at {size} px from epoch {epoch}")
            datamodule.train_image_size = size

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage == "fit":
            if not (hasattr(datamodule, "train_image_size") and hasattr(datamodule, "train_loader_hooks")):
                raise TypeError(
                    "ProgressiveResolution needs a datamodule with a writable `train_image_size` and"
                    f" `train_loader_hooks` (tasks.common.data.BaseDataModule), got {type(datamodule).__name__}"
                )
            if self.apply not in datamodule.train_loader_hooks:
                datamodule.train_loader_hooks.append(self.apply)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(trainer.datamodule, trainer.current_epoch + 1)


class ExportOnFitEnd(pl.Callback):
    """Run the task's ``export`` at the end of ``fit`` (with EMA, from the averaged weights).

    Args:
        output: the export folder (replaced as a whole); default ``exported/`` under the trainer's
            ``default_root_dir``, the run's one output folder.
        onnx / torchscript / tolerance: as the ``export`` subcommand's options.
        options: any other options of the ``export`` subcommand, e.g. ``{int8: true, executorch:
            true, calibration_images: 128}`` (see ``python -m tasks.<task> export --help``).
    """

    def __init__(self, output: str | None = None, onnx: bool = True, torchscript: bool = False, tolerance: float = 1e-5,
                 options: dict[str, Any] | None = None) -> None:
        unknown = sorted(set(options or {}) - set(EXPORT_OPTIONS))
        if unknown:
            raise ValueError(f"ExportOnFitEnd: unknown export option(s) {unknown}; expected some of {list(EXPORT_OPTIONS)}")
        self.output = output
        self.options = {**(options or {}), "onnx": onnx, "torchscript": torchscript, "tolerance": tolerance}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.interrupted:
            export_task(pl_module, trainer.datamodule, run_output(trainer, self.output, "exported"), **self.options)
