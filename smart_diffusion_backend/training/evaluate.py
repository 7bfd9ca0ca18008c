"""Prompt-adherence evaluation: a fixed prompt grid, generation in process, scoring with the analyser.

The served evaluation (scripts/eval_adherence.py) uses the same grid and scoring; only the generator differs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .analyser import analyse
from .dataset import FOREGROUND, SHAPES, DatasetConfig, ShapeSpec, all_combinations


@dataclass(frozen=True)
class EvalCase:
    spec: ShapeSpec
    seed: int

    @property
    def prompt(self) -> str:
        return self.spec.caption()


def grid_cases(backgrounds: Iterable[str] = ("gray", "black"), seeds: Iterable[int] = (0, 1)) -> list[EvalCase]:
    """Every foreground colour x shape on each background (skipping colour == background), centred, medium."""
    return [
        EvalCase(ShapeSpec(shape, color, bg), seed)
        for bg in backgrounds
        for color in FOREGROUND
        if color != bg
        for shape in SHAPES
        for seed in seeds
    ]


def random_cases(n: int, seed: int = 123) -> list[EvalCase]:
    """`n` captions drawn from the whole caption space (sizes, positions, every background)."""
    rng = random.Random(seed)
    combos = all_combinations(DatasetConfig())
    return [EvalCase(combos[rng.randrange(len(combos))], 1000 + i) for i in range(n)]


@dataclass
class Score:
    n: int = 0
    color: int = 0
    shape: int = 0
    background: int = 0
    position: int = 0
    both: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def rate(self, key: str) -> float:
        return getattr(self, key) / max(self.n, 1)

    def summary(self) -> dict[str, float]:
        return {k: self.rate(k) for k in ("color", "shape", "both", "background", "position")} | {"n": self.n}


def score(cases: list[EvalCase], images: list[np.ndarray]) -> Score:
    s = Score()
    for case, image in zip(cases, images):
        a = analyse(image)
        ok_c, ok_s = a.color == case.spec.color, a.shape == case.spec.shape
        s.n += 1
        s.color += ok_c
        s.shape += ok_s
        s.both += ok_c and ok_s
        s.background += a.background == case.spec.background
        s.position += a.position == case.spec.position
        s.rows.append(
            dict(prompt=case.prompt, seed=case.seed, color=a.color, shape=a.shape, background=a.background,
                 position=a.position, fill=round(a.fill, 3), balance=round(a.balance, 3), ok_color=ok_c, ok_shape=ok_s)
        )
    return s


def generate_with_pipeline(pipe, cases: list[EvalCase], steps: int, guidance: float, max_sequence_length: int,
                           size: int = 64, batch: int = 64) -> list[np.ndarray]:
    """FluxPipeline in process; per-case CPU generators make the noise identical to the served stages'."""
    import torch

    images: list[np.ndarray] = []
    for i in range(0, len(cases), batch):
        chunk = cases[i : i + batch]
        out = pipe(
            prompt=[c.prompt for c in chunk],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            max_sequence_length=max_sequence_length,
            generator=[torch.Generator("cpu").manual_seed(c.seed) for c in chunk],
            output_type="np",
        ).images
        images += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]
    return images


def image_grid(images: list[np.ndarray], cols: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """Tile uint8 images row-major into one image (white padding)."""
    h, w, _ = images[0].shape
    rows = (len(images) + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def quick_eval(model_dir: str, device: str = "cpu", steps: int = 20, guidance: float = 3.5,
               max_sequence_length: int = 64, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Grid + 200 random captions in process: the sanity check the training run prints."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model_dir, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    result = {}
    for name, cases in (("grid", grid_cases()), ("random", random_cases(200))):
        s = score(cases, generate_with_pipeline(pipe, cases, steps, guidance, max_sequence_length))
        result[name] = s.summary()
        log(f"{name}: {s.summary()}")
        bad = [r for r in s.rows if not (r["ok_color"] and r["ok_shape"])][:8]
        for r in bad:
            log(f"  miss: {r}")
    return result
