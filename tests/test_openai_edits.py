"""POST /v1/images/edits on the OpenAI-compatible facade, driven by the official `openai` client (and raw
multipart, as curl -F sends it) against a real tritonserver (the session's tiny-flux one): image-to-image
and inpainting bit-identical to our own client's INPUT_IMAGE / MASK_IMAGE requests, streaming, the size
rules, and every refusal a 400 naming its field; a Kontext model's and an image-less model's refusals on
an in-process facade over fixed pipelines."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from smart_diffusion_client import Request, SmartDiffusionClient
from smart_diffusion_openai import FacadeConfig, create_app
from smart_diffusion_openai.encode import decode_png_b64
from smart_diffusion_openai.errors import ApiError
from smart_diffusion_openai.params import auto_sizes, form_body, parse_edit
from smart_diffusion_openai.triton import Pipeline, TritonGateway
from smart_diffusion_openai.uploads import Upload, decode_edit, mask_tensor

from .test_openai_api import extra, start_facade, stop_facade

pytestmark = pytest.mark.server

PROMPT = "a red circle on a blue background"
MAX_UPLOAD = 1 << 20  # the test facade's --max-upload-bytes: room for the test images, a 413 past it

# A 96x64 (WxH) input image with some structure, and an inpainting area
_rng = np.random.default_rng(0)
IMAGE = _rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
IMAGE[16:48, 24:56] = (220, 30, 30)
REPAINT = np.zeros((64, 96), np.uint8)
REPAINT[8:40, 16:72] = 255  # MASK_IMAGE: 255 = repaint


def png(array: np.ndarray) -> bytes:
    """uint8 [H, W] -> a grayscale PNG, [H, W, 3] RGB, [H, W, 4] RGBA; bool [H, W] -> 1-bit."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def openai_mask(repaint: np.ndarray) -> bytes:
    """OpenAI's mask: an RGBA PNG, fully transparent where the image is to be edited."""
    alpha = np.where(repaint == 255, 0, 255).astype(np.uint8)
    return png(np.dstack([np.zeros((*repaint.shape, 3), np.uint8), alpha]))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("edit_files")
    paths = {"image": tmp / "in.png", "mask": tmp / "mask.png", "gray_mask": tmp / "gray_mask.png"}
    paths["image"].write_bytes(png(IMAGE))
    paths["mask"].write_bytes(openai_mask(REPAINT))
    paths["gray_mask"].write_bytes(png(REPAINT))
    return paths


@pytest.fixture(scope="module")
def facade(server, tmp_path_factory):
    facade = start_facade(server, tmp_path_factory.mktemp("openai_edits"), max_upload_bytes=MAX_UPLOAD)
    try:
        yield facade
    finally:
        stop_facade(facade)


@pytest.fixture(scope="module")
def oai(facade):
    with openai.OpenAI(base_url=facade.url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def ours(server):
    with SmartDiffusionClient(server.grpc_url, "grpc") as client:
        yield client


def pixels(result) -> list[np.ndarray]:
    return [decode_png_b64(image.b64_json) for image in result.data]


def test_image_to_image_is_bit_identical_to_our_client_at_the_image_size(oai, ours, files):
    """No `size`: the output has the input's size (96x64); STRENGTH and the other fields as extras."""
    with open(files["image"], "rb") as image:
        result = oai.images.edit(
            image=image, prompt=PROMPT, response_format="b64_json", extra_body={"seed": 42, "steps": 4, "strength": 0.7}
        )
    expected = ours.infer(Request(PROMPT, height=64, width=96, steps=4, seed=42, input_image=IMAGE, strength=0.7))
    assert result.size == "96x64" and len(result.data) == 1
    np.testing.assert_array_equal(pixels(result)[0], expected.image)
    stats = extra(result.data[0])["stats"]
    assert stats["seed"] == 42 and stats["params"]["strength"] == pytest.approx(0.7)


def test_inpainting_with_an_openai_mask_n2_is_our_clients_mask_image_request(oai, ours, files):
    """The mask's transparent pixels are MASK_IMAGE's 255; n=2 is one NUM_IMAGES=2 request."""
    with open(files["image"], "rb") as image, open(files["mask"], "rb") as mask:
        result = oai.images.edit(
            image=image, mask=mask, prompt="a yellow square", size="64x64", n=2, extra_body={"seed": 7, "steps": 3}
        )
    expected = ours.infer(
        Request(
            "a yellow square", height=64, width=64, steps=3, seed=7, input_image=IMAGE, mask_image=REPAINT, num_images=2
        )
    )
    assert result.size == "64x64"
    for got, want in zip(pixels(result), expected.images, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_mask_without_alpha_is_grayscale_white_repaints(oai, ours, files):
    with open(files["image"], "rb") as image, open(files["gray_mask"], "rb") as mask:
        result = oai.images.edit(image=image, mask=mask, prompt="a yellow square", extra_body={"seed": 3, "steps": 2})
    expected = ours.infer(
        Request("a yellow square", height=64, width=96, steps=2, seed=3, input_image=IMAGE, mask_image=REPAINT)
    )
    np.testing.assert_array_equal(pixels(result)[0], expected.image)


def test_stream_reports_every_step_then_the_edited_image(oai, ours, files):
    with open(files["image"], "rb") as image:
        events = list(oai.images.edit(image=image, prompt=PROMPT, stream=True, extra_body={"seed": 5, "steps": 3}))
    # strength 0.6 (the yaml's default) of 3 steps: 3 - int(3 - 1.8) = 2 run
    types = [event.type for event in events]
    assert types == ["smart_diffusion.progress"] * 2 + ["image_edit.completed"], types
    done = events[-1]
    assert isinstance(done, openai.types.ImageEditCompletedEvent) and done.size == "96x64"
    expected = ours.infer(Request(PROMPT, height=64, width=96, steps=3, seed=5, input_image=IMAGE))
    np.testing.assert_array_equal(decode_png_b64(done.b64_json), expected.image)


def test_auto_size_rounds_the_image_size_down_else_takes_the_models_default(oai, ours):
    """100x70 is edited at 96x64; 1100x40 would be 1088x32, past tiny-flux's 1024: its default 64x64."""
    for (height, width), size in (((70, 100), "96x64"), ((40, 1100), "64x64")):
        image = _rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        result = oai.images.edit(
            image=("in.png", png(image), "image/png"), prompt=PROMPT, size="auto", extra_body={"seed": 1, "steps": 2}
        )
        assert result.size == size
        w, h = map(int, size.split("x"))
        expected = ours.infer(Request(PROMPT, height=h, width=w, steps=2, seed=1, input_image=image))
        np.testing.assert_array_equal(pixels(result)[0], expected.image)


def post_form(url: str, fields: dict[str, str], uploads: list[tuple[str, bytes]] = ()) -> tuple[int, dict]:
    """A multipart/form-data POST as `curl -F name=value -F image=@file` sends it (urllib alone)."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, data in uploads:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"{url}/images/edits", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_curl_style_form_fields_are_typed(facade, ours):
    status, body = post_form(
        facade.url,
        {"prompt": PROMPT, "size": "64x64", "seed": "9", "steps": "2", "strength": "0.8", "n": "1"},
        [("image", png(IMAGE))],
    )
    assert status == 200, body
    expected = ours.infer(Request(PROMPT, height=64, width=64, steps=2, seed=9, input_image=IMAGE, strength=0.8))
    np.testing.assert_array_equal(decode_png_b64(body["data"][0]["b64_json"]), expected.image)


_GOOD = png(IMAGE)
_OPAQUE = png(np.dstack([IMAGE, np.full((64, 96), 255, np.uint8)]))


@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        ({"image": ("bad.png", b"this is not a png", "image/png")}, "image", "is not a PNG, JPEG or WebP image"),
        ({"image": ("cut.png", _GOOD[: len(_GOOD) // 2], "image/png")}, "image", "cannot be decoded"),
        ({"image": [("a.png", _GOOD, "image/png"), ("b.png", _GOOD, "image/png")]}, "image", "2 images were sent"),
        ({"image": ("big.png", png(np.zeros((4100, 4100), bool)), "image/png")}, "image", "decodes at most"),
        ({"mask": ("m.png", png(REPAINT[:32]), "image/png")}, "mask", "must be the same size"),
        ({"mask": ("m.png", _OPAQUE, "image/png")}, "mask", "no pixel is fully transparent"),
        ({"response_format": "url"}, "response_format", "keeps no files"),
        ({"size": "65x64"}, "size", "WIDTH: 65 is not a multiple of 16"),  # the server's, mapped back
        ({"extra_body": {"strength": 0}}, "strength", "STRENGTH: 0 leaves no denoising step"),
        ({"extra_body": {"strength": 0}, "stream": True}, "strength", "STRENGTH"),  # before the stream starts
        ({"extra_body": {"steps": "three"}}, "steps", "expected an integer"),
        ({"extra_body": {"strenght": 0.5}}, "strenght", "unknown field"),
        ({"image": ("tiny.png", png(IMAGE[:4]), "image/png")}, "image", "INPUT_IMAGE: 4x96 pixels"),
    ],
)
def test_bad_edits_are_400_naming_the_field(oai, kwargs, param, says):
    kwargs = {"image": ("in.png", _GOOD, "image/png"), "prompt": PROMPT, "extra_body": {"steps": 2}, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.edit(**kwargs)
    assert err.value.param == param and err.value.type == "invalid_request_error", err.value.body
    assert says in err.value.body["message"], err.value.body


@pytest.mark.parametrize(
    ("fields", "uploads", "status", "param", "says"),
    [
        ({"prompt": PROMPT}, [], 400, "image", "image: is required"),
        ({"prompt": PROMPT}, [("image", _GOOD), ("image", _GOOD)], 400, "image", "2 images were sent"),
        ({"prompt": PROMPT}, [("image", _GOOD), ("mask", _GOOD), ("mask", _GOOD)], 400, "mask", "2 masks"),
        ({"prompt": PROMPT, "image": "in.png"}, [], 400, "image", "expected a file"),
        ({"prompt": PROMPT}, [("image", _GOOD), ("markup", _GOOD)], 400, "markup", "unknown field"),
        ({"prompt": PROMPT, "seed": "1", "steps": "2"}, [("image", b"\0" * (MAX_UPLOAD + 1))], 413, None, "bytes"),
    ],
)
def test_bad_forms_are_refused_naming_the_field(facade, fields, uploads, status, param, says):
    got, body = post_form(facade.url, fields, uploads)
    assert got == status and body["error"]["param"] == param, body
    assert says in body["error"]["message"], body


def test_a_json_body_is_refused(facade):
    request = urllib.request.Request(
        f"{facade.url}/images/edits", data=b'{"prompt": "x"}', headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400 and "multipart/form-data" in json.load(err.value)["error"]["message"]


def test_still_serving_after_the_refusals(oai, ours):
    """An edit after all the refusals, its image sent as OpenAI's `image[]` list of one."""
    result = oai.images.edit(
        image=[("in.png", _GOOD, "image/png")], prompt=PROMPT, size="32x32", extra_body={"seed": 2, "steps": 1}
    )
    expected = ours.infer(Request(PROMPT, height=32, width=32, steps=1, seed=2, input_image=IMAGE))
    np.testing.assert_array_equal(pixels(result)[0], expected.image)


# -- what a model cannot take: an in-process facade over fixed pipelines -----------------------------
# These refusals come from the pipelines' declared inputs, before any request goes to Triton, so a facade
# whose gateway lists fixed pipelines checks them without a second tritonserver (the machine has 2 cores).

BASE_INPUTS = frozenset(
    {"PROMPT", "NEGATIVE_PROMPT", "HEIGHT", "WIDTH", "STEPS", "GUIDANCE_SCALE", "CACHE_RATIO", "SEED"}
)
FIXED_PIPELINES = [
    # tiny-sd3's entry model: no image inputs
    Pipeline("tiny-sd3", "tiny-sd3_", "image", BASE_INPUTS | {"NUM_IMAGES"}, streams=True),
    # tiny-flux-kontext's: an INPUT_IMAGE, but no MASK_IMAGE or STRENGTH (nothing is re-noised)
    Pipeline(
        "tiny-flux-kontext", "tiny-flux-kontext_", "image", BASE_INPUTS | {"NUM_IMAGES", "INPUT_IMAGE"}, streams=True
    ),
]


class FixedGateway(TritonGateway):
    async def _read_pipelines(self) -> list[Pipeline]:
        return FIXED_PIPELINES


@pytest.fixture(scope="module")
def fixed_oai():
    """The facade app on a thread's event loop, its gateway's pipelines fixed (Triton is never called)."""
    from aiohttp import web

    from smart_diffusion_backend.serving import free_port

    config = FacadeConfig(triton_grpc="127.0.0.1:1", port=free_port())
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(config, FixedGateway), handler_cancellation=True)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, config.host, config.port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with openai.OpenAI(base_url=f"http://{config.host}:{config.port}/v1", api_key="unused", max_retries=0) as c:
            yield c
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


@pytest.mark.parametrize(
    ("model", "kwargs", "param", "says"),
    [
        ("tiny-sd3", {}, "image", "model 'tiny-sd3' takes no input image"),
        ("tiny-flux-kontext", {"mask": ("m.png", openai_mask(REPAINT), "image/png")}, "mask", "takes no MASK_IMAGE"),
        ("tiny-flux-kontext", {"extra_body": {"strength": 0.5}}, "strength", "takes no STRENGTH"),
    ],
)
def test_what_a_model_cannot_take_is_400_naming_the_field(fixed_oai, model, kwargs, param, says):
    with pytest.raises(openai.BadRequestError) as err:
        fixed_oai.images.edit(image=("in.png", _GOOD, "image/png"), prompt=PROMPT, model=model, **kwargs)
    assert err.value.param == param, err.value.body
    assert says in err.value.body["message"], err.value.body
    if model == "tiny-sd3":
        assert "served models that can: tiny-flux-kontext" in err.value.body["message"]


# -- pure functions ---------------------------------------------------------------------------------


def _upload(data: bytes) -> Upload:
    return Upload("image", io.BytesIO(data), "x.png")


def test_masks_alpha_zero_repaints_and_grayscale_passes_through():
    np.testing.assert_array_equal(mask_tensor(Image.open(io.BytesIO(openai_mask(REPAINT)))), REPAINT)
    # a palette PNG whose index 0 is transparent (what many editors write)
    palette = Image.fromarray(np.where(REPAINT == 255, 0, 1).astype(np.uint8)).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    np.testing.assert_array_equal(mask_tensor(Image.open(io.BytesIO(buffer.getvalue()))), REPAINT)
    gray = np.linspace(0, 255, 64 * 96).astype(np.uint8).reshape(64, 96)
    np.testing.assert_array_equal(mask_tensor(Image.fromarray(gray)), gray)
    image, mask = decode_edit(_upload(png(IMAGE)), _upload(openai_mask(REPAINT)), 1 << 20)
    np.testing.assert_array_equal(image, IMAGE)
    np.testing.assert_array_equal(mask, REPAINT)
    with pytest.raises(ApiError, match="decodes at most 1000"):
        decode_edit(_upload(png(IMAGE)), None, 1000)
    # JPEG decodes (lossy: close, not equal); GIF is not one of the formats Pillow may try
    for fmt, ok in (("JPEG", True), ("GIF", False)):
        buffer = io.BytesIO()
        Image.fromarray(IMAGE).save(buffer, format=fmt)
        if ok:
            assert decode_edit(_upload(buffer.getvalue()), None, 1 << 20)[0].shape == IMAGE.shape
        else:
            with pytest.raises(ApiError, match="is not a PNG, JPEG or WebP image"):
                decode_edit(_upload(buffer.getvalue()), None, 1 << 20)


def test_form_fields_are_typed_and_sizes_picked():
    assert form_body({"prompt": "", "n": "2", "stream": "true", "seed": "", "strength": "0.5", "quality": "auto"}) == {
        "prompt": "",
        "n": 2,
        "stream": True,
        "strength": 0.5,
        "quality": "auto",
    }
    job = parse_edit({"prompt": "x", "steps": "3", "seed": "5", "input_fidelity": "high"}, max_n=4)
    assert job.request.steps == 3 and job.request.seed == 5 and job.request.height is None
    assert [(j.request.height, j.request.width) for j in auto_sizes(job, (70, 100, 3))] == [(64, 96), (None, None)]
    assert [(j.request.height, j.request.width) for j in auto_sizes(job, (12, 100, 3))] == [(None, None)]
    for fields, param in (({"prompt": "x", "n": "two"}, "n"), ({"prompt": "x", "stream": "yes"}, "stream")):
        with pytest.raises(ApiError) as err:
            parse_edit(fields, max_n=4)
        assert err.value.param == param
