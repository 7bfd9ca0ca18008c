"""Image conditioning on the Flux family against diffusers' own pipelines, bit for bit: image-to-image
(FluxImg2ImgPipeline), inpainting (FluxInpaintPipeline) on tiny-flux, and editing from a reference image
(FluxKontextPipeline) on tiny-flux-kontext; the split stages in process, then through a real tritonserver
(every entry point, HTTP and gRPC, and the CLI). The reference gets the PIL image made from the uint8
array the request carries."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smart_diffusion_backend.errors import ConfigError, ParamError
from smart_diffusion_backend.families import load_stage
from smart_diffusion_backend.params import UserParams
from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

from .conftest import ensure_tiny_model, serving

ROOT = Path(__file__).resolve().parent.parent

# Input image and mask of another size than the output (the pipelines resize them), deterministic.
_rng = np.random.default_rng(0)
IMAGE = _rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)
IMAGE[16:48, 8:40] = (220, 30, 30)  # some structure besides the noise
MASK = np.zeros((80, 72), np.uint8)
MASK[20:60, 10:50] = 255  # 255 = repaint
CASE = dict(prompt="a red circle on a blue background", height=64, width=96, steps=4, guidance_scale=3.5, seed=7)
KONTEXT_CASE = dict(prompt="make the square blue", height=64, width=64, steps=3, guidance_scale=2.5, seed=11)



@functools.lru_cache(maxsize=4)
def _pipeline(class_name: str, weights: str):
    import diffusers

    pipe = getattr(diffusers, class_name).from_pretrained(weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, **kwargs) -> np.ndarray:
    return np.stack([np.asarray(image) for image in pipe(**kwargs).images])


def conditioning_reference(model, *, prompt, height, width, steps, guidance_scale, seed, image, strength=0.6,
                           mask=None, num_images=1) -> np.ndarray:
    """FluxImg2ImgPipeline's (or with `mask`, FluxInpaintPipeline's) images [N, H, W, 3]."""
    name = "FluxImg2ImgPipeline" if mask is None else "FluxInpaintPipeline"
    extra = {} if mask is None else {"mask_image": Image.fromarray(mask)}
    return _images(
        _pipeline(name, str(model.weights)),
        prompt=prompt, image=Image.fromarray(image), strength=strength, height=height, width=width,
        num_inference_steps=steps, guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=model.max_sequence_length, num_images_per_prompt=num_images, **extra,
    )


def kontext_reference(model, *, prompt, height, width, steps, guidance_scale, seed, image=None, num_images=1) -> np.ndarray:
    """FluxKontextPipeline's images [N, H, W, 3]: output size HEIGHT x WIDTH (max_area = their product), the
    reference image at its own size (_auto_resize=False), as the service does."""
    return _images(
        _pipeline("FluxKontextPipeline", str(model.weights)),
        prompt=prompt, image=None if image is None else Image.fromarray(image), height=height, width=width,
        num_inference_steps=steps, guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=model.max_sequence_length, num_images_per_prompt=num_images,
        max_area=height * width, _auto_resize=False,
    )


def user_params(case: dict, **features) -> UserParams:
    base = UserParams(case["prompt"], "", case["height"], case["width"], case["steps"], case["guidance_scale"], 0.0, case["seed"])
    return dataclasses.replace(base, **features)


def run_stages(stages, params: UserParams) -> np.ndarray:
    """encode -> encode_conditioning -> denoise -> decode, as the services chain them."""
    embeddings = stages["text_encoder"].encode(params.prompt, None)
    if params.input_image is not None:
        conditioning = stages["text_encoder"].encode_conditioning(params)
        embeddings = dataclasses.replace(embeddings, **{k.lower(): v for k, v in conditioning.items()})
    return stages["decoder"].decode(stages["denoiser"].denoise(embeddings, params))


# --------------------------------------------------------------------------------------------
# The split stages in process
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tiny_flux, cpu_system):
    return {k: load_stage(k, tiny_flux, cpu_system) for k in ("text_encoder", "denoiser", "decoder")}


@pytest.fixture(scope="module")
def tiny_flux_kontext():
    return ensure_tiny_model("tiny-flux-kontext")


@pytest.fixture(scope="module")
def kontext_stages(tiny_flux_kontext, cpu_system):
    return {k: load_stage(k, tiny_flux_kontext, cpu_system) for k in ("text_encoder", "denoiser", "decoder")}


def test_img2img_is_bit_exact_with_flux_img2img_pipeline_at_two_strengths(tiny_flux, stages):
    outs = {}
    for strength in (0.3, 0.8):  # 4 steps: 1 and 3 of them run
        params = user_params(CASE, input_image=IMAGE, strength=strength)
        outs[strength] = run_stages(stages, params)
        reference = conditioning_reference(tiny_flux, **CASE, image=IMAGE, strength=strength)
        assert outs[strength].shape == (1, 64, 96, 3)
        np.testing.assert_array_equal(outs[strength], reference)
    assert not np.array_equal(outs[0.3], outs[0.8])
    assert not np.array_equal(outs[0.8], run_stages(stages, user_params(CASE)))  # not text-to-image


def test_strength_off_the_wire_runs_the_steps_diffusers_runs(tiny_flux, stages):
    """STRENGTH travels as FP32 (0.6 -> 0.6000000238): 5 steps x 0.6 must still leave 3 steps, as with the
    Python float 0.6 in diffusers (not 4, which 5 x 0.6000000238 = 3.0000001 would give)."""
    case = {**CASE, "steps": 5}
    params = user_params(case, input_image=IMAGE, strength=float(np.float32(0.6)))
    embeddings = stages["text_encoder"].encode(params.prompt, None)
    conditioning = stages["text_encoder"].encode_conditioning(params)
    embeddings = dataclasses.replace(embeddings, image_latents=conditioning["IMAGE_LATENTS"])
    seen = []
    latents = stages["denoiser"].denoise(embeddings, params, on_step=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    reference = conditioning_reference(tiny_flux, **case, image=IMAGE, strength=0.6)
    np.testing.assert_array_equal(stages["decoder"].decode(latents), reference)


def test_inpaint_is_bit_exact_with_flux_inpaint_pipeline(tiny_flux, stages):
    params = user_params(CASE, input_image=IMAGE, mask_image=MASK, strength=0.7)
    out = run_stages(stages, params)
    np.testing.assert_array_equal(out, conditioning_reference(tiny_flux, **CASE, image=IMAGE, mask=MASK, strength=0.7))
    assert not np.array_equal(out, run_stages(stages, dataclasses.replace(params, mask_image=None)))


@pytest.mark.parametrize("mask", [None, MASK], ids=["img2img", "inpaint"])
def test_num_images_with_an_input_image_is_num_images_per_prompt(tiny_flux, stages, mask):
    """NUM_IMAGES=2: the image encoded once (one latent sample), repeated; two noises drawn at once."""
    params = user_params(CASE, input_image=IMAGE, mask_image=mask, strength=0.6, num_images=2)
    out = run_stages(stages, params)
    reference = conditioning_reference(tiny_flux, **CASE, image=IMAGE, mask=mask, strength=0.6, num_images=2)
    assert out.shape == (2, 64, 96, 3)
    np.testing.assert_array_equal(out, reference)
    assert not np.array_equal(out[0], out[1])


@pytest.mark.parametrize("shape,num_images", [((80, 72, 3), 1), ((48, 40, 3), 2)])
def test_kontext_reference_image_is_bit_exact_with_flux_kontext_pipeline(tiny_flux_kontext, kontext_stages, shape, num_images):
    """The reference image keeps its size, rounded down to multiples of 16 (80x72 -> 80x64: latents 10x8)."""
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    params = user_params(KONTEXT_CASE, input_image=image, num_images=num_images)
    conditioning = kontext_stages["text_encoder"].encode_conditioning(params)
    assert set(conditioning) == {"IMAGE_LATENTS"}
    assert conditioning["IMAGE_LATENTS"].shape == (1, 16, shape[0] // 16 * 2, shape[1] // 16 * 2)
    out = run_stages(kontext_stages, params)
    reference = kontext_reference(tiny_flux_kontext, **KONTEXT_CASE, image=image, num_images=num_images)
    assert out.shape == (num_images, 64, 64, 3)
    np.testing.assert_array_equal(out, reference)
    without = run_stages(kontext_stages, user_params(KONTEXT_CASE, num_images=num_images))
    assert not np.array_equal(out, without)


def test_kontext_without_an_image_is_its_text_to_image(tiny_flux_kontext, kontext_stages):
    out = run_stages(kontext_stages, user_params(KONTEXT_CASE))
    np.testing.assert_array_equal(out, kontext_reference(tiny_flux_kontext, **KONTEXT_CASE))


def test_family_checks_name_the_field(tiny_flux, tiny_flux_kontext, stages, kontext_stages, cpu_system):
    # A reference image smaller than 16 pixels on a side has nothing left after rounding down (the yaml's
    # min_input_side refuses it before admission; the stage itself too, for a direct caller).
    with pytest.raises(ParamError, match=r"INPUT_IMAGE: 12x40 pixels: the reference image's height rounded down to a multiple of 16 is 0; allowed \[16, 1024\]"):
        kontext_stages["text_encoder"].encode_conditioning(user_params(KONTEXT_CASE, input_image=np.zeros((12, 40, 3), np.uint8)))
    # The denoiser never runs an image request without its image latents (nor with latents of another size).
    embeddings = stages["text_encoder"].encode(CASE["prompt"], None)
    with pytest.raises(ParamError, match="IMAGE_LATENTS: is required with INPUT_IMAGE"):
        stages["denoiser"].denoise(embeddings, user_params(CASE, strength=0.5))
    wrong = dataclasses.replace(embeddings, image_latents=torch.zeros(1, 16, 8, 8))
    with pytest.raises(ParamError, match=r"IMAGE_LATENTS: shape \[1, 16, 8, 8\]; expected \[1, 16, 8, 12\]"):
        stages["denoiser"].denoise(wrong, user_params(CASE, strength=0.5))
    wrong = dataclasses.replace(embeddings, image_latents=torch.zeros(1, 16, 8, 12), mask_latents=torch.zeros(1, 1, 4, 6))
    with pytest.raises(ParamError, match=r"MASK_LATENTS: shape \[1, 1, 4, 6\]; expected \[1, 1, 8, 12\]"):
        stages["denoiser"].denoise(wrong, user_params(CASE, strength=0.5))
    # A yaml whose accepts: its weights cannot honour fails the load.
    with pytest.raises(ConfigError, match=r"FluxKontextPipeline edits from a reference image; accepts: \['STRENGTH'\]"):
        load_stage("denoiser", dataclasses.replace(tiny_flux_kontext, accepts=("INPUT_IMAGE", "STRENGTH")), cpu_system)
    with pytest.raises(ConfigError, match=r"limits.max_input_side <= 1024 \(the height / width limits\); got \[16, 4096\]"):
        load_stage("text_encoder", dataclasses.replace(tiny_flux_kontext, max_input_side=4096), cpu_system)
    with pytest.raises(ConfigError, match="image-to-image on a FluxPipeline needs STRENGTH"):
        load_stage("text_encoder", dataclasses.replace(tiny_flux, accepts=("INPUT_IMAGE",)), cpu_system)


# --------------------------------------------------------------------------------------------
# Through a real tritonserver
# --------------------------------------------------------------------------------------------


def client_for(server, protocol: str) -> SmartDiffusionClient:
    return SmartDiffusionClient(server.http_url if protocol == "http" else server.grpc_url, protocol)


def served(server, request: Request, model: str, protocol: str):
    with client_for(server, protocol) as client:
        if model == "smart_diffusion_stream":
            seen = []
            result = client.stream(request, on_progress=lambda step, total: seen.append((step, total)))
            assert result.progress == seen and seen[-1][0] == seen[-1][1] == len(seen)
            return result
        return client.infer(request, model=model)


ENTRY_POINTS = [
    ("smart_diffusion", "http"),
    ("smart_diffusion", "grpc"),
    ("smart_diffusion_stream", "grpc"),  # HTTP generate_stream cannot carry a [H, W, 3] tensor (docs)
    ("smart_diffusion_ensemble", "http"),
    ("smart_diffusion_ensemble", "grpc"),
]


@pytest.fixture(scope="module")
def img2img_expected(tiny_flux):
    return conditioning_reference(tiny_flux, **CASE, image=IMAGE, strength=0.6)


@pytest.fixture(scope="module")
def inpaint_expected(tiny_flux):
    return conditioning_reference(tiny_flux, **CASE, image=IMAGE, mask=MASK, strength=0.85)


@pytest.mark.server
@pytest.mark.parametrize("model,protocol", ENTRY_POINTS)
def test_served_img2img_is_bit_identical_to_flux_img2img_pipeline(server, img2img_expected, model, protocol):
    result = served(server, Request(**CASE, input_image=IMAGE, strength=0.6), model, protocol)
    np.testing.assert_array_equal(result.images, img2img_expected)
    assert result.stats["params"]["strength"] == pytest.approx(0.6) and result.stats["seed"] == CASE["seed"]


@pytest.mark.server
@pytest.mark.parametrize("model,protocol", ENTRY_POINTS[1:])
def test_served_inpaint_is_bit_identical_to_flux_inpaint_pipeline(server, inpaint_expected, model, protocol):
    result = served(server, Request(**CASE, input_image=IMAGE, mask_image=MASK, strength=0.85), model, protocol)
    np.testing.assert_array_equal(result.images, inpaint_expected)


@pytest.mark.server
def test_served_default_strength_and_num_images(server, tiny_flux):
    """No STRENGTH: the yaml's default (0.6, as the diffusers pipelines); NUM_IMAGES=2 batched."""
    expected = conditioning_reference(tiny_flux, **CASE, image=IMAGE, mask=MASK, num_images=2)
    result = served(server, Request(**CASE, input_image=IMAGE, mask_image=MASK, num_images=2), "smart_diffusion", "grpc")
    assert result.images.shape == (2, 64, 96, 3)
    np.testing.assert_array_equal(result.images, expected)
    assert result.stats["params"]["strength"] == pytest.approx(0.6)


@pytest.mark.server
def test_served_text_to_image_is_unchanged_beside_image_requests(server, tiny_flux):
    from .reference import flux_reference

    result = served(server, Request(**CASE), "smart_diffusion_ensemble", "grpc")
    np.testing.assert_array_equal(result.image, flux_reference(tiny_flux, **CASE))


def _tensor(module, name: str, array: np.ndarray, dtype: str):
    tensor = module.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


# (field, array, dtype, other image inputs, message). Triton refuses a dtype or shape its config.pbtxt
# excludes by itself, naming the input, before our model sees it.
BAD_IMAGES = [
    ("INPUT_IMAGE", IMAGE.astype(np.float32), "FP32", {}, "'INPUT_IMAGE' data-type is 'FP32'"),
    ("INPUT_IMAGE", np.zeros((64, 64, 4), np.uint8), "UINT8", {}, "unexpected shape for input 'INPUT_IMAGE'"),
    ("INPUT_IMAGE", np.zeros((64, 64), np.uint8), "UINT8", {}, "unexpected shape for input 'INPUT_IMAGE'"),
    ("INPUT_IMAGE", np.zeros((4, 64, 3), np.uint8), "UINT8", {}, "INPUT_IMAGE: 4x64 pixels"),
    ("MASK_IMAGE", MASK, "UINT8", {}, "MASK_IMAGE: needs INPUT_IMAGE"),
    ("MASK_IMAGE", MASK[:40], "UINT8", {"INPUT_IMAGE": IMAGE}, "MASK_IMAGE: is 40x72; INPUT_IMAGE is 80x72"),
    ("STRENGTH", np.array([0.0], np.float32), "FP32", {"INPUT_IMAGE": IMAGE}, "STRENGTH: 0 leaves no denoising step"),
    ("STRENGTH", np.array([0.5], np.float32), "FP32", {}, "STRENGTH: needs INPUT_IMAGE"),
]


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["smart_diffusion", "smart_diffusion_ensemble"])
def test_bad_image_inputs_are_invalid_arg_naming_the_field(server, protocol, model):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    try:
        prompt = _tensor(module, "PROMPT", np.array([b"a cat"], dtype=np.object_), "BYTES")
        for name, array, dtype, others, message in BAD_IMAGES:
            inputs = [prompt, _tensor(module, name, array, dtype)]
            inputs += [_tensor(module, n, a, "UINT8") for n, a in others.items()]
            with pytest.raises(InferenceServerException) as err:
                client.infer(model, inputs)
            assert err.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), (name, err.value.status())
            assert message in err.value.message(), (message, err.value.message())
    finally:
        client.close()
    with client_for(server, "http") as good:  # serving goes on
        assert good.infer(Request(prompt="a cat", seed=1, steps=2, input_image=IMAGE)).image.shape == (64, 64, 3)


@pytest.mark.server
def test_cli_image_mask_strength_writes_the_png(server, inpaint_expected, tmp_path):
    Image.fromarray(IMAGE).save(tmp_path / "in.png")
    Image.fromarray(MASK).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = [
        sys.executable, "-m", "client", "generate", "--prompt", CASE["prompt"], "--height", "64", "--width", "96",
        "--steps", "4", "--guidance-scale", "3.5", "--seed", "7", "--image", str(tmp_path / "in.png"),
        "--mask", str(tmp_path / "mask.png"), "--strength", "0.85", "--url", server.grpc_url, "--protocol", "grpc",
        "--out", str(out),
    ]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(out)), inpaint_expected[0])


# --------------------------------------------------------------------------------------------
# A Kontext server (its own: one per module)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kontext_server(tiny_flux_kontext, tmp_path_factory):
    with serving(["tiny-flux-kontext"], tmp_path_factory.mktemp("kontext_server")) as srv:
        yield srv


@pytest.mark.server
def test_served_kontext_is_bit_identical_to_flux_kontext_pipeline(kontext_server, tiny_flux_kontext):
    expected = kontext_reference(tiny_flux_kontext, **KONTEXT_CASE, image=IMAGE, num_images=2)
    for model, protocol in (("smart_diffusion", "grpc"), ("smart_diffusion_stream", "grpc"), ("smart_diffusion_ensemble", "http")):
        result = served(kontext_server, Request(**KONTEXT_CASE, input_image=IMAGE, num_images=2), model, protocol)
        np.testing.assert_array_equal(result.images, expected, err_msg=f"{model} over {protocol}")
    text_only = served(kontext_server, Request(**KONTEXT_CASE), "smart_diffusion", "http")
    np.testing.assert_array_equal(text_only.images, kontext_reference(tiny_flux_kontext, **KONTEXT_CASE))
    with client_for(kontext_server, "grpc") as client:
        for change, message in (
            (dict(strength=0.5), "unexpected inference input 'STRENGTH'"),  # not in its config.pbtxt
            (dict(mask_image=MASK), "unexpected inference input 'MASK_IMAGE'"),
            (dict(input_image=np.zeros((12, 64, 3), np.uint8)), r"INPUT_IMAGE: 12x64 pixels; each side allowed in \[16, 1024\]"),
        ):
            with pytest.raises(GenerationError, match=message) as err:
                client.infer(Request(**KONTEXT_CASE, **{"input_image": IMAGE, **change}))
            assert err.value.status == "StatusCode.INVALID_ARGUMENT", err.value.status
