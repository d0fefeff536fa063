"""One line naming the machine a benchmark ran on, for the tables' headers."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: str, threads: int | None = None) -> str:
    """CPU model and core count, the instruction-set flags that decide onnxruntime's int8 kernels,
    torch threads, GPU (on CUDA), and the versions that matter."""
    from backbones.runtimes import cpu_flags, int8_cpu

    flags = [flag for flag in cpu_flags() if flag in ("AVX2", "AVX512F", "AVX512VNNI", "AVX_VNNI")]
    parts = [f"{cpu_model()}, {os.cpu_count()} CPUs ({', '.join(flags) or 'no AVX2'}; int8 kernels: {int8_cpu()})"]
    if threads:
        parts.append(f"{threads} threads")
    if device == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    parts.append(f"Python {platform.python_version()}, torch {torch.__version__}")
    for package in ("onnxruntime", "timm"):
        try:
            parts.append(f"{package} {__import__(package).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)
