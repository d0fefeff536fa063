"""The tasks' shared LightningModule base, ``BaseTask``, and the behaviour it is made of."""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import move_data_to_device
from torch import nn

from backbones import calibrate_from_fused_
from tasks.common.batches import same_size_images, split_loader
from tasks.common.export.checks import argmax_agreement
from tasks.common.optim import global_batch_size, parameter_groups, scaled_learning_rate, training_steps
from tasks.common.sampling import world_size_and_rank

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


def _random_states() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) random states, as tensors and plain
    Python values only (so that ``torch.load(weights_only=True)`` reads them back)."""
    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    return {
        "python": [version, list(python_state), gauss],
        "numpy": [torch.from_numpy(numpy_keys.astype(np.int64)), numpy_position, numpy_has_gauss, numpy_gauss],
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_random_states(states: dict[str, Any]) -> None:
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = states["numpy"]
    np.random.set_state(("MT19937", numpy_keys.numpy().astype(np.uint32), numpy_position, numpy_has_gauss, numpy_gauss))
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


def task_name(module_class: type) -> str:
    """The name a task's checkpoints record, e.g. ``tasks.classification.module.ImageClassificationTask``."""
    return f"{module_class.__module__}.{module_class.__qualname__}"


class CheckpointStateMixin:
    """What the tasks add to their checkpoints: the task's class name under ``"task"`` (so that a
    checkpoint given to another task is named as such) and the global random streams of every
    process, restored when training resumes.

    Data order and augmentations do not depend on these streams (``tasks.common.sampling``); what
    does is randomness inside the model (dropout, ...), which then continues as in an
    uninterrupted run. The states are gathered from all processes of a distributed run (the hook
    runs on every rank) and each process gets its own back; they are applied at ``on_train_start``,
    after everything that runs between restoring a checkpoint and training.
    """

    _random_states_to_restore: dict[str, Any] | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["task"] = task_name(type(self))
        states = _random_states()
        world, _ = world_size_and_rank()
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, states)
            checkpoint["random_states"] = gathered
        else:
            checkpoint["random_states"] = [states]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        gathered = checkpoint.get("random_states") or []
        _, rank = world_size_and_rank()
        self._random_states_to_restore = gathered[rank] if rank < len(gathered) else None

    def on_train_start(self) -> None:
        if self._random_states_to_restore is not None:
            _set_random_states(self._random_states_to_restore)
            self._random_states_to_restore = None


@contextlib.contextmanager
def replaced_submodule(module: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    """Inside the context ``module.<name>`` is ``replacement``; the original comes back afterwards."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


class BaseTask(CheckpointStateMixin, ChannelsLastMixin, pl.LightningModule):
    """What every task shares; a task adds its network (``self.model``), its loss, its metrics and
    the description of its exported files.

    A task sets ``self.model`` (the trained network) in ``__init__`` and saves its hyperparameters
    (``self.save_hyperparameters()``), which include ``REQUIRED_HPARAMS``: ``lr`` (for
    ``reference_batch_size`` images per step), ``reference_batch_size``, ``momentum``,
    ``weight_decay`` and ``channels_last`` (checked when a trainer sets the task up), and implements:

    - ``training_loss(batch)`` (and ``predict_batch(batch)`` for ``predict``; empty batches never reach them);
    - ``evaluate(batch, prefix)``: update the metrics with one validation or test batch
      (``prefix`` is ``"val"`` or ``"test"``), and optionally ``log_epoch_metrics(prefix)`` at the
      end of the epoch (``final_evaluation`` says when to log a result table);
    - ``lr_schedule(total_steps, steps_per_epoch)``: the learning-rate multiplier per optimizer
      step, and optionally ``parameter_groups(lr)`` (default: ``self.model``'s parameters, no
      weight decay on BatchNorm parameters and biases);
    - ``validation_metric`` (and ``validation_metric_mode`` if lower is better): the logged metric
      that ``TaskCheckpoint``, the export and the benchmarks quote;
    - ``weights_hparam`` if it takes initial weights (by name such as ``"apple"`` too): the
      argument's name, which the CLI clears when a ``--ckpt_path`` holds the weights and the
      benchmarks give ImageNet files to;
    - the export protocol of ``tasks.common.export.export_task``:
      ``export_metadata(datamodule)``, and where the defaults do not fit, ``export_network()``
      (default ``self.model``), ``export_images(batch)`` (default ``batch[0]``),
      ``deployed_model(network)`` (what validation runs for an exported ``network``; default the
      network itself), ``export_check_images``, ``export_dynamic_image_size``,
      ``export_quantized_modules``, ``export_agreement(fused, trained)``,
      ``deployment_agreement(deployed, fused)`` and ``int8_simulation()`` (each declared below
      with its default).

    The optimizer is SGD with the linear scaling rule (``tasks.common.optim``), stepped per
    optimizer step.
    """

    model: nn.Module
    validation_metric: str  # the task's headline metric, e.g. "val/acc1": what checkpoints follow and an export quotes
    validation_metric_mode: Literal["max", "min"] = "max"  # whether a higher or a lower validation_metric is better
    weights_hparam: str | None = None  # the __init__ argument taking initial (e.g. ImageNet) weights, if any: "weights", ...
    export_check_images = 8  # validation images the export compares the fused and trained networks on
    fused_calibration_batches = 8  # training batches that calibrate MobileOne layers built from a fused file

    REQUIRED_HPARAMS = ("lr", "reference_batch_size", "momentum", "weight_decay", "channels_last")

    def setup(self, stage: str) -> None:
        missing = [name for name in self.REQUIRED_HPARAMS if name not in self.hparams]
        if missing:
            raise TypeError(f"{type(self).__name__} has no hyperparameter {', '.join(missing)}: a BaseTask takes "
                            f"{', '.join(self.REQUIRED_HPARAMS)} as __init__ arguments and calls self.save_hyperparameters()")
        if not isinstance(getattr(self, "model", None), nn.Module):
            raise TypeError(f"{type(self).__name__} sets no self.model (an nn.Module) in __init__")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.calibrate_layers_from_fused()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        for module in self.modules():  # the checkpoint's weights replace what __init__ built from a fused file
            if getattr(module, "from_fused", False):
                module.from_fused = False

    def calibrate_layers_from_fused(self) -> None:
        """Give MobileOne layers loaded from a fused (inference-form) file the BatchNorm statistics
        of ``fused_calibration_batches`` training batches (``backbones.calibrate_from_fused_``), so
        that training starts from the file's function in train mode too. Not on a resumed fit:
        its checkpoint holds the calibrated statistics. Distributed: statistics summed over processes."""
        if self.trainer.ckpt_path is not None or not any(getattr(m, "from_fused", False) for m in self.modules()):
            return
        started = time.perf_counter()
        loader = self.trainer.datamodule.train_dataloader()
        batches = itertools.islice((batch for batch in loader if batch is not None), self.fused_calibration_batches)
        reduce = None
        if dist.is_available() and dist.is_initialized():
            def reduce(tensor: torch.Tensor) -> torch.Tensor:
                dist.all_reduce(tensor)
                return tensor
        layers = calibrate_from_fused_(self, batches, lambda task, batch: task(move_data_to_device(batch[0], task.device)), reduce)
        log.info("calibrated the BatchNorm statistics of %d layers built from a fused file on %d training batches (%.1f s)",
                 layers, self.fused_calibration_batches, time.perf_counter() - started)

    # optimization
    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (``lr`` is the group default, already scaled)."""
        return parameter_groups(self.model, self.hparams.weight_decay)

    def lr_schedule(self, total_steps: int, steps_per_epoch: float) -> Callable[[int], float]:
        raise NotImplementedError(f"{type(self).__name__} defines no lr_schedule")

    def configure_optimizers(self) -> dict[str, Any]:
        trainer = self.trainer
        global_batch = global_batch_size(trainer, self.hparams.reference_batch_size)
        lr = scaled_learning_rate(self.hparams.lr, global_batch, self.hparams.reference_batch_size)
        optimizer = torch.optim.SGD(self.parameter_groups(lr), lr=lr, momentum=self.hparams.momentum,
                                    nesterov=self.hparams.get("nesterov", False))
        total_steps = training_steps(trainer)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule(total_steps, total_steps / max(1, trainer.max_epochs or 1)))
        rates = sorted({group["lr"] for group in optimizer.param_groups})
        log.info("SGD lr %s for a global batch of %d (%.4g per %d images)", " / ".join(f"{rate:.4g}" for rate in rates),
                 global_batch, self.hparams.lr, self.hparams.reference_batch_size)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # steps: a batch is None when every sample of it was an unreadable image (``skip_corrupt``)
    def training_loss(self, batch: Any) -> torch.Tensor:
        """The loss of a training batch (and its logging)."""
        raise NotImplementedError(f"{type(self).__name__} defines no training_loss")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return None if batch is None else self.training_loss(batch)

    def predict_batch(self, batch: Any) -> list[dict[str, Any]]:
        """One record per image of a ``predict`` batch, for the task's prediction writer."""
        raise NotImplementedError(f"{type(self).__name__} defines no predict_batch")

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Any]]:
        return [] if batch is None else self.predict_batch(batch)

    # evaluation
    def evaluate(self, batch: Any, prefix: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no evaluate")

    def log_epoch_metrics(self, prefix: str) -> None:
        """Compute and log the epoch's metrics (for metrics that are not logged per step)."""

    @property
    def final_evaluation(self) -> bool:
        """Whether this is the end of a ``validate`` or ``test`` run on the main process (not a
        sanity check, not validation during ``fit``): the moment to log a result table."""
        trainer = self.trainer
        return trainer.state.fn in ("validate", "test") and trainer.is_global_zero and not trainer.sanity_checking

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch is not None:
            self.evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if batch is not None:
            self.evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    # export (see tasks.common.export.export_task)
    def export_network(self) -> nn.Module:
        """The network to fuse and export: preprocessed images in, tensors out."""
        return self.model

    def export_images(self, batch: Any) -> torch.Tensor:
        """A data-module batch as the exported network takes it."""
        return batch[0]

    def export_batches(self, datamodule: pl.LightningDataModule | None, split: str = "validate") -> Iterator[torch.Tensor]:
        """Batches of the ``"validate"`` or the (augmented) ``"fit"`` split, as the exported network takes them."""
        for batch in split_loader(datamodule, split):
            if batch is not None:  # None: every image of the batch was unreadable (skip_corrupt)
                yield self.export_images(batch)

    def export_inputs(self, datamodule: pl.LightningDataModule | None) -> torch.Tensor:
        """The ``export_check_images`` validation images (of the first batch's size) the export is checked on."""
        return same_size_images(self.export_batches(datamodule), self.export_check_images)

    def deployed_model(self, network: nn.Module) -> nn.Module:
        """What stands in for ``self.model`` when validation runs an exported ``network``."""
        return network

    def validating_with(self, network: nn.Module) -> contextlib.AbstractContextManager[None]:
        """A context in which validation runs ``network`` (an exported file's runner) instead of ``self.model``."""
        return replaced_submodule(self, "model", self.deployed_model(network))

    export_dynamic_image_size = False  # the ONNX, TorchScript and ExecuTorch files take any height and width
    export_quantized_modules: tuple[str, ...] | None = None  # INT8 quantizes only these submodules of export_network()

    def export_agreement(self, fused: Any, trained: Any) -> tuple[int, int]:
        """(predictions matched, predictions compared) between two outputs of the exported network
        on the same images: the fused and the trained network. Default: equal argmax over dim 1
        (per image, or per pixel)."""
        return argmax_agreement(fused, trained)

    def deployment_agreement(self, deployed: Any, fused: Any) -> tuple[int, int]:
        """As ``export_agreement``, for a deployed file (INT8, ExecuTorch) against the fused float32
        network; a task whose INT8 outputs move more than float32 rounding matches more loosely."""
        return self.export_agreement(deployed, fused)

    def int8_simulation(self) -> dict[str, Any] | None:
        """For a network trained in its INT8 arithmetic: ``{"scheme": <int8 scheme>, "activations":
        <backbones.quantization.int8_simulation_sites>}``, which the INT8 export then uses instead of
        preparing and calibrating the network itself. None (the default): post-training quantization."""
        return None

    def input_normalization(self, datamodule: pl.LightningDataModule | None) -> dict[str, list[float]]:
        """``{"mean": ..., "std": ...}``: how the network's RGB inputs in [0, 1] are normalized, as
        ``export_metadata`` states it. Here the data module's ``mean`` / ``std`` (empty without one);
        a task whose model normalizes (detection's SSD transform) says so instead."""
        return {"mean": list(getattr(datamodule, "mean", [])), "std": list(getattr(datamodule, "std", []))}

    def export_metadata(self, datamodule: pl.LightningDataModule | None) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} defines no export_metadata")
