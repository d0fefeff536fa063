"""Timing one call (wall clock on the CPU, CUDA events on a GPU), summarising repeated timings,
and writing the rows of a benchmark to CSV."""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from backbones.atomic import atomic_write_file


def time_ms(call: Callable[[], object], device: str) -> float:
    """Milliseconds that ``call()`` takes: CUDA events around it on ``cuda`` (waiting for the GPU
    to finish), ``time.perf_counter`` otherwise."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    call()
    return (time.perf_counter() - start_s) * 1e3


def interleaved_median_ms(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds of each of ``calls`` over ``rounds`` rounds (after ``warmup`` untimed ones),
    each round calling every one once, so that a machine's drift weighs on all alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds + warmup):
        for name, call in calls.items():
            elapsed = time_ms(call, "cpu")
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def median_and_quartiles(values: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile), quartiles within the range of ``values``."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q1, q3


def write_csv(rows: list[dict], path: str) -> None:
    """``rows`` (dicts with the same keys) as a CSV file with a header, written atomically (``backbones.atomic``)."""

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write_file(path, write)
