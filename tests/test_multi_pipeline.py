"""One tritonserver, two pipelines (tiny-flux images, tiny-wan videos) under prefixed model names."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

from .conftest import ensure_tiny_model, start_server, stop_server_and_check
from .reference import flux_reference
from .test_wan import wan_reference

pytestmark = pytest.mark.server

FLUX, WAN = "tiny-flux_", "tiny-wan_"
IMAGE = dict(prompt="a red circle on a blue background", height=64, width=96, steps=3, guidance_scale=2.5)
VIDEO = dict(prompt="a red circle moving right", height=64, width=64, num_frames=9, steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def tiny_wan():
    return ensure_tiny_model("tiny-wan")


@pytest.fixture(scope="module")
def multi_server(tiny_flux, tiny_wan, tmp_path_factory):
    from smart_diffusion_backend.repository import write_repository

    tmp = tmp_path_factory.mktemp("multi_server")
    names = write_repository(tmp / "repo", ["tiny-flux", "tiny-wan"], "cpu")
    assert {"tiny-flux_smart_diffusion", "tiny-wan_smart_diffusion_stream", "tiny-wan_vae_decoder"} <= set(names)
    srv, shm_before = start_server(tmp / "repo", tmp)
    try:
        yield srv
    finally:
        stop_server_and_check(srv, shm_before)


def client_for(server, protocol: str, prefix: str) -> SmartDiffusionClient:
    return SmartDiffusionClient(server.http_url if protocol == "http" else server.grpc_url, protocol, model_prefix=prefix)


def run(server, job: tuple[str, str, bool, dict]) -> np.ndarray:
    prefix, protocol, stream, params = job
    with client_for(server, protocol, prefix) as client:
        result = client.stream(Request(**params)) if stream else client.infer(Request(**params))
    return result.image  # the image [H, W, 3], or the video [F, H, W, 3]


@pytest.fixture(scope="module")
def alone(multi_server, tiny_flux, tiny_wan):
    """Each job's single-request result (one at a time), checked against diffusers once per pipeline."""
    jobs = {
        "image-1": (FLUX, "http", False, {**IMAGE, "seed": 1}),
        "image-2": (FLUX, "grpc", True, {**IMAGE, "seed": 2}),
        "video-1": (WAN, "http", False, {**VIDEO, "seed": 1}),
        "video-2": (WAN, "grpc", True, {**VIDEO, "seed": 2}),
        "video-3": (WAN, "grpc", False, {**VIDEO, "seed": 3, "negative_prompt": "blurry"}),
    }
    results = {name: run(multi_server, job) for name, job in jobs.items()}
    np.testing.assert_array_equal(results["image-1"], flux_reference(tiny_flux, **{**IMAGE, "seed": 1}))
    np.testing.assert_array_equal(results["video-1"], wan_reference(tiny_wan, **{**VIDEO, "seed": 1}))
    return jobs, results


def test_both_pipelines_answer_with_their_own_kind(alone):
    _, results = alone
    assert results["image-1"].shape == (64, 96, 3) and results["video-1"].shape == (9, 64, 64, 3)


def test_interleaved_concurrent_requests_equal_their_single_results(multi_server, alone):
    jobs, expected = alone
    order = ["video-1", "image-1", "video-2", "image-2", "video-3", "image-1", "video-1"]  # repeats on purpose
    start = threading.Barrier(len(order))

    def job(name: str) -> np.ndarray:
        start.wait(timeout=60)  # all requests in flight together
        return run(multi_server, jobs[name])

    with ThreadPoolExecutor(len(order)) as pool:
        results = list(pool.map(job, order))
    for name, pixels in zip(order, results):
        np.testing.assert_array_equal(pixels, expected[name], err_msg=name)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["smart_diffusion", "smart_diffusion_ensemble"])
def test_num_frames_sent_to_the_image_pipeline_is_invalid_arg(multi_server, protocol, model):
    """The BLS orchestrator says so itself; the ensemble does not declare the input, so Triton refuses it."""
    with client_for(multi_server, protocol, FLUX) as client:
        with pytest.raises(GenerationError) as err:
            client.infer(Request(prompt="a cat", num_frames=9, seed=1), model=model)
        assert str(err.value.status) in ("400", "StatusCode.INVALID_ARGUMENT"), (err.value.status, str(err.value))
        assert "NUM_FRAMES" in str(err.value), str(err.value)
        assert client.infer(Request(prompt="a cat", seed=1, steps=1), model=model).images.shape == (1, 64, 64, 3)


def test_image_output_asked_of_the_video_pipeline_is_invalid_arg(multi_server):
    """The video pipeline has no IMAGE output (and no image-only inputs: every image input applies to video)."""
    with client_for(multi_server, "http", WAN) as client:
        with pytest.raises(GenerationError) as err:
            client.infer(Request(prompt="a cat", seed=1, steps=1), output="IMAGE")
        assert str(err.value.status) == "400" and "IMAGE" in str(err.value), str(err.value)
        assert client.pixel_output("smart_diffusion") == "VIDEO"


def test_unprefixed_names_are_not_served(multi_server):
    with client_for(multi_server, "http", "") as client:
        with pytest.raises(GenerationError):
            client.infer(Request(prompt="a cat"), output="IMAGE")
