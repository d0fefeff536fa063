"""Measure how exactly reparameterization preserves the network, per variant and output stride.

    python -m benchmarks.reparam_error            # Markdown tables of relative errors
    python -m benchmarks.reparam_error --params   # inference-form parameter counts vs the paper

Every BatchNorm gets non-default statistics (``backbones.testing.randomize_batchnorm``), the
model is evaluated in eval mode on random 2x3x128x128 inputs, and errors are
``||fused - reference|| / ||reference||``. Columns:

- ``fp32 fused vs unfused``: what a user sees comparing the two float32 models (worst stage).
- ``fp32 fused vs exact`` / ``fp32 unfused vs exact``: each float32 model against the float64
  train-form model, i.e. how much of the difference is float32 rounding in either model.
- ``fp64 fused vs unfused``: the fusion itself, with float32 rounding taken out.
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch

from backbones import mobileone, reparameterize_model
from backbones.export import relative_error
from backbones.testing import randomize_batchnorm

VARIANTS = ("s0", "s1", "s2", "s3", "s4")
PAPER_PARAMS_M = {"s0": 2.08, "s1": 4.76, "s2": 7.81, "s3": 10.08, "s4": 14.84}


@torch.no_grad()
def errors(variant: str, output_stride: int | None, size: int = 128) -> dict[str, float]:
    """Worst relative errors over the returned outputs (logits, or the stage 1-4 feature maps).

    ``worst output`` is the index, among the outputs, of the worst "fp32 fused vs unfused" one.
    """
    torch.manual_seed(0)  # conv weights; BN statistics and inputs have their own seeds
    if output_stride is None:
        model = mobileone(variant, num_classes=1000)
    else:
        model = mobileone(variant, out_indices=(1, 2, 3, 4), output_stride=output_stride)
    model = randomize_batchnorm(model).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    exact_model = copy.deepcopy(model).double()

    def outputs(net: torch.nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
        out = net(inputs)
        return out if isinstance(out, list) else [out]

    unfused32 = outputs(model, x)
    fused32 = outputs(reparameterize_model(model), x)
    unfused64 = outputs(exact_model, x.double())
    fused64 = outputs(reparameterize_model(exact_model), x.double())
    fused_vs_unfused = list(map(relative_error, fused32, unfused32))
    return {
        "fp32 fused vs unfused": max(fused_vs_unfused),
        "worst output": fused_vs_unfused.index(max(fused_vs_unfused)),
        "fp32 fused vs exact": max(map(relative_error, fused32, unfused64)),
        "fp32 unfused vs exact": max(map(relative_error, unfused32, unfused64)),
        "fp64 fused vs unfused": max(map(relative_error, fused64, unfused64)),
    }


def error_table() -> str:
    columns = ["fp32 fused vs unfused", "fp32 fused vs exact", "fp32 unfused vs exact", "fp64 fused vs unfused"]
    lines = ["| variant | output | " + " | ".join(columns) + " |", "| --- | --- |" + " --- |" * len(columns)]
    for variant in VARIANTS:
        for output_stride in (None, 32, 16, 8):
            row = errors(variant, output_stride)
            if output_stride is None:
                label = "logits"
            else:
                label = f"features, OS {output_stride} (worst: stage {row['worst output'] + 1})"
            lines.append(f"| {variant.upper()} | {label} | " + " | ".join(f"{row[c]:.2e}" for c in columns) + " |")
    return "\n".join(lines)


def params_table() -> str:
    lines = ["| variant | ours, inference form (M) | paper (M) | difference | train form (M) |", "| --- | --- | --- | --- | --- |"]
    for variant in VARIANTS:
        fused = sum(p.numel() for p in mobileone(variant, inference_mode=True).parameters()) / 1e6
        train = sum(p.numel() for p in mobileone(variant).parameters()) / 1e6
        diff = (fused - PAPER_PARAMS_M[variant]) / PAPER_PARAMS_M[variant] * 100
        lines.append(f"| {variant.upper()} | {fused:.3f} | {PAPER_PARAMS_M[variant]} | {diff:+.2f}% | {train:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", action="store_true", help="print parameter counts instead of errors")
    args = parser.parse_args()
    print(f"<!-- {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__} -->")
    print(params_table() if args.params else error_table())


if __name__ == "__main__":
    main()
