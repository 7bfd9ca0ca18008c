"""The three stages called on their own, in-process, against diffusers' FluxPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smart_diffusion_backend.families import DenoiseCancelled, load_stage
from smart_diffusion_backend.params import UserParams
from smart_diffusion_backend.service import DecoderService, DenoiserService, TextEncoderService

from .reference import flux_reference


@pytest.fixture(scope="module")
def stages(tiny_flux, cpu_system):
    return {k: load_stage(k, tiny_flux, cpu_system) for k in ("text_encoder", "denoiser", "decoder")}


@pytest.mark.parametrize(
    "prompt,height,width,steps,guidance,seed",
    [("a red circle", 64, 64, 4, 3.5, 1), ("two blue squares", 128, 96, 3, 1.0, 123456789)],
)
def test_split_stages_are_bit_exact_with_flux_pipeline(tiny_flux, stages, prompt, height, width, steps, guidance, seed):
    params = UserParams(prompt, "", height, width, steps, guidance, 0.0, seed)
    embeddings = stages["text_encoder"].encode(prompt, None)
    latents = stages["denoiser"].denoise(embeddings, params)
    image = stages["decoder"].decode(latents)
    reference = flux_reference(tiny_flux, prompt, height=height, width=width, steps=steps, guidance_scale=guidance, seed=seed)
    assert image.dtype == np.uint8 and image.shape == (height, width, 3)
    np.testing.assert_array_equal(image, reference)


def test_each_request_gets_a_fresh_scheduler(stages):
    """Interleaving two requests must not leak scheduler state from one into the other."""
    embeddings = stages["text_encoder"].encode("a cat", None)
    first = UserParams("a cat", "", 64, 64, 2, 3.5, 0.0, 5)
    second = UserParams("a cat", "", 64, 64, 4, 3.5, 0.0, 5)
    alone = stages["denoiser"].denoise(embeddings, second)
    stages["denoiser"].denoise(embeddings, first)
    again = stages["denoiser"].denoise(embeddings, second)
    torch.testing.assert_close(alone, again, rtol=0, atol=0)


def test_step_callback_sees_every_step_and_can_cancel(stages):
    embeddings = stages["text_encoder"].encode("a cat", None)
    seen = []
    stages["denoiser"].denoise(embeddings, UserParams("a cat", "", 64, 64, 3, 3.5, 0.0, 1), on_step=lambda s, n: seen.append((s, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    def cancel_after_two(step, total):
        if step == 2:
            raise DenoiseCancelled("stop")

    with pytest.raises(DenoiseCancelled):
        stages["denoiser"].denoise(embeddings, UserParams("a cat", "", 64, 64, 5, 3.5, 0.0, 1), on_step=cancel_after_two)


def test_services_validate_their_wire_tensors(tiny_flux, cpu_system):
    from smart_diffusion_backend.params import ParamError

    encoder = TextEncoderService(tiny_flux, cpu_system)
    denoiser = DenoiserService(tiny_flux, cpu_system)
    decoder = DecoderService(tiny_flux, cpu_system)
    encoded = encoder({"PROMPT": np.array([b"a cat"], dtype=np.object_)})
    assert encoded["PROMPT_EMBEDS"].dtype == np.float32 and encoded["PROMPT_EMBEDS"].ndim == 3
    with pytest.raises(ParamError, match="PROMPT_EMBEDS: expected FP32 with 3 dims"):
        denoiser({**encoded, "PROMPT_EMBEDS": encoded["PROMPT_EMBEDS"][0]})
    with pytest.raises(ParamError, match="POOLED_PROMPT_EMBEDS: contains non-finite"):
        denoiser({**encoded, "POOLED_PROMPT_EMBEDS": np.full_like(encoded["POOLED_PROMPT_EMBEDS"], np.nan)})
    with pytest.raises(ParamError, match="LATENTS"):
        decoder({"LATENTS": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(ParamError, match="STATS: is not a JSON object"):
        decoder({"LATENTS": np.zeros((1, 16, 8, 8), np.float32), "STATS": np.array([b"[1]"], dtype=np.object_)})
