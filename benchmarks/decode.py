"""Image decoding throughput: torchvision's ``decode_image`` vs PIL, to uint8 RGB tensors.

    python -m benchmarks.decode ../shared/datasets/hymenoptera [--repeats 3]

Decodes every JPEG/PNG under the folder with each decoder, interleaved (A B A B ...), single
threaded, and prints images per second (median over repeats) and the largest pixel difference
between the two decoders' outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.machine import describe_machine
from tasks.common.data import list_images


def decode_torchvision(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(str(path), mode=ImageReadMode.RGB)


def decode_pil(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)


DECODERS: dict[str, Callable[[Path], torch.Tensor]] = {"torchvision": decode_torchvision, "pil": decode_pil}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    paths = list_images(args.folder)
    if not paths:
        raise SystemExit(f"no images under {args.folder}")
    difference = max(int((decode_torchvision(p).int() - decode_pil(p).int()).abs().max()) for p in paths)
    seconds: dict[str, list[float]] = {name: [] for name in DECODERS}
    for _ in range(args.repeats):
        for name, decode in DECODERS.items():
            start = time.perf_counter()
            for path in paths:
                decode(path)
            seconds[name].append(time.perf_counter() - start)
    print(f"machine: {describe_machine('cpu', 1)}; {len(paths)} images under {args.folder}")
    for name, values in seconds.items():
        print(f"{name}: {len(paths) / statistics.median(values):.1f} images/s (median of {args.repeats})")
    print(f"largest pixel difference between the decoders: {difference}")


if __name__ == "__main__":
    main()
