"""Batch-1 inference latency at 224x224: MobileOne (fused and unfused) against torchvision's mobile nets.

    python -m benchmarks.latency [--variants s0 s1] [--rounds 30] [--csv latency.csv]

Peers: torchvision's MobileNetV2 / V3-Large / EfficientNet-B0 and, when timm is installed,
timm's reparameterized ``mobileone_sX`` of the same variants.

Backends: PyTorch eager (fp32, contiguous) and ONNX Runtime on the CPU with 1 thread (a proxy
for one mobile core) and with all threads. The models are timed interleaved (A B C A B C ...)
after a warm-up, so that a noisy shared machine slows all of them alike; the table gives the
median and the interquartile range of the per-round times, and ratios to fused MobileOne-S0
within each backend. Only ratios measured in one run should be compared.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from backbones import mobileone, reparameterize_model, to_onnx_bytes

PEERS = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0")


def models(variants: list[str]) -> dict[str, torch.nn.Module]:
    """Name -> eval-mode model, MobileOne in both forms and the torchvision peers (random weights)."""
    torch.manual_seed(0)
    built: dict[str, torch.nn.Module] = {}
    for variant in variants:
        unfused = mobileone(variant).eval()
        built[f"mobileone_{variant} (fused)"] = reparameterize_model(unfused)
        built[f"mobileone_{variant} (unfused)"] = unfused
    for name in PEERS:
        built[name] = getattr(torchvision.models, name)().eval()
    try:  # timm's MobileOne, the other public implementation (optional: pip install timm)
        import timm
        from timm.utils import reparameterize_model as timm_reparameterize
    except ImportError:
        return built
    for variant in variants:
        built[f"timm mobileone_{variant} (fused)"] = timm_reparameterize(timm.create_model(f"mobileone_{variant}").eval())
    return built


def runners(model: torch.nn.Module, x: torch.Tensor, threads: int) -> dict[str, Callable[[], object]]:
    import onnxruntime

    def eager() -> object:
        with torch.inference_mode():
            return model(x)

    has_batchnorm = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    content = _plain_onnx(model, x) if has_batchnorm else to_onnx_bytes(model, x)  # fused graphs are checked
    result = {"pytorch eager": eager}
    for label, count in (("onnxruntime 1 thread", 1), (f"onnxruntime {threads} threads", threads)):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = count
        options.inter_op_num_threads = 1
        # no spin-waiting after a run: idle pools of the other interleaved sessions would steal the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])
        name, array = session.get_inputs()[0].name, x.numpy()
        result[label] = lambda session=session, name=name, array=array: session.run(None, {name: array})
    return result


def _plain_onnx(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    """ONNX for models that keep BatchNorm in their graph (the train form, the peers); onnxruntime
    folds it into the convs when it optimizes the session."""
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "model.onnx")
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=18, input_names=["images"], external_data=False, verbose=False)
        with open(path, "rb") as handle:
            return handle.read()


def measure(variants: list[str], rounds: int, warmup: int, threads: int) -> list[dict]:
    x = torch.randn(1, 3, 224, 224)
    torch.set_num_threads(threads)
    jobs = {(name, backend): run for name, model in models(variants).items() for backend, run in runners(model, x, threads).items()}
    for run in jobs.values():
        for _ in range(warmup):
            run()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in jobs}
    for _ in range(rounds):
        for key, run in jobs.items():
            start = time.perf_counter()
            run()
            times[key].append((time.perf_counter() - start) * 1e3)
    rows = []
    for (name, backend), values in times.items():
        quartiles = statistics.quantiles(values, n=4)
        rows.append({"model": name, "backend": backend, "median_ms": statistics.median(values),
                     "q1_ms": quartiles[0], "q3_ms": quartiles[2], "rounds": rounds})
    reference = {r["backend"]: r["median_ms"] for r in rows if r["model"] == f"mobileone_{variants[0]} (fused)"}
    for row in rows:
        row[f"vs mobileone_{variants[0]} fused"] = row["median_ms"] / reference[row["backend"]]
    return rows


def markdown(rows: list[dict], reference: str) -> str:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    lines = ["| model | " + " | ".join(f"{b}: median ms (IQR), ratio" for b in backends) + " |", "| --- |" + " --- |" * len(backends)]
    for name in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for backend in backends:
            row = next(r for r in rows if r["model"] == name and r["backend"] == backend)
            cells.append(f"{row['median_ms']:.2f} ({row['q1_ms']:.2f}–{row['q3_ms']:.2f}), {row[reference]:.2f}×")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["s0"], help="MobileOne variants (the first is the reference)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    import onnxruntime

    rows = measure(args.variants, args.rounds, args.warmup, args.threads)
    print(f"<!-- {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, batch 1, 224x224, {args.rounds} interleaved rounds -->")
    print(markdown(rows, f"vs mobileone_{args.variants[0]} fused"))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
