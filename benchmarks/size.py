"""Parameters and multiply-accumulates of MobileOne S0-S4, train and inference form, at 224x224.

    python -m benchmarks.size

MACs are counted with torch's own ``FlopCounterMode`` (convolutions and matrix products; it
counts 2 FLOPs per multiply-accumulate, so MACs = FLOPs / 2) for one 3x224x224 image and a
1000-class head, and compared with the paper's table (its "FLOPs" column is MACs).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from backbones import mobileone

PAPER_MACS_M = {"s0": 275, "s1": 825, "s2": 1299, "s3": 1896, "s4": 2978}


def macs(model: torch.nn.Module, size: int = 224) -> float:
    """Multiply-accumulates of one forward pass on a 1x3xsize x size input."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2


def table() -> str:
    lines = [
        "| variant | params inference (M) | params train (M) | MACs inference (M) | MACs train (M) | paper MACs (M) | difference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, paper in PAPER_MACS_M.items():
        fused, train = mobileone(variant, inference_mode=True), mobileone(variant)
        fused_macs, train_macs = macs(fused) / 1e6, macs(train) / 1e6
        params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (fused, train)]
        lines.append(
            f"| {variant.upper()} | {params[0]:.3f} | {params[1]:.3f} | {fused_macs:.1f} | {train_macs:.1f} | {paper} | "
            f"{(fused_macs - paper) / paper * 100:+.2f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
