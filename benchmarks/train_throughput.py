"""Training throughput (images/s): forward + backward + optimizer step of the train form.

    python -m benchmarks.train_throughput                                   # CPU: S0, batch 64, eager fp32
    python -m benchmarks.train_throughput --device cuda --variants s0 s1 s2 s3 s4 \\
        --batch-sizes 64 256 --modes eager compile --precisions fp32 bf16

Models: MobileOne sX in train form (multi-branch, as trained), timm's ``mobileone_sX`` in its
train form when timm is installed (``pip install -e ".[bench]"``), and torchvision's
MobileNetV2. One step = the paper's recipe: SGD (momentum 0.9, weight decay 1e-4) on
cross-entropy with label smoothing 0.1, on random 224x224 images and labels already on the
device (data loading is not measured). ``bf16`` = autocast to bfloat16; ``compile`` =
``torch.compile`` of the model. On CUDA the models run channels_last (the task's default
there); on the CPU contiguous, also under ``torch.compile`` (torch 2.14.1's oneDNN corrupts the
heap in the channels-last backward of MobileOne's stem, see ``tasks.common.module.ChannelsLastMixin``).

Steps are interleaved over the models (A B C A B C ...) after warm-up steps; each row gives the
median and interquartile range of the step times (CUDA events on a GPU) and the ratio to our
model of the same variant: timm's row compares the two implementations of one network.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torchvision
from torch import nn

from backbones import mobileone
from benchmarks.machine import describe_machine
from benchmarks.timing import median_and_quartiles, time_ms, write_csv

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def models(variants: list[str], peers: bool = True) -> dict[str, nn.Module]:
    """Name -> train-form model (random weights): ours, timm's of the same variants when
    installed, and torchvision's MobileNetV2."""
    torch.manual_seed(0)
    built = {f"mobileone_{v}": mobileone(v) for v in variants}
    if not peers:
        return built
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None:
        built.update({f"timm mobileone_{v}": timm.create_model(f"mobileone_{v}") for v in variants})
    built["mobilenet_v2"] = torchvision.models.mobilenet_v2()
    return built


def train_step(model: nn.Module, batch: int, device: str, precision: str, mode: str) -> Callable[[], float]:
    """A closure doing one SGD step of a copy of ``model`` on a fixed random batch; returns the loss."""
    memory_format = torch.channels_last if device == "cuda" else torch.contiguous_format
    model = copy.deepcopy(model).to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    if mode == "compile" and device == "cpu":
        # inductor would switch convolutions to channels_last, and torch 2.14.1's oneDNN backward
        # of the stem's 1x1 stride-2 conv then crashes (segfault) as in eager channels_last
        from torch._inductor import config as inductor_config

        inductor_config.layout_optimization = False
    forward = torch.compile(model) if mode == "compile" else model
    images = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch,), device=device)
    dtype = PRECISIONS[precision]

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(forward(images), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def measure(
    variants: list[str],
    batch_sizes: Sequence[int] = (64,),
    modes: Sequence[str] = ("eager",),
    precisions: Sequence[str] = ("fp32",),
    steps: int = 10,
    warmup: int = 3,
    device: str = "cpu",
    peers: bool = True,
) -> list[dict]:
    """Time every model x mode x precision, interleaved, one batch size at a time; one row each."""
    rows = []
    built = models(variants, peers)  # each job trains its own copy
    for batch in batch_sizes:
        jobs = {
            (name, mode, precision): train_step(model, batch, device, precision, mode)
            for name, model in built.items() for mode in modes for precision in precisions
        }
        for (name, mode, precision), step in jobs.items():
            start = time.perf_counter()
            for _ in range(warmup):
                loss = step()
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name} {mode} {precision}: non-finite loss during warm-up: {loss}")
            print(f"warm-up of {name} {mode} {precision} batch {batch}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        times: dict[tuple[str, str, str], list[float]] = {key: [] for key in jobs}
        for _ in range(steps):
            for key, step in jobs.items():
                times[key].append(time_ms(step, device))
        del jobs
        if device == "cuda":
            torch.cuda.empty_cache()
        for (name, mode, precision), values in times.items():
            median, q1, q3 = median_and_quartiles(values)
            rows.append({"device": device, "model": name, "mode": mode, "precision": precision, "batch": batch,
                         "median_ms": median, "q1_ms": q1, "q3_ms": q3, "images_per_s": batch / median * 1e3, "steps": steps})
    for row in rows:
        ours = row["model"].removeprefix("timm ")
        reference = next((r for r in rows if r["model"] == ours and all(r[k] == row[k] for k in ("mode", "precision", "batch"))), None)
        reference = reference if ours.startswith("mobileone_") else None  # torchvision's nets have no twin
        row["vs ours"] = row["median_ms"] / reference["median_ms"] if reference else None
    return rows


def markdown(rows: list[dict]) -> str:
    """A row per model and batch size, a column per mode x precision: images/s (IQR of the step
    time turned into images/s), and for timm the step-time ratio to ours (> 1: timm is slower)."""
    columns = list(dict.fromkeys((r["mode"], r["precision"]) for r in rows))
    lines = ["| model | batch | " + " | ".join(f"{m} {p}: images/s (IQR)" for m, p in columns) + " |",
             "| --- | --- |" + " --- |" * len(columns)]
    for name, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        cells = []
        for mode, precision in columns:
            row = next(r for r in rows if (r["model"], r["batch"], r["mode"], r["precision"]) == (name, batch, mode, precision))
            cell = f"{row['images_per_s']:.0f} ({batch / row['q3_ms'] * 1e3:.0f}–{batch / row['q1_ms'] * 1e3:.0f})"
            if name.startswith("timm ") and row["vs ours"] is not None:
                cell += f", {row['vs ours']:.2f}× ours"
            cells.append(cell)
        lines.append(f"| {name} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["s0"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64])
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile"])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=list(PRECISIONS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-peers", action="store_true", help="MobileOne only")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    rows = measure(args.variants, args.batch_sizes, args.modes, args.precisions, args.steps, args.warmup,
                   args.device, not args.no_peers)
    print(f"<!-- {describe_machine(args.device, args.threads if args.device == 'cpu' else None)}; "
          f"{args.warmup} warm-up steps, {args.steps} interleaved steps -->")
    print(markdown(rows))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"[train_throughput] wrote {args.csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
