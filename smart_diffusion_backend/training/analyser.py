"""Deterministic prompt-adherence analyser: what shape, in what colour, is in an image?

Pure pixel statistics, no learned weights, so it cannot share a failure mode with the model:
background = per-channel median of the border pixels; foreground mask = pixels far from it;
colour = nearest palette colour to the mask's median; shape from the mask's bounding box:
  - triangle: far more mass in the bottom half than the top (apex up);
  - square: the mask fills its bounding box (fill ~1.0);
  - circle: otherwise (fill ~pi/4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .dataset import BACKGROUND, FOREGROUND, POSITIONS, SHAPES, SIZES


@dataclass(frozen=True)
class AnalyserConfig:
    min_threshold: float = 40.0  # RGB distance below which a pixel is always background
    threshold_fraction: float = 0.5  # of the 99th-percentile distance: adapts to the fg/bg contrast
    triangle_balance: float = 0.6  # top-half / bottom-half mass below this -> triangle (ideal 1/3)
    square_fill: float = 0.89  # bounding-box fill above this -> square (ideal 1.0; circle pi/4)
    min_pixels: int = 12  # fewer foreground pixels -> "no shape"


@dataclass(frozen=True)
class Analysis:
    color: str | None
    shape: str | None
    background: str
    fill: float
    balance: float  # top-half mass / bottom-half mass of the mask
    center: tuple[float, float]  # mask centroid as a fraction of width / height
    extent: float  # mean bounding-box side as a fraction of the image side
    pixels: int

    @property
    def position(self) -> str:
        return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - self.center[0]) ** 2 + (POSITIONS[p][1] - self.center[1]) ** 2)

    @property
    def size(self) -> str:
        return min(SIZES, key=lambda s: abs(SIZES[s] / 64 - self.extent))


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((rgb - np.asarray(palette[name], np.float32)) ** 2)))


def analyse(image: np.ndarray, config: AnalyserConfig = AnalyserConfig()) -> Analysis:
    """`image` uint8 [H, W, 3]."""
    img = np.asarray(image, dtype=np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    threshold = max(config.min_threshold, config.threshold_fraction * float(np.percentile(dist, 99)))
    mask = dist > threshold
    count = int(mask.sum())
    background = _nearest(bg, BACKGROUND)
    if count < config.min_pixels:
        return Analysis(None, None, background, 0.0, 1.0, (0.5, 0.5), 0.0, count)

    ys, xs = np.nonzero(mask)
    color = _nearest(np.median(img[mask], axis=0), FOREGROUND)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = count / float((y1 - y0 + 1) * (x1 - x0 + 1))
    mid = (y0 + y1) / 2
    top, bottom = float((ys < mid).sum()), float((ys > mid).sum())
    balance = top / max(bottom, 1.0)
    if balance < config.triangle_balance:
        shape = "triangle"
    elif fill > config.square_fill:
        shape = "square"
    else:
        shape = "circle"
    center = (float(xs.mean() + 0.5) / w, float((y0 + y1 + 1) / 2) / h)
    extent = ((x1 - x0 + 1) / w + (y1 - y0 + 1) / h) / 2
    return Analysis(color, shape, background, fill, balance, center, extent, count)


_PROMPT = re.compile(
    r"\b(?:(small|large)\s+)?(" + "|".join(FOREGROUND) + r")\s+(" + "|".join(SHAPES) + r")\b"
    r"(?:\s+on\s+an?\s+(" + "|".join(BACKGROUND) + r")\s+background)?"
)


def parse_prompt(prompt: str) -> tuple[str, str, str | None]:
    """(colour, shape, background or None) named by a dataset-style prompt."""
    m = _PROMPT.search(prompt.lower())
    if not m:
        raise ValueError(f"not a shapes prompt: {prompt!r}")
    return m.group(2), m.group(3), m.group(4)
