"""The training package: dataset determinism, analyser accuracy, text encoding as FluxPipeline, a smoke run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smart_diffusion_backend.training.analyser import analyse, parse_prompt
from smart_diffusion_backend.training.dataset import (
    BACKGROUND,
    FOREGROUND,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    all_combinations,
    make_dataset,
    render,
)


def test_dataset_is_deterministic_from_its_seed():
    a, b, c = make_dataset(64, seed=7), make_dataset(64, seed=7), make_dataset(64, seed=8)
    assert a.captions == b.captions
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions != c.captions
    assert not np.array_equal(a.images, c.images)


def test_dataset_covers_the_caption_space():
    assert len(FOREGROUND) >= 6 and len(BACKGROUND) >= 3 and set(SHAPES) >= {"circle", "square", "triangle"}
    combos = all_combinations()
    assert all(s.color != s.background for s in combos)
    assert len(combos) == len(SHAPES) * len(SIZES) * len(POSITIONS) * sum(c != b for c in FOREGROUND for b in BACKGROUND)
    data = make_dataset(32, seed=0)
    assert data.images.shape == (32, 64, 64, 3) and data.images.dtype == np.uint8
    assert ShapeSpec("circle", "red", "blue", "small", "top left").caption() == "a small red circle on a blue background, top left"
    assert ShapeSpec("square", "red", "gray").caption() == "a red square on a gray background, center"


def test_analyser_on_the_generators_own_images():
    data = make_dataset(600, seed=3)
    results = [analyse(im) for im in data.images]
    for key in ("color", "shape", "background", "position", "size"):
        acc = np.mean([getattr(r, key) == getattr(s, key) for r, s in zip(results, data.specs)])
        assert acc >= 0.98, f"analyser {key} accuracy {acc:.3f}"


def test_analyser_survives_blur_and_noise():
    """Generated images are softer than the renders: blur + noise must not change the verdict."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    data = make_dataset(150, seed=4)
    ok = 0
    for spec, im in zip(data.specs, data.images):
        soft = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.0)), np.float32)
        soft = np.clip(soft + rng.normal(0, 8, soft.shape), 0, 255).astype(np.uint8)
        r = analyse(soft)
        ok += (r.color, r.shape) == (spec.color, spec.shape)
    assert ok / len(data) >= 0.95


def test_parse_prompt():
    assert parse_prompt("a small red circle on a blue background, top left") == ("red", "circle", "blue")
    assert parse_prompt("A yellow triangle") == ("yellow", "triangle", None)
    with pytest.raises(ValueError):
        parse_prompt("a cat")


def test_render_rejects_unknown_shapes():
    with pytest.raises(ValueError):
        render(ShapeSpec("hexagon", "red", "gray"))


def test_training_text_path_matches_flux_pipeline(tiny_flux):
    """tokenize + encode_text (the differentiable training path) == FluxPipeline.encode_prompt."""
    from diffusers import FluxPipeline

    from smart_diffusion_backend.training.train import encode_text, tokenize

    pipe = FluxPipeline.from_pretrained(tiny_flux.weights, transformer=None, vae=None)
    prompts = ["a red circle on a gray background, center", "a large black square on a white background, top"]
    ids = tokenize(pipe.tokenizer, pipe.tokenizer_2, prompts, 64)
    with torch.no_grad():
        ours = encode_text(pipe.text_encoder, pipe.text_encoder_2, *ids)
        ref = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=64)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0)


def test_training_smoke_run_saves_a_loadable_pipeline(tmp_path):
    """Two steps of each phase with a toy architecture: the loop runs and writes a FluxPipeline directory."""
    from diffusers import FluxPipeline

    from smart_diffusion_backend.training.dataset import DatasetConfig
    from smart_diffusion_backend.training.train import ArchConfig, TrainConfig, train

    arch = ArchConfig(num_layers=1, num_single_layers=1, num_attention_heads=1, attention_head_dim=16,
                      axes_dims_rope=(4, 6, 6), text_width=16, text_layers=1, text_heads=2, vae_channels=(16, 16, 16, 16))
    cfg = TrainConfig(device="cpu", n_images=8, arch=arch, dataset=DatasetConfig(), vae_steps=2, vae_batch=2,
                      steps=2, batch=2, log_every=1)
    record = train(cfg, tmp_path / "pipe", log=lambda s: None)
    assert record["steps_done"] == 2 and record["vae_steps_done"] == 2
    pipe = FluxPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
