"""The denoiser's worker pool behind a real tritonserver (2 gloo processes on CPU)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from smart_diffusion_backend.serving import child_pids
from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

from .conftest import start_server, stop_server_and_check
from .reference import flux_reference

pytestmark = [pytest.mark.server, pytest.mark.pool]

CASE = dict(prompt="a green triangle", height=64, width=80, steps=3, guidance_scale=3.5, seed=11)


def pool_workers(server_pid: int) -> list[int]:
    """The denoiser's spawned workers: multiprocessing spawn children under the server."""
    workers = []
    for pid in child_pids(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"multiprocessing.spawn" in cmdline and b"spawn_main" in cmdline:
            workers.append(pid)
    return sorted(workers)


@pytest.fixture(scope="module", params=["cpu-sp2", "cpu-ring2"])
def pooled_server(request, tiny_flux, tmp_path_factory):
    from smart_diffusion_backend.repository import write_repository

    tmp = tmp_path_factory.mktemp(request.param)
    write_repository(tmp / "repo", ["tiny-flux"], request.param)
    server, shm_before = start_server(tmp / "repo", tmp)
    try:
        yield server
    finally:
        workers = pool_workers(server.process.pid)
        stop_server_and_check(server, shm_before)
        assert not [p for p in workers if Path(f"/proc/{p}").exists()], "pool workers outlived the server"


def test_two_process_pool_serves_the_single_process_image(pooled_server, tiny_flux):
    reference = flux_reference(tiny_flux, **CASE)
    assert len(pool_workers(pooled_server.process.pid)) == 2
    with SmartDiffusionClient(pooled_server.http_url) as client:
        result = client.infer(Request(**CASE))
    assert result.stats["ranks"] == 2
    diff = np.abs(result.image.astype(int) - reference.astype(int))
    assert diff.max() <= 1, f"max |diff| {diff.max()} uint8 levels vs the 1-process pipeline"


def test_stream_progress_comes_from_the_pool(pooled_server):
    seen = []
    with SmartDiffusionClient(pooled_server.grpc_url, "grpc") as client:
        client.stream(Request(prompt="a cat", steps=3, seed=1), on_progress=lambda s, n: seen.append((s, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_killed_worker_fails_the_request_in_flight_then_the_pool_respawns(pooled_server):
    """kill -9 of a worker mid-request: that request fails with a clear error, the next one succeeds."""
    before = pool_workers(pooled_server.process.pid)
    killed = []

    def kill_on_first_step(step: int, total: int) -> None:
        if not killed:
            os.kill(before[-1], signal.SIGKILL)
            killed.append(step)

    with SmartDiffusionClient(pooled_server.grpc_url, "grpc") as client:
        with pytest.raises(GenerationError, match="worker process died"):
            client.stream(Request(prompt="a cat", height=512, width=512, steps=50, seed=1), on_progress=kill_on_first_step)
        result = client.infer(Request(**CASE))
    after = pool_workers(pooled_server.process.pid)
    assert killed and len(after) == 2 and not set(after) & set(before)
    assert result.image.shape == (64, 80, 3)


def test_worker_killed_while_idle_is_replaced_before_the_next_request(pooled_server):
    before = pool_workers(pooled_server.process.pid)
    os.kill(before[0], signal.SIGKILL)
    time.sleep(0.5)
    with SmartDiffusionClient(pooled_server.http_url) as client:
        result = client.infer(Request(**CASE))
    assert result.image.shape == (64, 80, 3)
    assert not set(pool_workers(pooled_server.process.pid)) & set(before)
