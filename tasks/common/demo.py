"""Drawing the tasks' synthetic demo images: coloured shapes on cluttered backgrounds.

Each task's data module writes its demo set in its own on-disk format (ImageFolder, COCO, VOC)
with these painters, so that the three sets look alike and a class is a shape of its own hue.
"""

from __future__ import annotations

import colorsys
import random
from collections.abc import Sequence

from PIL import ImageDraw

__all__ = ["SHAPES", "draw_clutter", "draw_shape", "jittered_colour"]

SHAPES = ("circle", "square", "triangle", "cross", "stripes")


def jittered_colour(rng: random.Random, hue: float, min_saturation: float) -> tuple[int, int, int]:
    """An RGB colour of ``hue`` (0..1) moved by up to ±0.04, saturation and value drawn from [``min_saturation``, 1]."""
    hue = (hue + rng.uniform(-0.04, 0.04)) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, rng.uniform(min_saturation, 1.0), rng.uniform(min_saturation, 1.0))
    return int(red * 255), int(green * 255), int(blue * 255)


def draw_clutter(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, count: tuple[int, int], max_radius: int) -> None:
    """A random number (``count``: inclusive range) of small dots of random colours anywhere on the image."""
    for _ in range(rng.randint(*count)):
        x, y, r = rng.randint(0, size), rng.randint(0, size), rng.randint(1, max_radius)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randint(0, 255) for _ in range(3)))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], fill: object, outline: object = None,
               line_width: int | None = None) -> None:
    """``shape`` (one of ``SHAPES``) filling ``box`` (left, top, right, bottom); the triangle points
    up; ``cross`` and ``stripes`` are drawn with lines of ``line_width`` (default: a sixth of the box)."""
    left, top, right, bottom = box
    width = line_width or max(2, int((right - left) / 6))
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill, outline=outline)
    elif shape == "triangle":
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill, outline=outline)
    elif shape == "cross":
        draw.line((left, top, right, bottom), fill=fill, width=width)
        draw.line((left, bottom, right, top), fill=fill, width=width)
    elif shape == "stripes":
        for offset in range(0, int(right - left), 2 * width):
            draw.rectangle((left, top + offset, right, top + offset + width - 1), fill=fill)
    else:
        raise ValueError(f"unknown demo shape {shape!r}; expected one of {SHAPES}")
