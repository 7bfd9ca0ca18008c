"""Overload on a real tritonserver: more concurrent requests than pipeline slots + queue.

Its own server (queue of 8, max_queue_delay_s 4), so the queue's bounds rather than its size decide:
requests are refused at once by their predicted wait or finish, stopped at their deadline, or run.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from smart_diffusion_backend.metrics import scrape, total
from smart_diffusion_client import Request, SmartDiffusionClient

from .conftest import start_server, stop_server_and_check, system_yaml_with

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def overload_server(tiny_flux, tmp_path_factory):
    from smart_diffusion_backend.repository import write_repository

    tmp = tmp_path_factory.mktemp("overload")
    system = system_yaml_with("cpu", tmp / "cpu-overload.yaml", max_queue_size=8, max_queue_delay_s=4)
    write_repository(tmp / "repo", ["tiny-flux"], str(system))
    server, shm_before = start_server(tmp / "repo", tmp)
    try:
        yield server
    finally:
        stop_server_and_check(server, shm_before)


def metrics(server) -> dict:
    return scrape(server.host, server.metrics_port)


def wait_for(what: str, condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_overload_answers_every_request_within_its_deadline(overload_server):
    """More concurrent requests than pipeline slots + queue, each with a `timeout` of DEADLINE_S: every
    one is answered by the server (OK, UNAVAILABLE at once, or refused/stopped at its deadline) within
    DEADLINE_S + 5 s, over HTTP and gRPC, though the clients would wait longer; then it serves normally."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    deadline_s, load = 6.0, Request(prompt="a cat", height=512, width=512, steps=30)
    with SmartDiffusionClient(overload_server.http_url) as client:  # the admission learns this load's cost
        for seed in range(2):
            client.infer(dataclasses.replace(load, seed=seed))

    def one(i: int) -> tuple[str, float]:
        module = httpclient if i % 2 else grpcclient
        url = overload_server.http_url if i % 2 else overload_server.grpc_url
        inputs = []
        for name, (array, dtype) in dataclasses.replace(load, seed=i).tensors().items():
            inputs.append(module.InferInput(name, list(array.shape), dtype))
            inputs[-1].set_data_from_numpy(array)
        kwargs = {"client_timeout": deadline_s + 30} if module is grpcclient else {}
        client = module.InferenceServerClient(url, **({} if module is grpcclient else {"network_timeout": deadline_s + 30}))
        started = time.monotonic()
        try:
            client.infer("smart_diffusion", inputs, timeout=int(deadline_s * 1e6), **kwargs)
            outcome = "ok"
        except InferenceServerException as exc:
            outcome = f"{exc.status()} {exc.message()}"
        finally:
            client.close()
        return outcome, time.monotonic() - started

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    late = [(o, round(s, 1)) for o, s in results if s > deadline_s + 5]
    assert not late, late
    unavailable = [o for o, _ in results if o.startswith(("503", "StatusCode.UNAVAILABLE"))]
    stopped = [o for o, _ in results if "request timeout of 6 s exceeded" in o]
    assert sum(o == "ok" for o, _ in results) + len(unavailable) + len(stopped) == len(results), results
    assert unavailable and any(o == "ok" for o, _ in results), results
    admission_reasons = ("retry later", "refused without running it", "in the queue, past")
    assert all(any(r in o for r in admission_reasons) for o in unavailable), results
    def denoiser_idle() -> bool:
        return total(metrics(overload_server), "smart_diffusion_requests_in_flight", model="denoiser") == 0

    wait_for("the denoiser to be idle", denoiser_idle, timeout_s=10)  # no abandoned work left running
    with SmartDiffusionClient(overload_server.http_url) as client:
        assert client.generate("a cat", seed=1, steps=2).image.shape == (64, 64, 3)
