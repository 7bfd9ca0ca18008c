"""How far a fast path's images lie from the exact path's: the check behind `fast_path` (and fp8_linear).

The exact path is diffusers' own math (SDPA attention, eager, bf16/fp32 GEMMs); the fast path swaps in our
attention kernels, regional compile and FP8 GEMMs. Both render the same prompts with the same seeds through
the same text encoder and VAE; only the denoiser differs. Per image:

- PSNR in dB over the uint8 pixels (255 peak);
- SSIM (Gaussian window 11, sigma 1.5, on luma), a structure-aware score that tracks perceived change
  better than PSNR (LPIPS needs pretrained networks that an offline host does not have).

tests/test_fast_path_quality.py gates shapes-flux on CPU with it; scripts/check_fast_path.py runs it on an
operator's own weights on their GPU before they keep fp8 on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .params import ModelParams, SystemParams, UserParams


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two uint8 RGB images [H, W, 3] on their luma (1.0 when equal)."""

    def luma(x: np.ndarray) -> torch.Tensor:
        rgb = torch.from_numpy(x.astype(np.float64)).permute(2, 0, 1)
        return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None, None]

    coords = torch.arange(11, dtype=torch.float64) - 5
    gauss = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (gauss[:, None] * gauss[None, :] / gauss.sum() ** 2)[None, None]
    x, y = luma(a), luma(b)
    pad = min(5, (min(x.shape[-2:]) - 1) // 2)
    window = window[..., 5 - pad : 6 + pad, 5 - pad : 6 + pad]
    window = window / window.sum()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


@dataclass(frozen=True)
class Comparison:
    prompt: str
    seed: int
    psnr_db: float
    ssim: float


def render(model: ModelParams, system: SystemParams, prompts: Sequence[tuple[str, int]], height: int, width: int,
           steps: int, stages: dict | None = None) -> list[np.ndarray]:
    """Images [H, W, 3] of (prompt, seed) pairs through `system`'s denoiser; `stages` may hand in a loaded
    text encoder and decoder (shared between the paths: only the denoiser differs)."""
    from .families import load_stage

    stages = dict(stages or {})
    stages.setdefault("text_encoder", load_stage("text_encoder", model, system))
    stages.setdefault("decoder", load_stage("decoder", model, system))
    denoiser = load_stage("denoiser", model, system)
    images = []
    for prompt, seed in prompts:
        params = UserParams(prompt, "", height, width, steps, model.default_guidance_scale, 0.0, seed)
        latents = denoiser.denoise(stages["text_encoder"].encode(prompt, None), params)
        images.append(stages["decoder"].decode(latents)[0])
    del denoiser
    return images


def compare(exact: Sequence[np.ndarray], fast: Sequence[np.ndarray], prompts: Sequence[tuple[str, int]]) -> list[Comparison]:
    return [Comparison(p, s, psnr(a, b), ssim(a, b)) for (p, s), a, b in zip(prompts, exact, fast)]


def exact_system(system: SystemParams) -> SystemParams:
    """The same system on the exact path: diffusers' attention, eager, no FP8."""
    return dataclasses.replace(system, fast_path=False, attention_backend="sdpa", compile_transformer=False,
                               fp8_linear=False)


def summary(rows: Sequence[Comparison]) -> dict[str, float]:
    finite = [r.psnr_db for r in rows if math.isfinite(r.psnr_db)] or [math.inf]
    return {
        "min_psnr_db": min(finite),
        "mean_psnr_db": float(np.mean(finite)),
        "min_ssim": min(r.ssim for r in rows),
        "mean_ssim": float(np.mean([r.ssim for r in rows])),
    }


