"""Inference latency (batch 1) and throughput (batch 32 / 64) at 224x224: MobileOne against its peers.

    python -m benchmarks.latency                                          # CPU, batch 1: eager + onnxruntime
    python -m benchmarks.latency --backends eager eager-cl compile ort-1 ort --batch-sizes 1 32
    python -m benchmarks.latency --variants s0 s1 s2 s3 s4 --backends ort-1 --plot figure1.png
    python -m benchmarks.latency --device cuda --backends eager eager-fp16 eager-bf16 compile-bf16 --batch-sizes 1 64

Models: MobileOne in inference form (fused) and, for the first variant (``--unfused all`` for
every variant), in train form (unfused); torchvision's MobileNetV2 / V3-Large / EfficientNet-B0;
timm's reparameterized ``mobileone_sX`` of the same variants when timm is installed
(``pip install -e ".[bench]"``). Random weights: latency does not depend on them.

Backends (``--backends``):

- ``eager``: PyTorch eager; suffixes ``-cl`` (channels_last), ``-fp16``, ``-bf16`` (model and
  input cast; on CUDA half precision also uses channels_last, the tensor-core layout).
- ``compile``: ``torch.compile`` (``--compile-mode``), with the same suffixes.
- ``ort-1``, ``ort``: ONNX Runtime on the CPU with 1 thread (a proxy for one mobile core) and
  with ``--threads`` threads, spin-waiting disabled.
- ``ort-int8-1``, ``ort-int8``: the same on the model quantized to INT8 (``backbones.runtimes.quantize_onnx``,
  static QDQ, calibrated on random inputs: latency does not depend on the values).
- ``executorch-1``, ``executorch``, ``executorch-int8-1``, ``executorch-int8``: ExecuTorch's
  runtime with the XNNPACK delegate, float32 or INT8 (PT2E), 1 or ``--threads`` threads (needs
  ``pip install -e ".[executorch]"``). ExecuTorch has one thread pool per process: one run takes
  one thread count for all its ExecuTorch backends.

The models are timed interleaved (A B C A B C ...) after a warm-up, so that a noisy shared
machine slows all of them alike; each row gives the median and interquartile range of the
per-round times (CUDA events on a GPU) and the ratio to the first variant's fused model in the
same backend and batch size. Only ratios measured in one run should be compared.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from backbones import mobileone, reparameterize_model, to_onnx_bytes
from backbones.atomic import atomic_write_file
from backbones.export import FORBIDDEN_ONNX_OPS, fold_batchnorm_
from backbones.runtimes import ExecuTorchNetwork, OnnxRuntimeNetwork, quantize_onnx, to_executorch
from benchmarks.machine import describe_machine
from benchmarks.timing import median_and_quartiles, time_ms, write_csv
from tasks.common.backbones import BASELINE_BACKBONES, classifier_network

# ImageNet top-1 for the plot: the paper's Table for MobileOne; torchvision's own documented
# figure of each peer's default weights (``weights.meta``), read at run time.
PAPER_TOP1 = {"s0": 71.4, "s1": 75.9, "s2": 77.4, "s3": 78.1, "s4": 79.4}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Backend:
    """One way of running a model: ``kind`` is eager, compile or ort."""

    name: str
    kind: str
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    threads: int = 1

    int8: bool = False

    @classmethod
    def parse(cls, name: str, device: str, threads: int) -> Backend:
        """``eager``, ``eager-cl``, ``compile-bf16``, ``ort-1``, ``ort-int8``, ``executorch-int8-1`` ...
        (see the module docstring)."""
        kind, _, rest = name.partition("-")
        if kind in ("ort", "executorch") and rest in ("", "1", "int8", "int8-1"):
            if device != "cpu":
                raise ValueError(f"backend {name!r} runs on the CPU; drop it or use --device cpu")
            return cls(name, kind, threads=1 if rest.endswith("1") else threads, int8=rest.startswith("int8"))
        kind, *flags = name.split("-")
        unknown = [f for f in flags if f not in ("cl", *DTYPES)]
        if kind not in ("eager", "compile") or unknown or len([f for f in flags if f in DTYPES]) > 1:
            raise ValueError(
                f"unknown backend {name!r}: expected eager|compile[-cl][-fp16|-bf16], ort[-int8][-1] or executorch[-int8][-1]"
            )
        dtype = next((DTYPES[f] for f in flags if f in DTYPES), torch.float32)
        half = dtype != torch.float32 and device == "cuda"
        return cls(name, kind, dtype, channels_last="cl" in flags or half, threads=threads)

    @property
    def label(self) -> str:
        if self.kind in ("ort", "executorch"):
            runtime = "onnxruntime" if self.kind == "ort" else "ExecuTorch XNNPACK"
            return f"{runtime}{' int8' if self.int8 else ''} {self.threads} thread{'s' if self.threads > 1 else ''}"
        dtype = {v: k for k, v in DTYPES.items()}[self.dtype]
        return f"{'torch.compile' if self.kind == 'compile' else 'eager'} {dtype}{' channels_last' if self.channels_last else ''}"


def models(variants: list[str], unfused: str = "first", peers: bool = True) -> dict[str, torch.nn.Module]:
    """Name -> eval-mode model: MobileOne fused (and unfused for the first / every variant), the
    torchvision peers, and timm's reparameterized MobileOne when timm is installed (random weights)."""
    torch.manual_seed(0)
    built: dict[str, torch.nn.Module] = {}
    for index, variant in enumerate(variants):
        train_form = mobileone(variant).eval()
        built[f"mobileone_{variant} (fused)"] = reparameterize_model(train_form)
        if unfused == "all" or (unfused == "first" and index == 0):
            built[f"mobileone_{variant} (unfused)"] = train_form
    if not peers:
        return built
    for name in BASELINE_BACKBONES:  # built as the tasks build them
        built[name] = classifier_network(name, num_classes=1000).eval()
    try:  # timm's MobileOne, the other public implementation (optional: pip install timm)
        import timm
        from timm.utils import reparameterize_model as timm_reparameterize
    except ImportError:
        return built
    for variant in variants:
        built[f"timm mobileone_{variant} (fused)"] = timm_reparameterize(timm.create_model(f"mobileone_{variant}").eval())
    return built


def top1(name: str) -> float | None:
    """Documented ImageNet top-1 of a benchmarked model, or None (timm's copies are not plotted)."""
    if name.startswith("mobileone_"):
        return PAPER_TOP1.get(name.split()[0].removeprefix("mobileone_"))
    if name in BASELINE_BACKBONES:
        return torchvision.models.get_model_weights(name).DEFAULT.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    return None


def runner(
    model: torch.nn.Module, backend: Backend, device: str, compile_mode: str, onnx_cache: dict[tuple[int, bool], bytes]
) -> Callable[[object], object]:
    """A function running ``model`` on a batch already converted by ``_convert`` the way ``backend``
    says. Eager / compiled backends run on a copy of ``model``; ONNX files are cached per model."""
    if backend.kind == "executorch":
        return _executorch_runner(model, backend)
    if backend.kind == "ort":
        key = (id(model), backend.int8)
        if (id(model), False) not in onnx_cache:
            # fused MobileOne must have no BatchNorm left (checked); the train form and the peers keep
            # theirs, which onnxruntime folds into the convs when it optimizes the session
            fused = not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
            onnx_cache[id(model), False] = to_onnx_bytes(
                model, torch.randn(1, 3, 224, 224), forbidden_ops=FORBIDDEN_ONNX_OPS if fused else frozenset()
            )
        if key not in onnx_cache:
            onnx_cache[key] = quantize_onnx(onnx_cache[id(model), False], [torch.randn(8, 3, 224, 224)])

        # no spin-waiting after a run: the idle pools of the other interleaved sessions would steal the cores
        return OnnxRuntimeNetwork(onnx_cache[key], backend.threads, spin_wait=False).run_array

    memory_format = torch.channels_last if backend.channels_last else torch.contiguous_format
    # a copy: .to(dtype) and torch.compile must not leak from one backend into the next
    model = copy.deepcopy(model).to(device=device, dtype=backend.dtype, memory_format=memory_format)
    if backend.kind == "compile":
        model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode, dynamic=False)

    def run(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return model(x)

    return run


def _executorch_runner(model: torch.nn.Module, backend: Backend) -> Callable[[object], object]:
    """An ExecuTorch XNNPACK program of ``model`` (conv-BN pairs folded first; INT8 calibrated on
    random inputs), run in ExecuTorch's runtime with ``backend.threads`` threads."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(backend.threads)  # one pool per process (see measure)
    model = fold_batchnorm_(copy.deepcopy(model).eval())
    calibration = [torch.randn(8, 3, 224, 224)] if backend.int8 else None
    return ExecuTorchNetwork(to_executorch(model, torch.randn(1, 3, 224, 224), calibration=calibration))


def _convert(x: torch.Tensor, backend: Backend, device: str) -> object:
    if backend.kind == "ort":
        return x.numpy()
    if backend.kind == "executorch":
        return x
    memory_format = torch.channels_last if backend.channels_last else torch.contiguous_format
    return x.to(device=device, dtype=backend.dtype, memory_format=memory_format)


def _progress(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[latency] {message}", file=sys.stderr, flush=True)


def measure(
    variants: list[str],
    backends: list[str],
    batch_sizes: Sequence[int] = (1,),
    rounds: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    device: str = "cpu",
    unfused: str = "first",
    peers: bool = True,
    compile_mode: str = "default",
) -> list[dict]:
    """Time every model x backend x batch size, interleaved per batch size; one row each."""
    threads = threads or os.cpu_count() or 1
    if device == "cpu":
        torch.set_num_threads(threads)
    parsed = [Backend.parse(b, device, threads) for b in backends]
    if len({b.threads for b in parsed if b.kind == "executorch"}) > 1:
        raise ValueError(f"{backends}: ExecuTorch has one thread pool per process; time executorch-1 and executorch in separate runs")
    built = models(variants, unfused, peers)
    onnx_cache: dict[tuple[int, bool], bytes] = {}
    runs = {(name, b): runner(model, b, device, compile_mode, onnx_cache) for name, model in built.items() for b in parsed}
    _progress(f"{len(built)} models x {len(parsed)} backends prepared; timing batch sizes {list(batch_sizes)}, {rounds} rounds each")
    reference_model = f"mobileone_{variants[0]} (fused)"
    rows = []
    for batch in batch_sizes:
        images = torch.randn(batch, 3, 224, 224)
        inputs = {b: _convert(images, b, device) for b in parsed}
        for (_, backend), run in runs.items():
            for _ in range(warmup):
                run(inputs[backend])
        times: dict[tuple[str, Backend], list[float]] = {key: [] for key in runs}
        for round_index in range(rounds):
            for (name, backend), run in runs.items():
                times[name, backend].append(time_ms(lambda run=run, x=inputs[backend]: run(x), device))
            if (round_index + 1) % 10 == 0 or round_index + 1 == rounds:
                _progress(f"batch {batch}: round {round_index + 1}/{rounds}")
        for (name, backend), values in times.items():
            median, q1, q3 = median_and_quartiles(values)
            rows.append({
                "device": device, "model": name, "backend": backend.label, "batch": batch,
                "median_ms": median, "q1_ms": q1, "q3_ms": q3, "images_per_s": batch / median * 1e3,
                "rounds": rounds, "top1": top1(name),
            })
        reference = {r["backend"]: r["median_ms"] for r in rows if r["model"] == reference_model and r["batch"] == batch}
        for row in rows:
            if row["batch"] == batch:
                row["ratio"] = row["median_ms"] / reference[row["backend"]]
    return rows


def markdown(rows: list[dict], reference: str) -> str:
    """One table per batch size: a row per model, a column per backend. Batch 1 cells give the
    median latency (IQR); larger batches give images/s and the median time per batch. ``ratio``
    = median / ``reference``'s median in the same column (> 1: slower than the reference)."""
    tables = []
    for batch in dict.fromkeys(r["batch"] for r in rows):
        subset = [r for r in rows if r["batch"] == batch]
        backends = list(dict.fromkeys(r["backend"] for r in subset))
        what = "median ms (IQR), ratio" if batch == 1 else "images/s (median ms per batch), ratio"
        lines = [f"Batch {batch}, ratio = median / {reference}'s median in the same column:", "",
                 "| model | " + " | ".join(f"{b}: {what}" for b in backends) + " |",
                 "| --- |" + " --- |" * len(backends)]
        for name in dict.fromkeys(r["model"] for r in subset):
            cells = []
            for backend in backends:
                row = next(r for r in subset if r["model"] == name and r["backend"] == backend)
                if batch == 1:
                    cells.append(f"{row['median_ms']:.2f} ({row['q1_ms']:.2f}–{row['q3_ms']:.2f}), {row['ratio']:.2f}×")
                else:
                    cells.append(f"{row['images_per_s']:.0f} ({row['median_ms']:.1f}), {row['ratio']:.2f}×")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def plot(rows: list[dict], path: str, backend: str, title: str) -> None:
    """ImageNet top-1 against measured batch-1 latency in one backend, like the paper's Figure 1.
    MobileOne's train form (unfused) is drawn hollow at the same accuracy: the cost that
    reparameterization removes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit('--plot needs matplotlib: pip install -e ".[bench]"') from error
    points = [r for r in rows if r["backend"] == backend and r["batch"] == 1 and r["top1"] is not None]
    if not points:
        raise SystemExit(f"--plot: no batch-1 rows with a known top-1 for backend {backend!r}")
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    fused = sorted((r for r in points if r["model"].endswith("(fused)")), key=lambda r: r["median_ms"])
    axes.plot([r["median_ms"] for r in fused], [r["top1"] for r in fused], "o-", color="tab:red", label="MobileOne (fused)")
    for row in points:
        name = row["model"].replace("mobileone_", "").replace(" (fused)", "").upper() if row["model"].startswith("mobileone_") else row["model"]
        if row["model"].endswith("(unfused)"):
            axes.plot(row["median_ms"], row["top1"], "o", mfc="none", color="tab:red", label="MobileOne (unfused, train form)")
            name = name.replace(" (UNFUSED)", " unfused")
        elif not row["model"].startswith("mobileone_"):
            axes.plot(row["median_ms"], row["top1"], "s", color="tab:blue", label="torchvision (default weights' top-1)")
        axes.annotate(name, (row["median_ms"], row["top1"]), textcoords="offset points", xytext=(5, -10), fontsize=8)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys(), loc="best", fontsize=8)
    axes.set_xlabel(f"latency, batch 1, 224×224, {backend} (ms, median)")
    axes.set_ylabel("ImageNet top-1 (%)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write_file(path, lambda temporary: figure.savefig(temporary, format=Path(path).suffix.lstrip(".") or "png"))
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["s0"], help="MobileOne variants (the first is the reference)")
    parser.add_argument("--backends", nargs="+", default=None, help="default: eager ort-1 ort on CPU, eager eager-fp16 eager-bf16 on CUDA")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--unfused", default="first", choices=["first", "all", "none"], help="which variants also run in train form")
    parser.add_argument("--no-peers", action="store_true", help="MobileOne only")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of eager / compile / ort")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    parser.add_argument("--plot", default=None, help="also draw top-1 against batch-1 latency to this PNG")
    parser.add_argument("--plot-backend", default=None, help="backend of the plot, e.g. ort-1 (default: the first)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    backends = args.backends or (["eager", "ort-1", "ort"] if args.device == "cpu" else ["eager", "eager-fp16", "eager-bf16"])
    rows = measure(args.variants, backends, args.batch_sizes, args.rounds, args.warmup, args.threads,
                   args.device, args.unfused, not args.no_peers, args.compile_mode)
    machine = describe_machine(args.device, args.threads)
    print(f"<!-- {machine}; 224x224, {args.warmup} warm-up runs, {args.rounds} interleaved rounds -->")
    print(markdown(rows, f"mobileone_{args.variants[0]} (fused)"))
    if args.csv:
        write_csv(rows, args.csv)
        _progress(f"wrote {args.csv}")
    if args.plot:
        plot(rows, args.plot, Backend.parse(args.plot_backend or backends[0], args.device, args.threads).label, machine)
        _progress(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
