"""Optimizer and learning-rate schedule helpers shared by the tasks."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

__all__ = [
    "global_batch_size", "parameter_groups", "scaled_learning_rate", "training_steps", "warmup_cosine", "warmup_poly", "warmup_then",
]


def parameter_groups(module: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Split trainable parameters into a weight-decay group and a no-decay group.

    By default 1-D parameters (BatchNorm weights and biases, conv / linear biases) get no weight
    decay, the usual choice for BN networks. Groups carry ``"apply_weight_decay"`` so that a
    weight-decay schedule (``CosineWeightDecay``) knows which ones to change.
    """
    decay, no_decay = [], []
    for param in module.parameters():
        if not param.requires_grad:
            continue
        (decay if decay_norm_and_bias or param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "apply_weight_decay": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False})
    return groups


def global_batch_size(trainer, default: int) -> int:
    """Images per optimizer step over all processes: per-device batch x world size x accumulation.

    The per-device batch is the datamodule's ``batch_size`` (``default`` when it has none).
    """
    batch_size = getattr(trainer.datamodule, "batch_size", default)
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches


def scaled_learning_rate(base_lr: float, global_batch_size: int, reference_batch_size: int = 256) -> float:
    """Linear scaling rule: ``base_lr`` is the rate for ``reference_batch_size`` images per step."""
    return base_lr * global_batch_size / reference_batch_size


def training_steps(trainer) -> int:
    """The fit's optimizer steps, counted as ``trainer.estimated_stepping_batches`` counts them but
    from the length of a fresh ``train_dataloader()``, which is not iterated.

    Lightning's estimate, asked for in ``configure_optimizers``, starts the training loader (and its
    worker processes, which prefetch) before a checkpoint is restored, and the resumed run would then
    train its first epoch from the stale position; see ``tasks.common.sampling``.
    """
    datamodule = trainer.datamodule
    if datamodule is None or trainer.max_epochs in (None, -1):
        return int(trainer.estimated_stepping_batches)
    batches = len(datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    batches = int(batches * limit) if isinstance(limit, float) else min(batches, int(limit))
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
    return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps


def warmup_then(decay: Callable[[float], float], total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: linear warm-up from ~0 over ``warmup_steps``, then
    ``decay(progress)`` with progress going from 0 to 1 over the remaining steps."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay(min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor


def warmup_cosine(total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up, then cosine from 1 to ``min_ratio``."""
    return warmup_then(lambda progress: min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)), total_steps, warmup_steps)


def warmup_poly(total_steps: int, power: float, warmup_steps: int = 0) -> Callable[[int], float]:
    """Linear warm-up, then ``(1 - progress) ** power`` (DeepLab's "poly")."""
    return warmup_then(lambda progress: (1.0 - progress) ** power, total_steps, warmup_steps)
