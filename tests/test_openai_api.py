"""The OpenAI-compatible facade (smart_diffusion_openai), driven by the official `openai` client against a
real tritonserver (tiny-flux): images bit-identical to our own client's, streaming, errors, models."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from smart_diffusion_client import Request, SmartDiffusionClient
from smart_diffusion_openai import FacadeConfig, FacadeProcess
from smart_diffusion_openai.encode import decode_png_b64, png_b64
from smart_diffusion_openai.errors import field_param, stream_error_code, triton_error
from smart_diffusion_openai.params import parse_generation, parse_size

pytestmark = pytest.mark.server

PROMPT = "a red circle on a blue background"


def start_facade(server, tmp_path, **config) -> FacadeProcess:
    from smart_diffusion_backend.serving import free_port

    facade = FacadeProcess(
        FacadeConfig(triton_grpc=server.grpc_url, port=free_port(), **config), log_file=tmp_path / "facade.log"
    )
    return facade.start(ready_timeout_s=60)


def stop_facade(facade: FacadeProcess) -> None:
    """Stopped gracefully (exit 0 after SIGTERM), and nothing left running."""
    pid = facade.process.pid
    code = facade.stop()
    assert code == 0, f"facade exit code {code}:\n{facade.log_tail()}"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.fixture(scope="module")
def facade(server, tmp_path_factory):
    facade = start_facade(server, tmp_path_factory.mktemp("openai"))
    try:
        yield facade
    finally:
        if facade.process is not None:
            stop_facade(facade)


@pytest.fixture(scope="module")
def oai(facade):
    # No retries: a test must see the first answer (the client retries 5xx by default).
    with openai.OpenAI(base_url=facade.url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def reference(server):
    """Our own client's images (gRPC, the plain entry model): by seed, and "batch", the two images of one
    NUM_IMAGES=2 request with seed 42 (tiny-flux accepts NUM_IMAGES)."""
    with SmartDiffusionClient(server.grpc_url, "grpc") as client:
        images = {seed: client.infer(Request(PROMPT, height=64, width=64, steps=3, seed=seed)).image for seed in (42, 43)}
        images["batch"] = client.infer(Request(PROMPT, height=64, width=64, steps=3, seed=42, num_images=2)).images
    return images


def extra(model: object) -> dict:
    """Our per-image extra field, as the openai client keeps it."""
    return (model.model_extra or {})["smart_diffusion"]


def test_generate_n2_is_one_batched_request_bit_identical_to_our_client(oai, reference):
    """tiny-flux takes NUM_IMAGES: n=2 is one request for two images (diffusers' num_images_per_prompt)."""
    result = oai.images.generate(
        prompt=PROMPT, size="64x64", n=2, response_format="b64_json", extra_body={"seed": 42, "steps": 3}
    )
    assert len(result.data) == 2 and isinstance(result.created, int) and result.size == "64x64"
    for index, image in enumerate(result.data):
        assert image.revised_prompt is None and image.url is None
        pixels = decode_png_b64(image.b64_json)
        assert pixels.shape == (64, 64, 3)
        np.testing.assert_array_equal(pixels, reference["batch"][index])
        ours = extra(image)
        assert ours["index"] == index and ours["seed"] == 42 and ours["stats"]["params"]["num_images"] == 2
        assert ours["stats"]["steps"] == 3 and set(ours["stats"]["stages_ms"]) == {
            "text_encoder",
            "denoiser",
            "vae_decoder",
        }


def test_absent_seed_is_drawn_once_and_reported(oai):
    result = oai.images.generate(prompt=PROMPT, size="64x64", n=2, extra_body={"steps": 1})
    first, second = (extra(image)["seed"] for image in result.data)
    assert second == first  # one batched request, one seed


def test_stream_reports_every_step_then_the_same_image(oai, reference):
    events = list(oai.images.generate(prompt=PROMPT, size="64x64", stream=True, extra_body={"seed": 42, "steps": 3}))
    types = [event.type for event in events]
    assert types == ["smart_diffusion.progress"] * 3 + ["image_generation.completed"], types
    assert [(e.model_extra["step"], e.model_extra["total_steps"]) for e in events[:3]] == [(1, 3), (2, 3), (3, 3)]
    done = events[-1]
    assert isinstance(done, openai.types.ImageGenCompletedEvent)
    assert done.output_format == "png" and done.size == "64x64"
    np.testing.assert_array_equal(decode_png_b64(done.b64_json), reference[42])
    assert extra(done)["seed"] == 42


def test_stream_n2_sends_both_images_by_index(oai, reference):
    events = list(
        oai.images.generate(prompt=PROMPT, size="64x64", n=2, stream=True, extra_body={"seed": 42, "steps": 3})
    )
    done = {extra(e)["index"]: e for e in events if e.type == "image_generation.completed"}
    assert sorted(done) == [0, 1]
    progress = [e for e in events if e.type == "smart_diffusion.progress"]  # one batched request's steps
    assert [(e.model_extra["image_index"], e.model_extra["step"]) for e in progress] == [(0, 1), (0, 2), (0, 3)]
    for index, event in done.items():
        np.testing.assert_array_equal(decode_png_b64(event.b64_json), reference["batch"][index])


@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        ({"size": "64"}, "size", "size"),  # not WIDTHxHEIGHT: ours
        ({"size": "65x64"}, "size", "WIDTH: 65 is not a multiple of 16"),  # the server's, mapped back to size
        ({"extra_body": {"steps": 0}}, "steps", "STEPS"),
        ({"extra_body": {"steps": 0}, "stream": True}, "steps", "STEPS"),  # refused before the stream starts
        ({"n": 5}, "n", "allowed [1, 4]"),
        ({"response_format": "url"}, "response_format", "keeps no files"),
        ({"extra_body": {"num_frames": 9}}, "num_frames", "NUM_FRAMES"),
        ({"extra_body": {"step": 3}}, "step", "unknown field"),
        ({"extra_body": {"steps": "3"}}, "steps", "expected an integer"),
    ],
)
def test_bad_requests_are_400_naming_the_field(oai, kwargs, param, says):
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(prompt=PROMPT, **kwargs)
    assert err.value.status_code == 400
    assert err.value.param == param and err.value.type == "invalid_request_error", err.value.body
    assert says in err.value.body["message"], err.value.body


def test_unknown_model_is_404_listing_the_served_ones(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.images.generate(prompt=PROMPT, model="dall-e-3")
    assert err.value.param == "model" and "tiny-flux" in err.value.body["message"]


def test_models_list_and_retrieve(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == ["tiny-flux"]
    assert models[0].model_extra["smart_diffusion"] == {
        "task": "image",
        "triton_model": "smart_diffusion",
        "stream_model": "smart_diffusion_stream",
    }
    assert oai.models.retrieve("tiny-flux").id == "tiny-flux"
    # the pipeline answers to its model id and to its Triton names
    for name in ("tiny-flux", "smart_diffusion"):
        assert len(oai.images.generate(prompt=PROMPT, model=name, size="32x32", extra_body={"steps": 1}).data) == 1


def test_health_and_openai_shaped_404(facade):
    base = facade.url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/health", timeout=10) as reply:
        assert reply.status == 200 and json.load(reply) == {"status": "ready"}
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/v1/images/variations", data=b"{}", timeout=10)
    assert err.value.code == 404 and set(json.load(err.value)["error"]) == {"message", "type", "param", "code"}


def outcomes(server) -> list[str]:
    with urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10) as reply:
        return [
            line for line in reply.read().decode().splitlines() if line.startswith("smart_diffusion_requests_total")
        ]


def cancelled_count(server, model: str) -> float:
    text = "\n".join(outcomes(server))
    pattern = rf'^smart_diffusion_requests_total\{{[^}}]*model="{model}",outcome="cancelled"[^}}]*\}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


@pytest.fixture(scope="module")
def patient_facade(server, tmp_path_factory):
    """A facade whose requests may take a day: the admission then never refuses the slow request below on
    its predicted run time (extrapolated from small images, it can exceed the default 600 s)."""
    facade = start_facade(server, tmp_path_factory.mktemp("patient"), timeout_s=86400)
    try:
        yield facade
    finally:
        stop_facade(facade)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_cancels_the_work_on_the_server(server, patient_facade, stream):
    """Closing the HTTP connection mid-generation cancels the Triton request (it stops within a step)."""
    model = "smart_diffusion_stream" if stream else "smart_diffusion"
    before = cancelled_count(server, model)
    slow = dict(prompt=PROMPT, size="1024x1024", extra_body={"steps": 50, "seed": 1})  # seconds, even warm
    if stream:
        with openai.OpenAI(base_url=patient_facade.url, api_key="unused", max_retries=0) as client:
            events = client.images.generate(stream=True, **slow)
            assert next(iter(events)).type == "smart_diffusion.progress"
            events.close()  # leaves after the first step
    else:
        with openai.OpenAI(base_url=patient_facade.url, api_key="unused", max_retries=0, timeout=1.0) as client:
            with pytest.raises(openai.APITimeoutError):
                client.images.generate(**slow)
    deadline = time.monotonic() + 30
    while cancelled_count(server, model) == before:
        assert time.monotonic() < deadline, f"{model} never reported the request cancelled: {outcomes(server)}"
        time.sleep(0.2)


def test_request_timeout_reaches_the_server(server, tmp_path):
    """A facade whose requests may take 50 ms: the server refuses (UNAVAILABLE, 503) or stops (504) a
    request that cannot finish in time, and says so."""
    facade = start_facade(server, tmp_path, timeout_s=0.05)
    try:
        with openai.OpenAI(base_url=facade.url, api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as err:
                client.images.generate(prompt=PROMPT, size="256x256", extra_body={"steps": 20})
        assert err.value.status_code in (503, 504), err.value.body
        assert "timeout" in err.value.body["message"], err.value.body
    finally:
        stop_facade(facade)


# -- pure functions ---------------------------------------------------------------------------------


def test_size_and_field_mapping():
    assert parse_size("96x64") == (64, 96) and parse_size(None) == (None, None) and parse_size("auto") == (None, None)
    assert field_param("HEIGHT*WIDTH: 4096x4096 = 16777216 pixels exceeds ...") == "size"
    assert field_param("GUIDANCE_SCALE: nan is not a finite number") == "guidance_scale"
    assert field_param("smart_diffusion: 3 requests are waiting, the queue's limit; retry later") is None
    job = parse_generation({"prompt": "x", "n": 3, "seed": 7, "steps": 2}, max_n=4)
    assert job.seeds() == [7, 8, 9] and int(job.tensors(2)["SEED"][0][0]) == 9 and job.tensors(0)["STEPS"][1] == "INT32"


def test_streamed_errors_get_their_status_back_from_the_message():
    # streamed responses carry no status code: it is recovered from what the server says
    assert stream_error_code("STEPS: 0 is out of range; allowed [1, 50]") == "INVALID_ARGUMENT"
    assert (
        stream_error_code("smart_diffusion_stream: 9 requests are waiting, the queue's limit; retry later")
        == "UNAVAILABLE"
    )
    assert stream_error_code("request timeout of 2 s exceeded before decoding") == "CANCELLED"
    assert stream_error_code("smart_diffusion_stream: internal error: RuntimeError: boom") == "INTERNAL"
    refused = triton_error(
        "UNAVAILABLE", "smart_diffusion: predicted wait 40.0 s exceeds this server's max_queue_delay_s 30; retry later"
    )
    assert refused.status == 503 and "max_queue_delay_s" in refused.message and refused.type == "server_error"
    assert triton_error("INTERNAL", "boom").status == 500


def test_video_is_an_animated_png():
    video = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png_b64(png_b64(video)), video)
