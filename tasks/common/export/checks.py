"""How an export compares networks: relative errors against a tolerance, prediction agreement,
non-finite outputs refused."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from backbones.export import first_non_finite, is_finite, output_tensors, relative_error

Agreement = Callable[[Any, Any], "tuple[int, int]"]  # (predictions matched, predictions compared) of two outputs

# Fewer predictions than this compared between two networks give no agreement figure.
MIN_AGREEMENT_COUNT = 10


def refuse_non_finite(network: nn.Module, inputs: torch.Tensor, output: Any, what: str) -> None:
    """Raise ``RuntimeError`` naming where ``network`` first goes non-finite if ``output`` (its
    output on ``inputs``) holds NaN or inf: no figure computed from it would mean anything."""
    if not is_finite(output):
        where = first_non_finite(network, inputs) or "(not reproduced on a second run)"
        raise RuntimeError(
            f"{what} computes NaN or inf on {len(inputs)} validation images, first at {where}; nothing was written "
            "(a diverged training? its train/loss and checkpoints show where it went non-finite)"
        )


def worst_error(actual: Any, expected: Any) -> float:
    """The largest relative error between corresponding output tensors."""
    return max(relative_error(a, e) for a, e in zip(output_tensors(actual), output_tensors(expected)))


def argmax_agreement(actual: Any, expected: Any) -> tuple[int, int]:
    """(positions whose top class is the same, positions compared): images, or pixels."""
    pairs = [(a, e) for a, e in zip(output_tensors(actual), output_tensors(expected)) if a.ndim >= 2]
    same = sum(int((a.argmax(1) == e.argmax(1)).sum()) for a, e in pairs)
    total = sum(e.argmax(1).numel() for _, e in pairs)
    return same, total


def check_tolerance(report: dict[str, Any], key: str, tolerance: float, what: str) -> None:
    """Raise ``RuntimeError`` if ``report[key]`` (a relative error) is above ``tolerance`` or not finite."""
    if not math.isfinite(report[key]) or report[key] > tolerance:  # NaN compares as within any tolerance
        raise RuntimeError(f"{what} by relative error {report[key]:.3e} > {tolerance:g} ({key}); nothing was written")


def since(started: float) -> float:
    """Seconds since ``started`` (a ``time.perf_counter()`` value)."""
    return time.perf_counter() - started
