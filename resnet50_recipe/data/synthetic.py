"""A small, learnable, procedurally drawn JPEG ImageFolder, deterministic by seed.

Each class is a shape or pattern (disk, square, star, stripes, ...) drawn in a random colour, position, size
and rotation over a noisy background of another random colour. Colours are drawn independently of the class,
so no class can be told apart by its mean colour: a model has to learn shape. The result is a real
`train/<class>/*.jpg` + `val/<class>/*.jpg` tree, so the same loader code that reads ImageNet reads it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from resnet50_recipe.errors import ExistingOutput, UserError

__all__ = ["SHAPES", "draw_image", "draw_sample", "generate"]

SHAPES = ("disk", "square", "triangle", "star", "cross", "ring", "stripes", "checker", "dots", "crescent")

_SUPERSAMPLE = 4  # draw at 4x and downsample, so edges are anti-aliased like a photo's

_MARKER = "synthetic.json"


def _polygon(points: np.ndarray, angle: float, center: tuple[float, float], radius: float) -> list[tuple]:
    c, s = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[c, s], [-s, c]]) * radius + np.asarray(center)
    return [tuple(p) for p in rotated]


def _regular(n: int, inner: float | None = None) -> np.ndarray:
    count = 2 * n if inner else n
    angles = np.arange(count) * 2 * math.pi / count - math.pi / 2
    radii = np.where(np.arange(count) % 2, inner or 1.0, 1.0)
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)


def _draw_mask(shape: str, size: int, rng: np.random.Generator, center: tuple[float, float] | None = None,
               radius: float | None = None) -> Image.Image:
    """White shape on black, drawn at supersampled resolution. `center` (x, y) and `radius` are fractions of
    the side; the random ones are drawn either way, so that giving them leaves every other draw unchanged."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    drawn_radius, drawn_center = rng.uniform(0.22, 0.40), rng.uniform(0.32, 0.68, size=2)
    radius = (drawn_radius if radius is None else radius) * big
    center = tuple((drawn_center if center is None else np.asarray(center, dtype=float)) * big)
    angle = rng.uniform(0, 2 * math.pi)
    cx, cy = center

    def disk(x, y, r, fill=255):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    def box(x0, y0, x1, y1):  # an axis-aligned box in unit coordinates, rotated about the center
        draw.polygon(_polygon(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), angle, center, radius), fill=255)

    if shape == "disk":
        disk(cx, cy, radius)
    elif shape == "square":
        draw.polygon(_polygon(_regular(4) * 0.95, angle, center, radius), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(_regular(3) * 1.1, angle, center, radius), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(_regular(5, inner=0.42) * 1.1, angle, center, radius), fill=255)
    elif shape == "cross":
        box(-1, -0.3, 1, 0.3)
        box(-0.3, -1, 0.3, 1)
    elif shape == "ring":
        disk(cx, cy, radius)
        disk(cx, cy, radius * 0.6, fill=0)
    elif shape == "stripes":
        for y in (-0.9, -0.3, 0.3):
            box(-1, y, 1, y + 0.32)
    elif shape == "checker":
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    box(-1 + i / 2, -1 + j / 2, -0.5 + i / 2, -0.5 + j / 2)
    elif shape == "dots":
        for x, y in _polygon(np.array([[i, j] for i in (-0.7, 0, 0.7) for j in (-0.7, 0, 0.7)]), angle, center,
                             radius):
            disk(x, y, radius * 0.2)
    elif shape == "crescent":
        disk(cx, cy, radius)
        dx, dy = math.cos(angle) * radius * 0.45, math.sin(angle) * radius * 0.45
        disk(cx + dx, cy + dy, radius * 0.85, fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    return mask.resize((size, size), Image.Resampling.BOX)


def draw_image(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image: a noisy gradient background and a textured shape, colours independent of the class."""
    return draw_sample(shape, size, rng)[0]


def draw_sample(shape: str, size: int, rng: np.random.Generator, center: tuple[float, float] | None = None,
                radius: float | None = None) -> tuple[Image.Image, np.ndarray]:
    """`draw_image` plus where the shape is: a float mask in [0, 1] of the image's size. `center` and `radius`
    (fractions of the side) place the shape; left out, they are drawn as the dataset draws them."""
    background = rng.uniform(0, 255, size=3)
    foreground = rng.uniform(0, 255, size=3)
    while np.abs(foreground - background).sum() < 180:  # keep the shape visible
        foreground = rng.uniform(0, 255, size=3)
    ramp = np.linspace(-1, 1, size)
    direction = rng.uniform(-1, 1, size=2)
    gradient = (ramp[None, :] * direction[0] + ramp[:, None] * direction[1])[..., None] * rng.uniform(0, 40)
    back = background + gradient + rng.normal(0, rng.uniform(8, 30), size=(size, size, 3))
    front = foreground + rng.normal(0, 12, size=(size, size, 3))
    alpha = np.asarray(_draw_mask(shape, size, rng, center, radius), dtype=np.float32)[..., None] / 255.0
    pixels = np.clip(alpha * front + (1 - alpha) * back, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), alpha[..., 0]


def generate(out: str | Path, classes: int = 10, per_class: int = 300, val_per_class: int = 50, size: int = 64,
             seed: int = 0) -> Path:
    """Write `out/{train,val}/<shape>/<n>.jpg`; the same arguments always give the same bytes.

    The tree is built in a temporary sibling folder and renamed into place, so an interrupted run never
    leaves a half-written dataset that looks complete. An existing folder made with the same arguments is
    reused; anything else already at `out` is an error, never overwritten.
    """
    out = Path(out)
    params = {"classes": classes, "per_class": per_class, "val_per_class": val_per_class, "size": size, "seed": seed}
    if not 2 <= classes <= len(SHAPES):
        raise UserError(f"classes={classes}: the generator draws between 2 and {len(SHAPES)} classes "
                        f"({', '.join(SHAPES)})")
    if out.exists():
        marker = out / _MARKER
        if marker.is_file() and json.loads(marker.read_text()) == params:
            return out
        raise ExistingOutput(f"{out} already exists and is not a synthetic dataset made with {params}; "
                             "choose another folder or remove it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split_id, (split, count) in enumerate((("train", per_class), ("val", val_per_class))):
        for label, shape in enumerate(SHAPES[:classes]):
            folder = tmp / split / shape
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_id, label, i])
                draw_image(shape, size, rng).save(folder / f"{shape}_{i:05d}.jpg", quality=90)
    (tmp / _MARKER).write_text(json.dumps(params))
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
