"""The external reference (diffusers' own pipeline on the same directory, same params, same seed) and the
relative L2 distance the numeric tests measure against their references."""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=4)
def _flux_pipeline(weights: str):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_reference(
    model, prompt: str, *, height: int, width: int, steps: int, guidance_scale: float, seed: int, num_images: int = 0
) -> np.ndarray:
    """FluxPipeline's image [H, W, 3]; with `num_images` N > 0, its N images [N, H, W, 3]
    (num_images_per_prompt=N, one generator)."""
    pipe = _flux_pipeline(str(model.weights))
    images = pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=model.max_sequence_length,
        num_images_per_prompt=max(1, num_images),
    ).images
    return np.stack([np.asarray(image) for image in images]) if num_images else np.asarray(images[0])


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
