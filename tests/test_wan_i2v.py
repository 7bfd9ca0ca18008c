"""Wan image-to-video (tiny-wan-i2v, a WanImageToVideoPipeline directory): the split stages in process and a
real tritonserver, bit for bit against diffusers' WanImageToVideoPipeline given the PIL image made from the
uint8 array the request carries."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from smart_diffusion_backend.errors import ConfigError, ParamError
from smart_diffusion_backend.families import load_stage
from smart_diffusion_backend.params import ModelParams, UserParams, parse_user_params
from smart_diffusion_backend.service import DecoderService, DenoiserService, TextEncoderService
from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

from .conftest import ensure_tiny_model, serving

ROOT = Path(__file__).resolve().parent.parent

# The first frame: another size and aspect than the video (the pipeline resizes it), with some structure.
_rng = np.random.default_rng(0)
IMAGE = _rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)
IMAGE[16:48, 8:40] = (220, 30, 30)
# A CFG request, 5 frames (not the yaml's 9: the encoder must get NUM_FRAMES), 64 x 48.
CASE = dict(prompt="a red circle moving right", height=64, width=48, num_frames=5, steps=3, guidance_scale=5.0, seed=42)



@functools.lru_cache(maxsize=1)
def _i2v_pipeline(weights: str):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def i2v_reference(model: ModelParams, prompt: str, *, image: np.ndarray, negative_prompt: str | None = None,
                  height: int, width: int, num_frames: int, steps: int, guidance_scale: float, seed: int) -> np.ndarray:
    """WanImageToVideoPipeline's video as uint8 [F, H, W, 3], rounded as its uint8 path (`(x * 255).round()`).

    diffusers 0.42.1's I2V module calls ftfy.fix_text unconditionally in its prompt cleaning (a NameError
    when ftfy is not installed, as here); WanPipeline's identical function calls it only where ftfy is
    installed, and that is the one the service runs. Without ftfy the reference runs with WanPipeline's,
    which for these ASCII prompts is what the I2V module gives with ftfy installed."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    installed = hasattr(pipeline_wan_i2v, "ftfy")
    with contextlib.nullcontext() if installed else mock.patch.object(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean):
        frames = _i2v_pipeline(str(model.weights))(
            image=Image.fromarray(image),
            prompt=prompt,
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
def tiny_wan_i2v():
    return ensure_tiny_model("tiny-wan-i2v")


@pytest.fixture(scope="module")
def stages(tiny_wan_i2v, cpu_system):
    return {k: load_stage(k, tiny_wan_i2v, cpu_system) for k in ("text_encoder", "denoiser", "decoder")}


def user_params(case: dict, **features) -> UserParams:
    base = UserParams(case["prompt"], case.get("negative_prompt") or "", case["height"], case["width"], case["steps"],
                      case["guidance_scale"], 0.0, case["seed"], case["num_frames"])
    return dataclasses.replace(base, **features)


def encode(stages, params: UserParams):
    """encode -> encode_conditioning, as the text encoder service chains them."""
    embeddings = stages["text_encoder"].encode(params.prompt, params.negative_prompt or None)
    conditioning = stages["text_encoder"].encode_conditioning(params)
    return dataclasses.replace(embeddings, **{k.lower(): v for k, v in conditioning.items()})


def run_stages(stages, params: UserParams) -> np.ndarray:
    return stages["decoder"].decode(stages["denoiser"].denoise(encode(stages, params), params))


# --------------------------------------------------------------------------------------------
# The split stages in process
# --------------------------------------------------------------------------------------------

STAGE_CASES = [
    dict(prompt="a red circle", height=64, width=64, num_frames=9, steps=3, guidance_scale=5.0, seed=1),
    dict(prompt="two blue squares", negative_prompt="blurry, static", height=48, width=80, num_frames=5, steps=2,
         guidance_scale=4.5, seed=123456789),
    dict(prompt="a cat", negative_prompt="ugly", height=32, width=32, num_frames=1, steps=2, guidance_scale=1.0,
         seed=7),  # guidance 1: no CFG, the negative prompt ignored (as the pipeline); one frame
]


@pytest.mark.parametrize("case", STAGE_CASES, ids=["seed1-no-negative", "seed123456789-negative", "no-cfg"])
def test_split_stages_are_bit_exact_with_wan_i2v_pipeline(tiny_wan_i2v, stages, case):
    params = user_params(case, input_image=IMAGE)
    video = run_stages(stages, params)
    reference = i2v_reference(tiny_wan_i2v, image=IMAGE, **case)
    assert video.dtype == np.uint8 and video.shape == (case["num_frames"], case["height"], case["width"], 3)
    np.testing.assert_array_equal(video, reference)


def test_conditioning_tensors_are_the_pipelines(stages):
    """IMAGE_EMBEDS: CLIP's penultimate hidden states (17 tokens of 32); IMAGE_LATENTS: the condition video's
    latents; MASK_LATENTS: 1 on the first frame's 4 temporal slots, 0 after. Another image, another video."""
    params = user_params(CASE, input_image=IMAGE)
    conditioning = stages["text_encoder"].encode_conditioning(params)
    assert {k: tuple(v.shape) for k, v in conditioning.items()} == {
        "IMAGE_EMBEDS": (1, 17, 32), "IMAGE_LATENTS": (1, 16, 2, 8, 6), "MASK_LATENTS": (1, 4, 2, 8, 6)}
    mask = conditioning["MASK_LATENTS"]
    assert bool((mask[:, :, 0] == 1).all()) and bool((mask[:, :, 1:] == 0).all())
    other = np.ascontiguousarray(IMAGE[::-1])
    assert not np.array_equal(run_stages(stages, params), run_stages(stages, dataclasses.replace(params, input_image=other)))


def test_services_chain_with_num_frames_reaching_the_encoder(tiny_wan_i2v, cpu_system, stages):
    """The services as Triton calls them: the encoder takes NUM_FRAMES (the condition spans the video)."""
    request = {"PROMPT": np.array([CASE["prompt"].encode()], dtype=np.object_), "INPUT_IMAGE": IMAGE,
               "HEIGHT": np.array([64], np.int32), "WIDTH": np.array([48], np.int32),
               "NUM_FRAMES": np.array([5], np.int32), "SEED": np.array([42], np.int64)}
    encoded = TextEncoderService(tiny_wan_i2v, cpu_system)(request)
    assert encoded["IMAGE_LATENTS"].shape == (1, 16, 2, 8, 6) and encoded["IMAGE_EMBEDS"].shape == (1, 17, 32)
    denoiser = DenoiserService(tiny_wan_i2v, cpu_system)
    user = {k: v for k, v in request.items() if k not in ("PROMPT", "INPUT_IMAGE")}
    user |= {"STEPS": np.array([3], np.int32), "GUIDANCE_SCALE": np.array([5.0], np.float32)}
    denoised = denoiser({**encoded, **user})
    video = DecoderService(tiny_wan_i2v, cpu_system)(denoised)["VIDEO"]
    np.testing.assert_array_equal(video, run_stages(stages, user_params(CASE, input_image=IMAGE)))
    # Without the image: the denoiser refuses by the empty conditioning alone.
    empty = {**encoded, **{n: np.zeros((0,) * r, np.float32) for n, r in (
        ("IMAGE_LATENTS", 5), ("MASK_LATENTS", 5), ("IMAGE_EMBEDS", 3))}}
    with pytest.raises(ParamError, match="INPUT_IMAGE: is required by model 'tiny-wan-i2v'"):
        denoiser({**empty, **user})


def test_missing_or_wrong_conditioning_is_refused_naming_the_field(tiny_wan_i2v, cpu_system, stages):
    with pytest.raises(ParamError, match="INPUT_IMAGE: is required by model 'tiny-wan-i2v'"):
        parse_user_params({"PROMPT": np.array([b"a cat"], dtype=np.object_)}, tiny_wan_i2v, cpu_system)
    with pytest.raises(ParamError, match="INPUT_IMAGE: is required by model 'tiny-wan-i2v'"):
        TextEncoderService(tiny_wan_i2v, cpu_system)({"PROMPT": np.array([b"a cat"], dtype=np.object_)})
    params = user_params(CASE)
    embeddings = stages["text_encoder"].encode(CASE["prompt"], None)
    with pytest.raises(ParamError, match="INPUT_IMAGE: is required by model 'tiny-wan-i2v'"):
        stages["denoiser"].denoise(embeddings, params)
    good = encode(stages, user_params(CASE, input_image=IMAGE))
    for change, message in (
        (dict(image_latents=torch.zeros(1, 16, 3, 8, 6)), r"IMAGE_LATENTS: shape \[1, 16, 3, 8, 6\]; expected \[1, 16, 2, 8, 6\]"),
        (dict(mask_latents=torch.zeros(1, 1, 2, 8, 6)), r"MASK_LATENTS: shape \[1, 1, 2, 8, 6\]; expected \[1, 4, 2, 8, 6\]"),
        (dict(image_embeds=torch.zeros(1, 17, 16)), r"IMAGE_EMBEDS: shape \[1, 17, 16\]; expected \[1, tokens, 32\]"),
        (dict(image_embeds=None), r"IMAGE_EMBEDS: none; expected \[1, tokens, 32\]"),
    ):
        with pytest.raises(ParamError, match=message):
            stages["denoiser"].denoise(dataclasses.replace(good, **change), params)


def test_load_checks_the_yaml_against_the_weights(tiny_wan_i2v, cpu_system, tmp_path):
    for change, message in (
        (dict(requires=()), r"accepts: and requires: must list INPUT_IMAGE"),
        (dict(accepts=("INPUT_IMAGE", "STRENGTH")), r"accepts: \['STRENGTH'\] has no meaning for it"),
        (dict(max_sequence_length=32), "max_sequence_length must be 512"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_stage("denoiser", dataclasses.replace(tiny_wan_i2v, **change), cpu_system)
    t2v = dataclasses.replace(ensure_tiny_model("tiny-wan"), accepts=("INPUT_IMAGE",))
    with pytest.raises(ConfigError, match="a WanPipeline makes videos from text alone"):
        load_stage("text_encoder", t2v, cpu_system)
    yaml = (ROOT / "configs" / "models" / "tiny-wan-i2v.yaml").read_text()
    (tmp_path / "a.yaml").write_text(yaml.replace("accepts: [INPUT_IMAGE]", "accepts: []"))
    with pytest.raises(ConfigError, match="requires: INPUT_IMAGE must be in accepts: too"):
        ModelParams.load(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text(yaml.replace("requires: [INPUT_IMAGE]", "requires: [SEED]"))
    with pytest.raises(ConfigError, match="requires: 'SEED' cannot be required"):
        ModelParams.load(str(tmp_path / "b.yaml"))


def test_stages_load_on_a_system_of_several_ranks(tiny_wan_i2v):
    """The pool's jobs carry the image conditioning to every rank, so an I2V model loads on several ranks
    (tests/test_pool_conditioning.py checks the pooled denoise against one rank)."""
    from smart_diffusion_backend.params import SystemParams

    sp = SystemParams.load("cpu-sp2")
    for kind in ("text_encoder", "denoiser"):
        assert load_stage(kind, tiny_wan_i2v, sp).image_to_video


def test_warm_up_runs_on_zero_conditioning_and_requests_still_need_the_image(stages):
    """The load-time warm-up (compile_transformer) has no image: zero conditioning of its size's shapes."""
    assert stages["denoiser"].warm_up() >= 0
    with pytest.raises(ParamError, match="INPUT_IMAGE: is required"):
        stages["denoiser"].denoise(stages["text_encoder"].encode("a cat", None), user_params(CASE))


# --------------------------------------------------------------------------------------------
# A real tritonserver serving tiny-wan-i2v
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def i2v_server(tiny_wan_i2v, tmp_path_factory):
    with serving(["tiny-wan-i2v"], tmp_path_factory.mktemp("wan_i2v_server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(tiny_wan_i2v):
    return i2v_reference(tiny_wan_i2v, image=IMAGE, **CASE)


def client_for(server, protocol: str) -> SmartDiffusionClient:
    return SmartDiffusionClient(server.http_url if protocol == "http" else server.grpc_url, protocol)


@pytest.mark.server
@pytest.mark.parametrize("model,protocol", [
    ("smart_diffusion", "http"),
    ("smart_diffusion_stream", "grpc"),  # HTTP generate_stream cannot carry a [H, W, 3] tensor (docs)
    ("smart_diffusion_ensemble", "http"),
    ("smart_diffusion_ensemble", "grpc"),
])
def test_served_video_is_bit_identical_to_wan_i2v_pipeline(i2v_server, expected, model, protocol):
    with client_for(i2v_server, protocol) as client:
        if model == "smart_diffusion_stream":
            seen = []
            result = client.stream(Request(**CASE, input_image=IMAGE), on_progress=lambda s, n: seen.append((s, n)))
            assert seen == [(1, 3), (2, 3), (3, 3)]
        else:
            result = client.infer(Request(**CASE, input_image=IMAGE), model=model)
    assert result.pixels.shape == (5, 64, 48, 3)
    np.testing.assert_array_equal(result.pixels, expected)
    assert result.stats["seed"] == CASE["seed"] and result.stats["params"]["num_frames"] == 5


@pytest.mark.server
def test_served_without_input_image_is_invalid_arg_naming_it(i2v_server):
    for model, protocol in (("smart_diffusion", "http"), ("smart_diffusion_ensemble", "http"),
                            ("smart_diffusion", "grpc"), ("smart_diffusion_stream", "grpc")):
        with client_for(i2v_server, protocol) as client:
            with pytest.raises(GenerationError) as err:
                request = Request(prompt="a cat", seed=1, steps=1)
                client.stream(request) if model == "smart_diffusion_stream" else client.infer(request, model=model)
        # A streamed error carries its message only (a gRPC stream response has no status code).
        if model != "smart_diffusion_stream":
            assert str(err.value.status) in ("400", "StatusCode.INVALID_ARGUMENT"), (model, err.value.status)
        assert "INPUT_IMAGE: is required by model 'tiny-wan-i2v'" in str(err.value), (model, str(err.value))
    with client_for(i2v_server, "http") as client:  # serving goes on
        assert client.infer(Request(prompt="a cat", seed=1, steps=1, input_image=IMAGE)).pixels.shape == (9, 64, 64, 3)


@pytest.mark.server
def test_cli_with_image_writes_the_video(i2v_server, expected, tmp_path):
    """The docs' CLI: --image (a PNG: lossless, the same uint8 array) with --num-frames, streamed over gRPC,
    written as .mp4 (lossy: shape and closeness only; the served pixels are checked exactly above)."""
    import json

    import imageio.v3 as iio

    Image.fromarray(IMAGE).save(tmp_path / "in.png")
    out = tmp_path / "video.mp4"
    args = [
        sys.executable, "-m", "client", "generate", "--prompt", CASE["prompt"], "--image", str(tmp_path / "in.png"),
        "--height", "64", "--width", "48", "--num-frames", "5", "--steps", "3", "--guidance-scale", "5",
        "--seed", "42", "--url", i2v_server.grpc_url, "--protocol", "grpc", "--stream", "--out", str(out),
    ]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["shape"] == [5, 64, 48, 3] and printed["seed"] == 42
    frames = iio.imread(out, index=None)
    assert frames.shape[:3] == (5, 64, 48), frames.shape
    assert np.abs(frames[..., :3].astype(int) - expected.astype(int)).mean() < 40
