"""Wan (video): the split stages in-process and a real tritonserver, against diffusers' WanPipeline."""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smart_diffusion_backend.errors import DenoiseCancelled, ParamError
from smart_diffusion_backend.families import load_stage
from smart_diffusion_backend.params import ModelParams, UserParams, parse_user_params
from smart_diffusion_backend.service import DecoderService, TextEncoderService
from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

from .conftest import ensure_tiny_model, serving

ROOT = Path(__file__).resolve().parent.parent

# A CFG request with WanPipeline's default (empty) negative prompt, as a default request sends it.
CASE = dict(prompt="a red circle moving right", height=64, width=80, num_frames=9, steps=3, guidance_scale=5.0, seed=42)



@functools.lru_cache(maxsize=2)
def _wan_pipeline(weights: str):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_reference(
    model: ModelParams,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    height: int,
    width: int,
    num_frames: int,
    steps: int,
    guidance_scale: float,
    seed: int,
) -> np.ndarray:
    """WanPipeline's video as uint8 [F, H, W, 3], rounded as its own uint8 path (output_type="pil":
    VaeImageProcessor.numpy_to_pil, `(x * 255).round()`). diffusers' export_to_video truncates instead."""
    frames = _wan_pipeline(str(model.weights))(
        prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=model.max_sequence_length,
        output_type="np",
    ).frames[0]
    return (frames * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_wan():
    return ensure_tiny_model("tiny-wan")


@pytest.fixture(scope="module")
def stages(tiny_wan, cpu_system):
    return {k: load_stage(k, tiny_wan, cpu_system) for k in ("text_encoder", "denoiser", "decoder")}


@pytest.fixture(scope="module")
def reference(tiny_wan):
    return wan_reference(tiny_wan, **CASE)


def user_params(prompt="a cat", negative="", height=64, width=64, steps=2, guidance=5.0, seed=1, frames=9) -> UserParams:
    return UserParams(prompt, negative, height, width, steps, guidance, 0.0, seed, frames)


# --------------------------------------------------------------------------------------------
# In-process stages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt,negative,height,width,frames,steps,guidance,seed",
    [
        ("a red circle", None, 64, 64, 9, 3, 5.0, 1),  # default: CFG with the empty negative prompt
        ("two blue squares", "blurry, static", 48, 80, 5, 2, 4.5, 123456789),
        ("a cat", "ugly", 32, 32, 1, 2, 1.0, 7),  # guidance 1: no CFG, negative prompt ignored (as the pipeline)
    ],
)
def test_split_stages_are_bit_exact_with_wan_pipeline(
    tiny_wan, stages, prompt, negative, height, width, frames, steps, guidance, seed
):
    embeddings = stages["text_encoder"].encode(prompt, negative)
    assert embeddings.prompt_embeds.shape[0] == 2 and embeddings.pooled_prompt_embeds.shape == (2, 0)
    params = user_params(prompt, negative or "", height, width, steps, guidance, seed, frames)
    latents = stages["denoiser"].denoise(embeddings, params)
    assert latents.shape == (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    video = stages["decoder"].decode(latents)
    reference = wan_reference(
        tiny_wan, prompt, negative_prompt=negative, height=height, width=width, num_frames=frames, steps=steps,
        guidance_scale=guidance, seed=seed,
    )
    assert video.dtype == np.uint8 and video.shape == (frames, height, width, 3)
    np.testing.assert_array_equal(video, reference)


def test_cfg_goes_through_run_branches_once_per_step(stages):
    """A CFG-parallel pool swaps run_branches: the loop must call it for both passes of every step."""
    denoiser = stages["denoiser"]
    calls = []

    def recording(forward, cond_kwargs, uncond_kwargs):
        calls.append((cond_kwargs["branch"], uncond_kwargs["branch"]))
        return forward(**cond_kwargs), forward(**uncond_kwargs)

    embeddings = stages["text_encoder"].encode("a cat", None)
    plain = denoiser.denoise(embeddings, user_params(steps=3))
    denoiser.run_branches = recording
    try:
        recorded = denoiser.denoise(embeddings, user_params(steps=3))
        assert calls == [("cond", "uncond")] * 3
        calls.clear()
        denoiser.denoise(embeddings, user_params(steps=2, guidance=1.0))  # no CFG: one pass, no branches
        assert calls == []
    finally:
        del denoiser.run_branches
    torch.testing.assert_close(plain, recorded, rtol=0, atol=0)


def test_step_callback_sees_every_step_and_can_cancel(stages):
    embeddings = stages["text_encoder"].encode("a cat", None)
    seen = []
    stages["denoiser"].denoise(embeddings, user_params(steps=3), on_step=lambda s, n: seen.append((s, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    def cancel_after_two(step, total):
        if step == 2:
            raise DenoiseCancelled("stop")

    with pytest.raises(DenoiseCancelled):
        stages["denoiser"].denoise(embeddings, user_params(steps=5), on_step=cancel_after_two)


def test_each_request_gets_a_fresh_scheduler(stages):
    """UniPC keeps past model outputs: interleaved requests must not see each other's."""
    embeddings = stages["text_encoder"].encode("a cat", None)
    alone = stages["denoiser"].denoise(embeddings, user_params(steps=4, seed=5))
    stages["denoiser"].denoise(embeddings, user_params(steps=2, seed=6))
    again = stages["denoiser"].denoise(embeddings, user_params(steps=4, seed=5))
    torch.testing.assert_close(alone, again, rtol=0, atol=0)


def test_cache_ratio_reaches_the_feature_cache_with_both_branches(stages):
    """CACHE_RATIO 0 is the bit-exact path (tested above); > 0 skips blocks, per CFG branch, and says so."""
    embeddings = stages["text_encoder"].encode("a cat", None)
    off, on = {}, {}
    plain = stages["denoiser"].denoise(embeddings, user_params(steps=8), stats=off)
    cached = stages["denoiser"].denoise(embeddings, dataclasses.replace(user_params(steps=8), cache_ratio=1.0), stats=on)
    assert off["cache_policy"] == "none" and off["cache_forwards_computed"] == 16  # 8 steps x (cond, uncond)
    assert on["cache_policy"] == "teacache" and on["cache_block_evals"] < off["cache_block_evals"], on
    assert cached.shape == plain.shape and torch.isfinite(cached).all()


def test_cfg_without_a_negative_row_is_refused(stages):
    embeddings = stages["text_encoder"].encode("a cat", None)
    one_row = dataclasses.replace(
        embeddings, prompt_embeds=embeddings.prompt_embeds[:1], pooled_prompt_embeds=embeddings.pooled_prompt_embeds[:1]
    )
    with pytest.raises(ParamError, match="PROMPT_EMBEDS: GUIDANCE_SCALE 5 > 1 needs 2 rows"):
        stages["denoiser"].denoise(one_row, user_params())
    assert stages["denoiser"].denoise(one_row, user_params(guidance=1.0)).shape == (1, 16, 3, 8, 8)


def test_services_pass_empty_pooled_embeddings_and_check_5d_latents(tiny_wan, cpu_system):
    encoded = TextEncoderService(tiny_wan, cpu_system)({"PROMPT": np.array([b"a cat"], dtype=np.object_)})
    assert encoded["POOLED_PROMPT_EMBEDS"].shape == (2, 0) and encoded["POOLED_PROMPT_EMBEDS"].dtype == torch.float32
    decoder = DecoderService(tiny_wan, cpu_system)
    with pytest.raises(ParamError, match=r"LATENTS: shape \[1, 16, 8, 8\] does not match this model's \[1, 16, \*, \*, \*\]"):
        decoder({"LATENTS": np.zeros((1, 16, 8, 8), np.float32)})
    with pytest.raises(ParamError, match=r"LATENTS: shape \[1, 4, 3, 8, 8\] does not match"):
        decoder({"LATENTS": np.zeros((1, 4, 3, 8, 8), np.float32)})
    # 30 latent frames decode to 117 frames: past the model's 81, refused by the shape alone.
    with pytest.raises(ParamError, match=r"LATENTS: shape \[1, 16, 30, 8, 8\]: 30 latent frames; allowed \[1, 21\]"):
        decoder({"LATENTS": np.zeros((1, 16, 30, 8, 8), np.float32)})


BAD_FRAMES = [(0, "out of range"), (8, "4*k+1"), (10_000, "out of range"), (-1, "out of range"), (12, "4*k+1")]


@pytest.mark.parametrize("frames,fragment", BAD_FRAMES)
def test_num_frames_is_validated(tiny_wan, cpu_system, frames, fragment):
    with pytest.raises(ParamError, match=f"NUM_FRAMES: .*{re.escape(fragment)}"):
        parse_user_params({"PROMPT": "a cat", "NUM_FRAMES": np.array([frames], np.int32)}, tiny_wan, cpu_system)


def test_vae_tiling_error_is_bounded(tiny_wan, cpu_system, stages):
    """diffusers' enable_tiling on AutoencoderKLWan: tiles blended linearly, so not exact. The tiny VAE
    at 128 px with 64 px tiles, stride 48 (diffusers' 256/192 ratio, scaled down) stays within the bound
    documented in docs/video.md."""
    tiled = load_stage("decoder", tiny_wan, dataclasses.replace(cpu_system, vae_tiling=True))
    assert tiled.vae.use_tiling
    tiled.vae.enable_tiling(
        tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48, tile_sample_stride_width=48
    )
    embeddings = stages["text_encoder"].encode("a red circle", None)
    latents = stages["denoiser"].denoise(embeddings, user_params(height=128, width=128, steps=2))
    untiled_video = stages["decoder"].decode(latents).astype(np.int16)
    tiled_video = tiled.decode(latents).astype(np.int16)
    diff = np.abs(tiled_video - untiled_video)
    assert diff.shape == (9, 128, 128, 3)
    # Measured (docs/video.md): max 104, mean 8.4 on this random-weight VAE, whose output is noise (std 63).
    assert 0 < diff.max() <= 128 and diff.mean() <= 10.0, (diff.max(), diff.mean())
    # Below the tile size tiling is off: bit-identical.
    small = stages["denoiser"].denoise(embeddings, user_params(height=64, width=64, steps=2))
    np.testing.assert_array_equal(tiled.decode(small), stages["decoder"].decode(small))


# --------------------------------------------------------------------------------------------
# A real tritonserver serving tiny-wan alone (unprefixed names, as `make serve MODEL=tiny-wan`)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_server(tiny_wan, tmp_path_factory):
    with serving(["tiny-wan"], tmp_path_factory.mktemp("wan_server")) as srv:
        yield srv


def client_for(server, protocol: str) -> SmartDiffusionClient:
    return SmartDiffusionClient(server.http_url if protocol == "http" else server.grpc_url, protocol)


@pytest.mark.server
@pytest.mark.parametrize(
    "protocol,model", [("http", "smart_diffusion"), ("grpc", "smart_diffusion"), ("http", "smart_diffusion_ensemble")]
)
def test_served_video_is_bit_identical_to_wan_pipeline(wan_server, reference, protocol, model):
    """Also proves the zero-size POOLED_PROMPT_EMBEDS [2, 0] passes BLS and the ensemble."""
    with client_for(wan_server, protocol) as client:
        result = client.infer(Request(**CASE), model=model)
    assert result.pixels.shape == (9, 64, 80, 3)
    np.testing.assert_array_equal(result.pixels, reference)
    assert result.stats["params"]["num_frames"] == 9 and result.stats["seed"] == CASE["seed"]
    assert set(result.stats["stages_ms"]) == {"text_encoder", "denoiser", "vae_decoder"}


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stream_reports_every_step_then_the_video(wan_server, reference, protocol):
    seen = []
    with client_for(wan_server, protocol) as client:
        result = client.stream(Request(**CASE), on_progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(result.pixels, reference)


@pytest.mark.server
def test_defaults_and_negative_prompt_over_the_server(wan_server, tiny_wan):
    """No NUM_FRAMES/size: the yaml's defaults; an explicit negative prompt changes the video."""
    with client_for(wan_server, "http") as client:
        default = client.generate("a cat", seed=3)
        negative = client.generate("a cat", seed=3, negative_prompt="a dog", num_frames=9)
    shape = (tiny_wan.default_num_frames, tiny_wan.default_height, tiny_wan.default_width, 3)
    assert default.pixels.shape == shape and default.stats["steps"] == tiny_wan.default_steps
    reference = wan_reference(
        tiny_wan, "a cat", negative_prompt="a dog", height=64, width=64, num_frames=9,
        steps=tiny_wan.default_steps, guidance_scale=tiny_wan.default_guidance_scale, seed=3,
    )
    np.testing.assert_array_equal(negative.pixels, reference)
    assert not np.array_equal(default.pixels, negative.pixels)


BAD_SERVED = [
    *[(dict(num_frames=frames), "NUM_FRAMES", fragment) for frames, fragment in BAD_FRAMES[:4]],
    (dict(height=512, width=512, num_frames=9), "HEIGHT*WIDTH*NUM_FRAMES", "max_pixels_per_request"),
    (dict(height=72), "HEIGHT", "multiple of 16"),
]


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["smart_diffusion", "smart_diffusion_ensemble"])
def test_bad_video_inputs_are_invalid_arg_naming_the_field(wan_server, protocol, model):
    with client_for(wan_server, protocol) as client:
        for change, field, fragment in BAD_SERVED:
            with pytest.raises(GenerationError) as err:
                client.infer(Request(**{**dict(prompt="a cat", seed=1), **change}), model=model)
            assert str(err.value.status) in ("400", "StatusCode.INVALID_ARGUMENT"), (change, err.value.status, str(err.value))
            assert f"{field}:" in str(err.value) and fragment in str(err.value), (change, str(err.value))
        assert client.infer(Request(prompt="a cat", seed=1, steps=1), model=model).pixels.shape == (9, 64, 64, 3)


@pytest.mark.server
def test_stream_bad_frames_end_the_stream_with_invalid_arg(wan_server):
    with client_for(wan_server, "grpc") as client:
        with pytest.raises(GenerationError, match="NUM_FRAMES: 8 is not of the form 4"):
            client.stream(Request(prompt="a cat", num_frames=8))


@pytest.mark.server
def test_cli_writes_the_video(wan_server, reference, tmp_path):
    """--num-frames, streaming progress, .mp4 through imageio-ffmpeg's binary (lossy: shape and frames only)."""
    import imageio.v3 as iio

    args = [
        sys.executable, "-m", "client", "generate", "--prompt", CASE["prompt"], "--height", "64", "--width", "80",
        "--num-frames", "9", "--steps", "3", "--guidance-scale", "5", "--seed", "42", "--url", wan_server.grpc_url,
        "--protocol", "grpc", "--stream",
    ]
    for suffix in (".mp4", ".gif"):
        out = tmp_path / f"video{suffix}"
        done = subprocess.run([*args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        frames = iio.imread(out, index=None)
        assert frames.shape[:3] == (9, 64, 80), frames.shape
        # Lossy codecs: close to the served frames on average, not equal.
        assert np.abs(frames[..., :3].astype(int) - reference.astype(int)).mean() < 40
