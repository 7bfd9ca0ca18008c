"""Operations on a real tritonserver: metrics, cancellation, the bounded queue, hot upgrade under load.

One server for the module (explicit model control, a system yaml with a queue of 2), so the machine
runs few servers; the hot upgrade changes the served stage models, so it runs last.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from smart_diffusion_backend.metrics import scrape, total
from smart_diffusion_backend.serving import process_cmdline
from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

from .conftest import start_server, stop_server_and_check, system_yaml_with

pytestmark = pytest.mark.server

QUEUE = 2
SLOW = Request(prompt="a slow cat", height=1024, width=1024, steps=50, seed=5)  # ~10 s of denoising


@pytest.fixture(scope="module")
def ops_server(tiny_flux, tmp_path_factory):
    from smart_diffusion_backend.repository import write_repository

    tmp = tmp_path_factory.mktemp("ops")
    system = system_yaml_with("cpu", tmp / "cpu-queue.yaml", max_queue_size=QUEUE)
    write_repository(tmp / "repo", ["tiny-flux"], str(system))
    server, shm_before = start_server(tmp / "repo", tmp, model_control_mode="explicit", load_models=("*",))
    server.repo, server.system_yaml = tmp / "repo", system
    try:
        yield server
    finally:
        stop_server_and_check(server, shm_before)


def metrics(server) -> dict:
    return scrape(server.host, server.metrics_port)


def wait_for(what: str, condition, timeout_s: float = 60.0, poll_s: float = 0.05) -> float:
    """Seconds until `condition()` held; fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        time.sleep(poll_s)
    return time.monotonic() - started


def cancelled(server, model: str = "denoiser") -> float:
    return total(metrics(server), "smart_diffusion_requests_total", model=model, outcome="cancelled")


def grpc_inputs(request: Request):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, (array, dtype) in request.tensors().items():
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_are_exported_and_move(ops_server):
    before = metrics(ops_server)
    with SmartDiffusionClient(ops_server.http_url) as client:
        client.infer(Request(prompt="a cat", steps=12, seed=1, cache_ratio=1.0))
        client.infer(Request(prompt="a cat", steps=3, seed=1), model="smart_diffusion_ensemble")
    after = metrics(ops_server)

    def moved(name: str, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    for stage in ("text_encoder", "denoiser", "vae_decoder"):
        assert moved("smart_diffusion_stage_seconds_count", stage=stage) == 2, stage
        assert moved("smart_diffusion_requests_total", model=stage, outcome="success") == 2, stage
    assert moved("smart_diffusion_stage_seconds_count", stage="pipeline", model="smart_diffusion") == 1
    assert moved("smart_diffusion_stage_seconds_bucket", stage="denoiser", le="+Inf") == 2
    assert moved("smart_diffusion_denoise_steps_total") == 15
    assert moved("smart_diffusion_denoise_seconds_total") > 0
    assert total(after, "smart_diffusion_denoise_steps_per_second") > 0
    assert moved("smart_diffusion_cache_steps_skipped_total") > 0  # ratio 1 skips steps
    assert moved("smart_diffusion_cache_block_evals_total") > 0
    assert ("smart_diffusion_pool_restarts_total", frozenset()) not in after  # always labelled
    assert any(name == "smart_diffusion_pool_restarts_total" for name, _ in after)
    assert any(name == "nv_inference_pending_request_count" for name, _ in after)  # queue depth: Triton's
    waiting = [v for (name, labels), v in after.items() if name == "smart_diffusion_requests_waiting"]
    assert waiting and sum(waiting) == 0  # the admission queues' gauge exists and is empty now
    assert total(after, "smart_diffusion_requests_in_flight") == 0


def test_bad_input_is_counted_as_invalid_arg(ops_server):
    before = total(metrics(ops_server), "smart_diffusion_requests_total", model="smart_diffusion", outcome="invalid_arg")
    with SmartDiffusionClient(ops_server.http_url) as client, pytest.raises(GenerationError, match="STEPS"):
        client.infer(Request(prompt="a cat", steps=0))
    after = total(metrics(ops_server), "smart_diffusion_requests_total", model="smart_diffusion", outcome="invalid_arg")
    assert after == before + 1


# -- cancellation -----------------------------------------------------------------------------


def test_grpc_stream_cancel_stops_the_denoiser_within_a_step(ops_server):
    import tritonclient.grpc as grpcclient

    before = cancelled(ops_server)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(ops_server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((time.monotonic(), result, error)))
    try:
        client.async_stream_infer("smart_diffusion_stream", grpc_inputs(SLOW))
        stamps = [responses.get(timeout=120)[0] for _ in range(3)]  # steps 1..3 arrived
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    step_s = (stamps[-1] - stamps[0]) / 2
    waited = wait_for("the denoiser to stop", lambda: cancelled(ops_server) > before)
    # One step plus the relay's poll, with slack for a loaded 2-core machine; the rest was ~47 steps.
    assert waited < max(3.0, 10 * step_s), (waited, step_s)
    wait_for("the stream's final (cancelled) response", lambda: cancelled(ops_server, "smart_diffusion_stream") >= 1)
    with SmartDiffusionClient(ops_server.grpc_url, "grpc") as c:  # the denoiser is free again
        assert c.stream(Request(prompt="a cat", steps=2, seed=1)).progress == [(1, 2), (2, 2)]


def test_grpc_cancel_of_a_plain_request_stops_the_denoiser(ops_server):
    import tritonclient.grpc as grpcclient

    before = cancelled(ops_server)
    client = grpcclient.InferenceServerClient(ops_server.grpc_url)
    try:
        def denoising() -> bool:
            return total(metrics(ops_server), "smart_diffusion_requests_in_flight", model="denoiser") > 0

        future = client.async_infer("smart_diffusion", grpc_inputs(SLOW), callback=lambda result, error: None)
        wait_for("the denoise loop to start", denoising)
        time.sleep(0.3)
        future.cancel()
        waited = wait_for("the denoiser to stop", lambda: cancelled(ops_server) > before, timeout_s=30)
    finally:
        client.close()
    assert waited < 5.0, waited  # ~50 steps were left
    wait_for("the orchestrator's answer", lambda: cancelled(ops_server, "smart_diffusion") >= 1)
    with SmartDiffusionClient(ops_server.http_url) as c:
        assert c.generate("a cat", seed=2, steps=2).image.shape == (64, 64, 3)


def test_grpc_client_timeout_stops_the_request(ops_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    before = cancelled(ops_server)
    client = grpcclient.InferenceServerClient(ops_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="Deadline"):
            client.infer("smart_diffusion", grpc_inputs(SLOW), client_timeout=1.5)
    finally:
        client.close()
    wait_for("the denoiser to stop", lambda: cancelled(ops_server) > before, timeout_s=30)


def test_http_request_timeout_parameter_bounds_the_server_work(ops_server):
    """Triton 2.51's HTTP endpoint does not report a client disconnect; a request's `timeout`
    parameter (what the client would wait) bounds the server's work instead: the admission refuses it at
    once when it predicts it cannot finish in time, else it runs and stops within a step of the timeout."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    inputs = []
    for name, (array, dtype) in SLOW.tensors().items():
        tensor = httpclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    before = cancelled(ops_server)
    denoised_before = total(metrics(ops_server), "smart_diffusion_requests_total", model="denoiser")
    client = httpclient.InferenceServerClient(ops_server.http_url, network_timeout=120)
    started = time.monotonic()
    try:
        with pytest.raises(InferenceServerException) as error:
            client.infer("smart_diffusion", inputs, timeout=1_000_000)
    finally:
        client.close()
    assert time.monotonic() - started < 3.0, "answered within a step of its 1 s timeout"
    message = error.value.message()
    if "refused without running it" in message:
        assert error.value.status() == "503", message
        assert total(metrics(ops_server), "smart_diffusion_requests_total", model="denoiser") == denoised_before
    else:
        assert "request timeout of 1 s exceeded" in message, message
        wait_for("the denoiser's cancelled answer", lambda: cancelled(ops_server) > before, timeout_s=10)


# -- bounded queue ----------------------------------------------------------------------------


def test_a_full_queue_answers_unavailable_and_serving_goes_on(ops_server):
    """4 pipeline slots + a queue of 2: of 10 concurrent slow requests, 6 run, the rest get 503 at once."""

    def one(seed: int) -> str:
        try:
            with SmartDiffusionClient(ops_server.http_url) as client:
                client.infer(Request(prompt="a cat", height=256, width=256, steps=20, seed=seed))
            return "ok"
        except GenerationError as exc:
            return f"{exc.status} {exc}"

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(one, range(10)))
    refused = [o for o in outcomes if o != "ok"]
    assert refused and all(o.startswith("503") and "the queue's limit" in o for o in refused), outcomes
    assert outcomes.count("ok") >= 4 + QUEUE - 1, outcomes  # -1: a worker thread may start late
    with SmartDiffusionClient(ops_server.http_url) as client:
        assert client.generate("a cat", seed=1, steps=2).image.shape == (64, 64, 3)


# -- hot upgrade (last: it replaces the stage models) -----------------------------------------


def test_hot_upgrade_under_load_fails_no_request_and_returns_memory(ops_server):
    from smart_diffusion_backend.upgrade import hot_upgrade

    stop = threading.Event()
    outcomes: list[str] = []

    def load(protocol: str, stream: bool) -> None:
        url = ops_server.http_url if protocol == "http" else ops_server.grpc_url
        with SmartDiffusionClient(url, protocol) as client:
            while not stop.is_set():
                request = Request(prompt="a dog", seed=3, steps=2)
                try:
                    result = client.stream(request) if stream else client.infer(request)
                    outcomes.append("ok" if result.image.shape == (64, 64, 3) else "bad shape")
                except GenerationError as exc:
                    outcomes.append(f"{protocol} stream={stream}: {exc}")

    threads = [threading.Thread(target=load, args=a) for a in (("http", False), ("grpc", False), ("grpc", True))]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        report = hot_upgrade(
            ops_server.http_url, ops_server.repo, ops_server.process.pid, "tiny-flux", str(ops_server.system_yaml), "v2_",
            log=lambda line: None,
        )
        served_before = len(outcomes)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    failed = [o for o in outcomes if o != "ok"]
    assert not failed, failed[:5]
    assert len(outcomes) > served_before > 0
    assert report.new_stages == ["v2_text_encoder", "v2_denoiser", "v2_vae_decoder", "v2_request_gate"]
    assert not [p for p in report.old_stub_pids if Path(f"/proc/{p}").exists() and process_cmdline(p)]
    assert report.rss_after < report.rss_peak
    after = metrics(ops_server)
    assert total(after, "smart_diffusion_requests_total", model="v2_denoiser", outcome="success") > 0
    with SmartDiffusionClient(ops_server.http_url) as client:  # same names, new pipeline
        image = client.infer(Request(prompt="a dog", seed=3, steps=2), model="smart_diffusion_ensemble").image
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)


# -- library pieces without a server ----------------------------------------------------------


class _FakeMetric:
    def __init__(self) -> None:
        self.v = 0.0

    def increment(self, d: float) -> None:
        self.v += d

    def value(self) -> float:
        return self.v


class _FakePb:
    class TritonError:
        INVALID_ARG, CANCELLED, UNAVAILABLE, INTERNAL = 1, 2, 3, 4

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "c", "g", "h"

        def __init__(self, name: str, description: str, kind: str) -> None:
            self.metrics: list = []

        def Metric(self, labels: dict, **kwargs) -> _FakeMetric:  # noqa: N802 - Triton's name
            metric = _FakeMetric()
            self.metrics.append((labels, metric))
            return metric


def test_pool_restarts_counter_follows_the_pool_and_outcomes_map_codes():
    from smart_diffusion_backend.metrics import ServingMetrics, outcome_of

    m = ServingMetrics(_FakePb, {"model_version": "1", "model_instance_name": "denoiser_0_0"}, "denoiser")
    for starts_so_far in (0, 0, 2, 1, 3):  # the pool's own count; never goes down
        m.set_pool_restarts(starts_so_far)
    assert m._metric("pool_restarts_total").value() == 3

    class Error:
        def __init__(self, code: int) -> None:
            self._code = code

        def code(self) -> int:
            return self._code

    assert [outcome_of(Error(c), _FakePb) for c in (1, 2, 3, 4)] == ["invalid_arg", "cancelled", "unavailable", "error"]
    assert outcome_of(None, _FakePb) == "success"
