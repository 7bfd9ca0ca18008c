"""Cancellation through the denoiser's worker pool (2 gloo ranks on CPU) behind a real tritonserver:
a cancelled stream stops every rank within a step; the same pool serves the next request (no respawn).

Its own module so that tests/test_service_ops.py's server is stopped before this one starts.
"""

from __future__ import annotations

import queue
import time

import pytest

from smart_diffusion_backend.metrics import total
from smart_diffusion_client import Request, SmartDiffusionClient

from .conftest import start_server, stop_server_and_check
from .test_service_ops import cancelled, grpc_inputs, metrics, wait_for

pytestmark = [pytest.mark.server, pytest.mark.pool]


@pytest.fixture(scope="module")
def pooled_ops_server(tiny_flux, tmp_path_factory):
    from smart_diffusion_backend.repository import write_repository

    tmp = tmp_path_factory.mktemp("ops-pool")
    write_repository(tmp / "repo", ["tiny-flux"], "cpu-sp2")
    server, shm_before = start_server(tmp / "repo", tmp)
    try:
        yield server
    finally:
        stop_server_and_check(server, shm_before)


def test_stream_cancel_stops_the_worker_pool_and_it_serves_on(pooled_ops_server):
    import tritonclient.grpc as grpcclient

    from .test_pool_server import pool_workers

    server = pooled_ops_server
    workers = pool_workers(server.process.pid)
    assert len(workers) == 2
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((time.monotonic(), result, error)))
    try:
        client.async_stream_infer("smart_diffusion_stream", grpc_inputs(Request(prompt="a cat", height=512, width=512, steps=50, seed=1)))
        stamps = [responses.get(timeout=120)[0] for _ in range(3)]
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    step_s = (stamps[-1] - stamps[0]) / 2
    waited = wait_for("the pool to stop", lambda: cancelled(server) >= 1)
    assert waited < max(3.0, 10 * step_s), (waited, step_s)
    with SmartDiffusionClient(server.http_url) as c:
        assert c.generate("a cat", seed=2, steps=2).stats["ranks"] == 2
    assert pool_workers(server.process.pid) == workers  # cancelled, not crashed: no respawn
    assert total(metrics(server), "smart_diffusion_pool_restarts_total") == 0
