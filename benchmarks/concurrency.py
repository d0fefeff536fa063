"""Training speed alone and with a second training beside it on the same CPU cores.

    python -m benchmarks.concurrency [--seconds 60] [--env NAME=VALUE ...] [--task classification]

Runs the task's demo training (no validation, no checkpoints) for ``--seconds`` after its first
``--warmup`` steps: once alone, then two copies at once, and prints the optimizer steps per second
of each. ``--env`` runs every copy with extra environment variables (e.g. ``OMP_NUM_THREADS=1``)
to compare settings; every run states the thread settings it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = {task: f"configs/{task}/demo.yaml" for task in ("classification", "detection", "segmentation")}


class StepRate(pl.Callback):
    """Times the optimizer steps after the first ``warmup`` ones, stops training after ``seconds``
    and writes ``{"steps", "seconds", "threads"}`` to ``output`` (JSON)."""

    def __init__(self, output: str, seconds: float = 60.0, warmup: int = 3) -> None:
        self.output, self.seconds, self.warmup = output, seconds, warmup
        self.start: float | None = None
        self.steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        elif self.start is not None:
            self.steps += 1
            if time.perf_counter() - self.start >= self.seconds:
                trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self.start if self.start is not None else float("nan")
        result = {"steps": self.steps, "seconds": seconds, "threads": torch.get_num_threads(),
                  "interop_threads": torch.get_num_interop_threads()}
        Path(self.output).write_text(json.dumps(result))


def _command(task: str, output: Path, seconds: float, warmup: int, workdir: Path) -> list[str]:
    timer = {"class_path": "benchmarks.concurrency.StepRate",
             "init_args": {"output": str(output), "seconds": seconds, "warmup": warmup}}
    return [sys.executable, "-m", f"tasks.{task}", "fit", "--config", DEMO_CONFIGS[task],
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--trainer.max_epochs=1000", f"--trainer.default_root_dir={workdir}",
            "--trainer.callbacks=" + json.dumps([timer])]


def run_copies(task: str, copies: int, seconds: float, warmup: int, env: dict[str, str]) -> list[dict]:
    """Start ``copies`` trainings at once; their step rates (steps/s)."""
    with tempfile.TemporaryDirectory() as scratch:
        outputs = [Path(scratch) / f"rate{i}.json" for i in range(copies)]
        processes = [
            subprocess.Popen(_command(task, output, seconds, warmup, Path(scratch) / f"run{i}"), cwd=ROOT,
                             env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i, output in enumerate(outputs)
        ]
        results = []
        for process, output in zip(processes, outputs):
            _, errors = process.communicate()
            if process.returncode != 0:
                raise SystemExit(f"a training failed (exit {process.returncode}):\n{errors[-2000:]}")
            result = json.loads(output.read_text())
            results.append({**result, "steps_per_s": result["steps"] / result["seconds"]})
        return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(DEMO_CONFIGS), default="classification")
    parser.add_argument("--seconds", type=float, default=60.0, help="timed seconds per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="extra environment of every run")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    print(f"machine: {describe_machine('cpu')}; task: {args.task} demo; env: {env or 'as is'}", flush=True)
    solo = run_copies(args.task, 1, args.seconds, args.warmup, env)[0]
    print(f"alone: {solo['steps_per_s']:.2f} steps/s (torch threads {solo['threads']})", flush=True)
    pair = run_copies(args.task, 2, args.seconds, args.warmup, env)
    rates = ", ".join(f"{r['steps_per_s']:.2f}" for r in pair)
    worst = min(r["steps_per_s"] for r in pair) / solo["steps_per_s"]
    print(f"two at once: {rates} steps/s each; the slower keeps {100 * worst:.0f}% of its speed alone", flush=True)


if __name__ == "__main__":
    main()
