"""End to end through a real tritonserver: every entry point against diffusers' FluxPipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

from .reference import flux_reference

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent

CASE = dict(prompt="a red circle on a blue background", height=64, width=96, steps=3, guidance_scale=2.5, seed=42)


@pytest.fixture(scope="module")
def reference(tiny_flux):
    return flux_reference(tiny_flux, **CASE)


def client_for(server, protocol: str) -> SmartDiffusionClient:
    return SmartDiffusionClient(server.http_url if protocol == "http" else server.grpc_url, protocol)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["smart_diffusion", "smart_diffusion_ensemble"])
def test_plain_entry_points_are_bit_identical_to_flux_pipeline(server, reference, protocol, model):
    with client_for(server, protocol) as client:
        result = client.infer(Request(**CASE), model=model)
    np.testing.assert_array_equal(result.image, reference)
    assert result.stats["seed"] == CASE["seed"] and result.stats["steps"] == CASE["steps"]
    assert set(result.stats["stages_ms"]) == {"text_encoder", "denoiser", "vae_decoder"}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stream_reports_every_step_then_the_image(server, reference, protocol):
    seen = []
    with client_for(server, protocol) as client:
        result = client.stream(Request(**CASE), on_progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert result.progress == seen
    np.testing.assert_array_equal(result.image, reference)


def test_stats_report_stage_times_and_the_seed_drawn(server, tiny_flux):
    with client_for(server, "http") as client:
        first = client.generate("a cat")
        assert first.image.shape == (tiny_flux.default_height, tiny_flux.default_width, 3)
        stats = first.stats
        assert stats["steps"] == tiny_flux.default_steps
        assert stats["total_ms"] >= sum(stats["stages_ms"].values()) > 0
        again = client.generate("a cat", seed=stats["seed"])  # the reported seed reproduces the image
    np.testing.assert_array_equal(first.image, again.image)


BAD = [
    (dict(height=65), "HEIGHT", "multiple of 16"),
    (dict(width=2048), "WIDTH", "[16, 1024]"),
    (dict(steps=0), "STEPS", "[1, 50]"),
    (dict(steps=500), "STEPS", "out of range"),
    (dict(guidance_scale=float("nan")), "GUIDANCE_SCALE", "finite"),
    (dict(guidance_scale=-3.0), "GUIDANCE_SCALE", "out of range"),
    (dict(cache_ratio=2.0), "CACHE_RATIO", "[0, 1]"),
    (dict(cache_ratio=-0.5), "CACHE_RATIO", "out of range"),
    (dict(seed=-5), "SEED", "out of range"),
    (dict(prompt=""), "PROMPT", "empty"),
    (dict(prompt="x" * 5000), "PROMPT", "characters"),
    (dict(negative_prompt="blurry"), "NEGATIVE_PROMPT", "not supported"),
]


def _is_invalid_arg(error: GenerationError, protocol: str) -> bool:
    return error.status == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT") or error.status == 400


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["smart_diffusion", "smart_diffusion_ensemble"])
def test_bad_inputs_are_invalid_arg_naming_the_field_and_serving_goes_on(server, protocol, model):
    with client_for(server, protocol) as client:
        for change, field, fragment in BAD:
            request = Request(**{**dict(prompt="a cat", seed=1), **change})
            with pytest.raises(GenerationError) as err:
                client.infer(request, model=model)
            assert _is_invalid_arg(err.value, protocol), (change, err.value.status, str(err.value))
            assert f"{field}:" in str(err.value) and fragment in str(err.value), (change, str(err.value))
        good = client.infer(Request(prompt="a cat", seed=1), model=model)
    assert good.image.shape == (64, 64, 3)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stream_bad_input_ends_the_stream_with_invalid_arg(server, protocol):
    with client_for(server, protocol) as client:
        with pytest.raises(GenerationError, match="STEPS: 0 is out of range"):
            client.stream(Request(prompt="a cat", steps=0))
        assert client.stream(Request(prompt="a cat", steps=2)).progress == [(1, 2), (2, 2)]


def test_wrong_dtype_shape_and_unknown_inputs_are_rejected_by_name(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    def tensor(name, array, dtype):
        t = httpclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    prompt = tensor("PROMPT", np.array([b"a cat"], dtype=np.object_), "BYTES")
    cases = [
        ([prompt, tensor("STEPS", np.array([4.0], np.float32), "FP32")], "STEPS"),
        ([prompt, tensor("HEIGHT", np.array([64, 64], np.int32), "INT32")], "HEIGHT"),
        ([prompt, tensor("COLOR", np.array([1], np.int32), "INT32")], "COLOR"),
        ([tensor("STEPS", np.array([4], np.int32), "INT32")], "PROMPT"),
    ]
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        for inputs, field in cases:
            with pytest.raises(InferenceServerException) as err:
                client.infer("smart_diffusion", inputs)
            assert err.value.status() == "400" and field in err.value.message(), err.value.message()
    finally:
        client.close()


@pytest.mark.parametrize(
    "model,protocol,stream",
    [("smart_diffusion", "http", False), ("smart_diffusion_stream", "grpc", True), ("smart_diffusion_ensemble", "grpc", False)],
)
def test_num_images_are_one_batched_request_bit_identical_to_num_images_per_prompt(server, tiny_flux, model, protocol, stream):
    expected = flux_reference(tiny_flux, **CASE, num_images=3)
    with client_for(server, protocol) as client:
        request = Request(**CASE, num_images=3)
        result = client.stream(request, model=model) if stream else client.infer(request, model=model)
    assert result.images.shape == (3, 64, 96, 3)
    np.testing.assert_array_equal(result.images, expected)
    assert result.stats["params"]["num_images"] == 3 and result.stats["seed"] == CASE["seed"]


def test_num_images_past_the_model_limit_is_refused(server):
    with client_for(server, "http") as client, pytest.raises(GenerationError, match=r"NUM_IMAGES: 5 is out of range; allowed \[1, 4\]"):
        client.infer(Request(**CASE, num_images=5))


def test_cli_writes_the_png(server, reference, tmp_path):
    out = tmp_path / "cli.png"
    args = [
        sys.executable, "-m", "smart_diffusion_client", "generate", "--prompt", CASE["prompt"], "--height", "64", "--width", "96",
        "--steps", "3", "--guidance-scale", "2.5", "--seed", "42", "--url", server.grpc_url, "--protocol", "grpc",
        "--stream", "--out", str(out),
    ]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out)), reference)
    assert json.loads(done.stdout.strip().splitlines()[-1])["seed"] == 42


def test_cache_ratio_trades_block_evaluations_for_quality(server, reference):
    ratios = [0.0, 0.25, 0.5, 0.75, 1.0]
    with client_for(server, "http") as client:
        results = [client.infer(Request(**{**CASE, "steps": 12}, cache_ratio=r)) for r in ratios]
        base = client.infer(Request(**CASE, cache_ratio=0.0))
    np.testing.assert_array_equal(base.image, reference)  # ratio 0 is the uncached pipeline, bit for bit
    evals = [r.stats["cache"]["cache_block_evals"] for r in results]
    assert evals == sorted(evals, reverse=True) and evals[-1] < evals[0], evals
    assert all(r.stats["cache"]["cache_ratio"] == ratio for r, ratio in zip(results, ratios))
    schedule = results[-1].stats["cache"]["cache_schedule"]["cond"]
    assert schedule[0] == "C" and schedule[-1] == "C", schedule  # first and last steps always computed


def test_concurrent_requests_with_different_ratios_equal_their_solo_results(server):
    from concurrent.futures import ThreadPoolExecutor

    requests = [Request(**{**CASE, "steps": 10}, cache_ratio=0.0), Request(**{**CASE, "steps": 10}, cache_ratio=0.8)]

    def run(request):
        with client_for(server, "grpc") as client:
            return client.infer(request)

    solo = [run(r) for r in requests]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, requests * 2))
    for i, result in enumerate(together):
        np.testing.assert_array_equal(result.image, solo[i % 2].image)
        assert result.stats["cache"] == solo[i % 2].stats["cache"]
