"""Quantization-aware distillation: fine-tune a MobileOne classifier for its INT8 file.

``python -m tasks.classification.qat {fit,validate,test,export} --config configs/classification/qat_s0.yaml``

The network is trained in the fused form, computing what its onnxruntime INT8 file will compute
(``backbones.quantization.simulate_int8``: int8 weights per output channel, int8 activations with
fixed ranges, rounding with straight-through gradients), to match the logits of the float32
network it starts from (knowledge distillation): no labels are needed, so unlabelled images of
the target domain are enough (``--data.unlabelled_train true``). ``export --int8 true`` of its
checkpoint writes the INT8 file with the training's activation ranges.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import ArgsType
from lightning.pytorch.utilities import move_data_to_device
from torch import nn
from torchmetrics import MeanMetric

from backbones import fuse_for_deployment
from backbones.quantization import ActivationQuantizer, calibrate_int8_simulation, int8_simulation_sites, remove_int8_simulation, simulate_int8
from backbones.runtimes import INT8_WEIGHT_LEVELS
from tasks.classification.data import ImageFolderDataModule
from tasks.classification.module import ImageClassificationTask, TopKPredictionWriter
from tasks.common.backbones import DEFAULT_BACKBONE, MOBILEONE_BACKBONES
from tasks.common.cli import TaskCLI
from tasks.common.optim import parameter_groups

log = logging.getLogger(__name__)


class QuantizationAwareDistillation(ImageClassificationTask):
    """A MobileOne classifier fine-tuned in its INT8 arithmetic to reproduce its float32 self.

    ``model`` is the fused network under ``simulate_int8`` for ``int8_scheme``; at the start of a
    fresh ``fit`` its quantizers are calibrated on ``calibration_batches`` training batches
    (``calibrate_int8_simulation``: activations equalized per channel, biases corrected for the
    weights' rounding, activation ranges from percentiles). The loss is the KL divergence between
    the float32 network's softened class probabilities (the teacher: the fused network built from
    ``weights``, frozen, outside the checkpoint) and the simulated network's, times
    ``temperature ** 2``; labels are not used. Validation measures the simulated INT8 network:
    ``val/acc1`` (against labels) and ``val/agreement`` (same top class as the teacher), beside the
    teacher's own ``val/float32_acc1``.

    Args:
        backbone: ``"mobileone_s0"`` .. ``"mobileone_s4"``.
        num_classes / class_names / backbone_kwargs: as ``ImageClassificationTask``'s
            (MobileOne only, without squeeze-excitation).
        weights: the float32 network to start from and distil from (required): Apple's
            ``mobileone_sX.pth.tar`` or ``..._unfused.pth.tar``, ``"apple"``, or a checkpoint of
            ``ImageClassificationTask``.
        int8_scheme: the INT8 arithmetic trained for and exported: ``s8s8`` (int8 weights with
            127 levels; exact on x86 CPUs with VNNI, ARM, XNNPACK) or ``reduce_range`` (64 levels:
            x86 CPUs without VNNI).
        temperature: distillation temperature.
        calibration_batches: training batches that calibrate the quantizers at the start of fit.
        lr ... channels_last: as ``ImageClassificationTask``'s (a small ``lr``: the network is
            already trained; no weight decay by default).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        num_classes: int = 1000,
        class_names: list[str] | None = None,
        weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        int8_scheme: Literal["s8s8", "reduce_range"] = "s8s8",
        temperature: float = 1.0,
        calibration_batches: int = 8,
        lr: float = 1e-3,
        reference_batch_size: int = 256,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        if weights is None:
            raise ValueError("QuantizationAwareDistillation needs the float32 network it starts from and distils from: "
                             "--model.weights (Apple's mobileone_sX.pth.tar, 'apple', or a classification checkpoint)")
        if int8_scheme not in ("s8s8", "reduce_range"):
            raise ValueError(f"int8_scheme={int8_scheme!r}: quantization-aware training simulates 's8s8' or 'reduce_range' (int8 activations)")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: expected a positive number")
        if backbone not in MOBILEONE_BACKBONES:
            raise ValueError(f"backbone={backbone!r}: quantization-aware distillation simulates MobileOne's fused network: "
                             f"one of {', '.join(MOBILEONE_BACKBONES)}")
        super().__init__(backbone=backbone, num_classes=num_classes, class_names=class_names, weights=weights,
                         backbone_kwargs=backbone_kwargs, lr=lr, reference_batch_size=reference_batch_size, momentum=momentum,
                         nesterov=nesterov, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr_ratio=min_lr_ratio,
                         label_smoothing=0.0, channels_last=channels_last)
        self.save_hyperparameters()  # this class's arguments only: the ones a checkpoint rebuilds it with
        fused = fuse_for_deployment(self.model.eval())
        self.model = simulate_int8(fused, INT8_WEIGHT_LEVELS[int8_scheme]).train()  # a copy: trainable
        self._teacher = [fused.requires_grad_(False)]  # in a list: not a submodule, so neither in the checkpoint nor trained
        self.val_agreement = MeanMetric()
        self.val_float32_acc1 = MeanMetric()

    @property
    def teacher(self) -> nn.Module:
        """The frozen float32 network (fused, eval mode), on this module's device."""
        teacher = self._teacher[0]
        if next(teacher.parameters()).device != self.device:
            teacher.to(self.device)
        return teacher.eval()

    @property
    def calibrated(self) -> bool:
        return all(bool(m.calibrated) for m in self.model.modules() if isinstance(m, ActivationQuantizer))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.calibrated:  # a resumed fit: the checkpoint holds the calibration
            return
        started = time.perf_counter()
        loader = self.trainer.datamodule.train_dataloader()
        batches = [move_data_to_device(batch[0], self.device)
                   for batch in itertools.islice((b for b in loader if b is not None), self.hparams.calibration_batches)]
        calibrate_int8_simulation(self.model, batches)
        if dist.is_available() and dist.is_initialized():  # every process continues from rank 0's calibration
            for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
                dist.broadcast(tensor.data, 0)
        log.info("calibrated the INT8 simulation (%s) on %d training images (%.1f s)", self.hparams.int8_scheme,
                 sum(len(b) for b in batches), time.perf_counter() - started)

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        return parameter_groups(self.model, self.hparams.weight_decay)

    def distillation_loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.hparams.temperature
        return F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(teacher_logits.float() / t, 1),
                        reduction="batchmean", log_target=True) * t * t

    def training_loss(self, batch: Any) -> torch.Tensor:
        images = batch[0]
        with torch.no_grad():
            target = self.teacher(images)
        logits = self(images)
        loss = self.distillation_loss(logits, target)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/agreement", (logits.argmax(1) == target.argmax(1)).float().mean())
        return loss

    def evaluate(self, batch: Any, prefix: str) -> torch.Tensor:
        """The classification metrics of the evaluated network (the INT8 simulation, or an exported
        file), its agreement with the float32 teacher (``agreement``) and the teacher's top-1 (``float32_acc1``)."""
        logits = super().evaluate(batch, prefix)
        with torch.no_grad():
            teacher = self.teacher(batch[0]).argmax(1)
        self.val_agreement((logits.argmax(1) == teacher).float())
        self.log(f"{prefix}/agreement", self.val_agreement)
        self.val_float32_acc1((teacher == batch[1]).float())
        self.log(f"{prefix}/float32_acc1", self.val_float32_acc1)
        return logits

    # export: the float32 network the simulation quantizes, and the activation ranges it trained with
    def export_network(self) -> nn.Module:
        return remove_int8_simulation(self.model)

    def int8_simulation(self) -> dict[str, Any] | None:
        return {"scheme": self.hparams.int8_scheme, "activations": int8_simulation_sites(self.model)}


class QuantizationAwareDistillationCLI(TaskCLI):
    prediction_writer = TopKPredictionWriter


def main(args: ArgsType = None, run: bool = True) -> TaskCLI:
    """The quantization-aware distillation command line on ``args`` (default: ``sys.argv``)."""
    return QuantizationAwareDistillationCLI(QuantizationAwareDistillation, ImageFolderDataModule, args=args, run=run)


if __name__ == "__main__":
    main()
