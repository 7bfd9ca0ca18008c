"""Synthetic captioned shapes, generated in code and deterministic from a seed.

One image = one coloured shape (circle / square / triangle) on a flat background, at one of nine
positions and three sizes, with a small positional jitter. The caption names everything drawn,
e.g. "a small red circle on a blue background, top left", so a model conditioned on it has all the
information it needs and an analyser can check the result from pixels alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Palettes: name -> RGB. Colours are far apart so a blurry generated image is still unambiguous.
FOREGROUND: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUND: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "blue": (30, 70, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Size word -> side of the shape's bounding box at 64x64 (scaled with the image).
SIZES: dict[str, int] = {"small": 16, "medium": 24, "large": 32}
# Position phrase -> (x, y) centre as a fraction of the image side.
_AXIS = {"left": 0.28, "center": 0.5, "right": 0.72, "top": 0.28, "bottom": 0.72}
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (_AXIS["left"], _AXIS["top"]),
    "top": (_AXIS["center"], _AXIS["top"]),
    "top right": (_AXIS["right"], _AXIS["top"]),
    "left": (_AXIS["left"], _AXIS["center"]),
    "center": (_AXIS["center"], _AXIS["center"]),
    "right": (_AXIS["right"], _AXIS["center"]),
    "bottom left": (_AXIS["left"], _AXIS["bottom"]),
    "bottom": (_AXIS["center"], _AXIS["bottom"]),
    "bottom right": (_AXIS["right"], _AXIS["bottom"]),
}


@dataclass(frozen=True)
class ShapeSpec:
    """Everything one sample shows; `caption()` is its text."""

    shape: str
    color: str
    background: str
    size: str = "medium"
    position: str = "center"
    jitter: tuple[int, int] = (0, 0)  # pixels at 64x64, scaled with the image

    def caption(self) -> str:
        size = "" if self.size == "medium" else f"{self.size} "
        return f"a {size}{self.color} {self.shape} on a {self.background} background, {self.position}"


@dataclass(frozen=True)
class DatasetConfig:
    size: int = 64  # image side in pixels
    max_jitter: int = 2  # +- pixels at 64x64: variety without making positions ambiguous
    foreground: tuple[str, ...] = tuple(FOREGROUND)
    background: tuple[str, ...] = tuple(BACKGROUND)
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = tuple(SIZES)
    positions: tuple[str, ...] = tuple(POSITIONS)


@dataclass
class ShapesDataset:
    """`n` samples drawn from a seed: `images` uint8 [n, H, W, 3] and their captions."""

    specs: list[ShapeSpec]
    images: np.ndarray
    config: DatasetConfig = field(default_factory=DatasetConfig)

    @property
    def captions(self) -> list[str]:
        return [s.caption() for s in self.specs]

    def __len__(self) -> int:
        return len(self.specs)


def render(spec: ShapeSpec, size: int = 64) -> np.ndarray:
    """Draw one spec as uint8 [size, size, 3]; no anti-aliasing, so pixels are exactly palette colours."""
    scale = size / 64
    image = Image.new("RGB", (size, size), BACKGROUND[spec.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[spec.position]
    cx = fx * size + spec.jitter[0] * scale
    cy = fy * size + spec.jitter[1] * scale
    half = SIZES[spec.size] * scale / 2
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
    colour = FOREGROUND[spec.color]
    if spec.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif spec.shape == "square":
        draw.rectangle(box, fill=colour)
    elif spec.shape == "triangle":  # upright isosceles, apex at the top centre
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; known: {SHAPES}")
    return np.asarray(image, dtype=np.uint8)


def all_combinations(config: DatasetConfig = DatasetConfig()) -> list[ShapeSpec]:
    """Every distinct caption (foreground never equals background)."""
    return [
        ShapeSpec(shape, color, bg, size, pos)
        for shape in config.shapes
        for color in config.foreground
        for bg in config.background
        if bg != color
        for size in config.sizes
        for pos in config.positions
    ]


def sample_specs(n: int, seed: int, config: DatasetConfig = DatasetConfig()) -> list[ShapeSpec]:
    """`n` specs, uniform over the combinations, with jitter; a private RNG keeps it seed-deterministic."""
    rng = random.Random(seed)
    combos = all_combinations(config)
    specs = []
    for _ in range(n):
        base = combos[rng.randrange(len(combos))]
        jitter = (rng.randint(-config.max_jitter, config.max_jitter), rng.randint(-config.max_jitter, config.max_jitter))
        specs.append(ShapeSpec(base.shape, base.color, base.background, base.size, base.position, jitter))
    return specs


def make_dataset(n: int, seed: int = 0, config: DatasetConfig = DatasetConfig()) -> ShapesDataset:
    specs = sample_specs(n, seed, config)
    images = np.stack([render(s, config.size) for s in specs]) if specs else np.zeros((0, config.size, config.size, 3), np.uint8)
    return ShapesDataset(specs=specs, images=images, config=config)
