"""The three stages called on their own, in-process, against diffusers' FluxPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smart_diffusion_backend.errors import DenoiseCancelled
from smart_diffusion_backend.families import load_stage
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
    images = stages["decoder"].decode(latents)
    reference = flux_reference(tiny_flux, prompt, height=height, width=width, steps=steps, guidance_scale=guidance, seed=seed)
    assert images.dtype == np.uint8 and images.shape == (1, height, width, 3)
    np.testing.assert_array_equal(images[0], reference)


def test_several_images_per_request_are_bit_exact_with_num_images_per_prompt(tiny_flux, stages):
    """NUM_IMAGES = 3: one batched denoise of three noises drawn at once from the seed, as FluxPipeline's
    num_images_per_prompt=3 with one generator."""
    import dataclasses

    params = dataclasses.replace(UserParams("a red circle", "", 64, 96, 3, 3.5, 0.0, 7), num_images=3)
    latents = stages["denoiser"].denoise(stages["text_encoder"].encode(params.prompt, None), params)
    images = stages["decoder"].decode(latents)
    reference = flux_reference(tiny_flux, params.prompt, height=64, width=96, steps=3, guidance_scale=3.5, seed=7, num_images=3)
    assert latents.shape[0] == 3 and images.shape == (3, 64, 96, 3)
    np.testing.assert_array_equal(images, reference)
    assert not np.array_equal(images[0], images[1])


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
    from smart_diffusion_backend.errors import ParamError

    encoder = TextEncoderService(tiny_flux, cpu_system)
    denoiser = DenoiserService(tiny_flux, cpu_system)
    decoder = DecoderService(tiny_flux, cpu_system)
    encoded = encoder({"PROMPT": np.array([b"a cat"], dtype=np.object_)})
    # Stage tensors leave as float32 torch tensors on the stage's device (they stay there between stages).
    assert isinstance(encoded["PROMPT_EMBEDS"], torch.Tensor)
    assert encoded["PROMPT_EMBEDS"].dtype == torch.float32 and encoded["PROMPT_EMBEDS"].ndim == 3
    text_len, text_dim = tiny_flux.max_sequence_length, encoded["PROMPT_EMBEDS"].shape[-1]
    with pytest.raises(ParamError, match=rf"PROMPT_EMBEDS: shape \[{text_len}, {text_dim}\] does not match"):
        denoiser({**encoded, "PROMPT_EMBEDS": encoded["PROMPT_EMBEDS"][0]})
    with pytest.raises(ParamError, match="PROMPT_EMBEDS: expected FP32, got float16"):
        denoiser({**encoded, "PROMPT_EMBEDS": encoded["PROMPT_EMBEDS"].numpy().astype(np.float16)})
    with pytest.raises(ParamError, match="PROMPT_EMBEDS: expected FP32, got object"):  # not torch's TypeError
        denoiser({**encoded, "PROMPT_EMBEDS": np.array([[[b"x"]]], dtype=np.object_)})
    # Shapes are refused by their metadata alone: a [1, 100000, D] tensor that is never materialised.
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (1, 100_000, text_dim), (0, 0, 0))
    with pytest.raises(ParamError, match=rf"PROMPT_EMBEDS: shape \[1, 100000, {text_dim}\] does not match this model's \[1, {text_len}, {text_dim}\]"):
        denoiser({**encoded, "PROMPT_EMBEDS": huge})
    with pytest.raises(ParamError, match="POOLED_PROMPT_EMBEDS: shape \\[0, "):
        denoiser({**encoded, "POOLED_PROMPT_EMBEDS": np.zeros((0, encoded["POOLED_PROMPT_EMBEDS"].shape[1]), np.float32)})
    with pytest.raises(ParamError, match="POOLED_PROMPT_EMBEDS: contains non-finite"):
        denoiser({**encoded, "POOLED_PROMPT_EMBEDS": np.full(tuple(encoded["POOLED_PROMPT_EMBEDS"].shape), np.nan, np.float32)})
    with pytest.raises(ParamError, match="POOLED_PROMPT_EMBEDS: contains non-finite"):
        denoiser({**encoded, "POOLED_PROMPT_EMBEDS": torch.full_like(encoded["POOLED_PROMPT_EMBEDS"], float("inf"))})
    # numpy (what a client sends) and torch (what a stage hands on) give the same latents.
    params = {"HEIGHT": np.array([64], np.int32), "WIDTH": np.array([64], np.int32), "STEPS": np.array([2], np.int32),
              "SEED": np.array([3], np.int64)}
    from_torch = denoiser({**encoded, **params})["LATENTS"]
    from_numpy = denoiser({**{k: v.numpy() for k, v in encoded.items() if k != "STATS"}, **params})["LATENTS"]
    assert torch.equal(from_torch, from_numpy)
    with pytest.raises(ParamError, match=r"LATENTS: shape \[1, 3, 8, 8\] does not match this model's \[\*, 16, \*, \*\]"):
        decoder({"LATENTS": np.zeros((1, 3, 8, 8), np.float32)})
    # [1, 16, 2048, 2048] would decode to 16384² pixels: refused by its shape, never decoded.
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (1, 16, 2048, 2048), (0, 0, 0, 0))
    with pytest.raises(ParamError, match=r"LATENTS: shape \[1, 16, 2048, 2048\]: h=2048 decodes to 16384 pixels; allowed multiples of 2 in \[2, 128\]"):
        decoder({"LATENTS": huge})
    with pytest.raises(ParamError, match="LATENTS: shape .* h=7 decodes to 56 pixels"):
        decoder({"LATENTS": np.zeros((1, 16, 7, 8), np.float32)})
    with pytest.raises(ParamError, match="LATENTS: contains non-finite"):
        decoder({"LATENTS": np.full((1, 16, 8, 8), np.nan, np.float32)})
    with pytest.raises(ParamError, match="STATS: is not a JSON object"):
        decoder({"LATENTS": np.zeros((1, 16, 8, 8), np.float32), "STATS": np.array([b"[1]"], dtype=np.object_)})


def test_pixels_leave_the_decoder_contiguous():
    """Triton copies a strided array element by element (~10 ms for a 1024² image): the channels-last
    pixels must be laid out as such, with diffusers' rounding."""
    from smart_diffusion_backend.families.base import to_uint8

    images = torch.rand(1, 3, 16, 24) * 2 - 1
    pixels = to_uint8(images)
    assert pixels.shape == (1, 16, 24, 3) and pixels.dtype == np.uint8 and pixels.flags["C_CONTIGUOUS"]
    expected = ((images * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(pixels, expected)
