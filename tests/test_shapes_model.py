"""The shipped `shapes-flux` weights: they load through our stages and FluxPipeline, and draw the prompt."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from smart_diffusion_backend.families import load_stage
from smart_diffusion_backend.params import ModelParams, UserParams
from smart_diffusion_backend.training.analyser import analyse, parse_prompt

# A few grid cells: every colour and every shape at least once, two backgrounds, positions and sizes.
PROMPTS = [
    ("a red circle on a gray background, center", 1),
    ("a green square on a black background, center", 2),
    ("a blue triangle on a gray background, center", 3),
    ("a yellow circle on a blue background, top left", 4),
    ("a large white triangle on a black background, bottom right", 5),
    ("a small black square on a white background, right", 6),
]


@pytest.fixture(scope="module")
def shapes_flux() -> ModelParams:
    model = ModelParams.load("shapes-flux")
    assert (model.weights / "model_index.json").is_file(), f"shipped weights missing at {model.weights}"
    return model


@pytest.fixture(scope="module")
def shapes_stages(shapes_flux, cpu_system):
    return {k: load_stage(k, shapes_flux, cpu_system) for k in ("text_encoder", "denoiser", "decoder")}


def _generate(stages, model: ModelParams, prompt: str, seed: int) -> np.ndarray:
    params = UserParams(prompt, "", model.default_height, model.default_width, model.default_steps,
                        model.default_guidance_scale, 0.0, seed)
    embeddings = stages["text_encoder"].encode(prompt, None)
    return stages["decoder"].decode(stages["denoiser"].denoise(embeddings, params))[0]


def test_shipped_weights_are_small(shapes_flux):
    size = sum(f.stat().st_size for f in shapes_flux.weights.rglob("*") if f.is_file())
    assert size < 30e6, f"models/shapes-flux is {size / 1e6:.1f} MB"


@pytest.mark.parametrize("prompt,seed", PROMPTS)
def test_stages_draw_what_the_prompt_says(shapes_flux, shapes_stages, prompt, seed):
    image = _generate(shapes_stages, shapes_flux, prompt, seed)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    color, shape, background = parse_prompt(prompt)
    got = analyse(image)
    assert (got.color, got.shape, got.background) == (color, shape, background), f"{prompt!r} -> {got}"


def test_flux_pipeline_loads_the_same_weights(shapes_flux, shapes_stages):
    """`FluxPipeline.from_pretrained` gives the same image as our stages (the split is exact)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(os.fspath(shapes_flux.weights), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt, seed = PROMPTS[0]
    out = pipe(prompt, height=64, width=64, num_inference_steps=shapes_flux.default_steps,
               guidance_scale=shapes_flux.default_guidance_scale, max_sequence_length=shapes_flux.max_sequence_length,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    reference = (out * 255).round().clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(_generate(shapes_stages, shapes_flux, prompt, seed), reference)
