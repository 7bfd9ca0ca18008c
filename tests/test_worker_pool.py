"""WorkerPool lifecycle on CPU/gloo: jobs, errors, kill -9, hangs, cancellation, clean shutdown.

One module-scoped 2-rank pool; the failure tests respawn it (that is what they test), so the number of
start-ups stays small (~5 in all, a few seconds each).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from smart_diffusion_backend.parallel import (
    JobCancelledError,
    ParallelConfig,
    WorkerContext,
    WorkerDiedError,
    WorkerJobError,
    WorkerPool,
    WorkerPoolError,
    WorkerTimeoutError,
)
from smart_diffusion_backend.parallel import parallel_state as ps

pytestmark = pytest.mark.pool  # every test here starts worker processes

STEP_TIMEOUT_S = 4.0


class EchoWorker:
    def __init__(self, ctx: WorkerContext, scale: float) -> None:
        self.ctx = ctx
        self.scale = scale

    def ping(self) -> dict[str, Any]:
        return dict(rank=self.ctx.rank, pid=os.getpid(), sp=ps.get_sp_group().ranks)

    def scale_tensor(self, x: torch.Tensor, arr: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        # A collective in every job: the ranks really run in lockstep.
        y = x * self.scale
        torch.distributed.all_reduce(y, group=ps.get_sp_group().group)
        return y, arr + self.ctx.rank

    def fail(self, on_rank: int | None = None) -> None:
        if on_rank is None or on_rank == self.ctx.rank:
            raise ValueError(f"bad input on rank {self.ctx.rank}")

    def steps(self, n: int, dt: float) -> int:
        """A denoise-like loop: one collective stop check per step."""
        for i in range(n):
            self.ctx.check_cancelled()
            time.sleep(dt)
        return n

    def hang(self, on_rank: int) -> None:
        if self.ctx.rank == on_rank:
            time.sleep(3600)  # no heartbeat, never reaches the barrier
        ps.barrier()


def _init_echo(ctx: WorkerContext, scale: float = 2.0) -> EchoWorker:
    return EchoWorker(ctx, scale)


def _init_fails_on_rank1(ctx: WorkerContext) -> EchoWorker:
    if ctx.rank == 1:
        raise RuntimeError("cannot load the transformer (test)")
    return EchoWorker(ctx, 1.0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


# What our stack could leave in /dev/shm (torch shared tensors, NCCL, multiprocessing heaps / semaphores).
# Other processes on the machine (a tritonserver under test, ...) create their own entries concurrently.
_OUR_SHM_PREFIXES = ("torch_", "nccl", "sem.", "pym-", "psm_", "mp-")


def _shm() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(_OUR_SHM_PREFIXES)}
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="module")
def shm_before() -> set[str]:
    return _shm()


@pytest.fixture(scope="module")
def pool(shm_before):
    p = WorkerPool(2, _init_echo, init_kwargs=dict(scale=3.0), parallel=ParallelConfig(ring_degree=2),
                   num_threads=1, start_timeout_s=120, step_timeout_s=STEP_TIMEOUT_S, collective_timeout_s=60)
    p.start()
    yield p
    p.shutdown()


def test_constructor_validation():
    with pytest.raises(ValueError, match="device"):
        WorkerPool(2, _init_echo, device="tpu")
    with pytest.raises(ValueError, match="nccl"):
        WorkerPool(2, _init_echo, backend="nccl")
    with pytest.raises(ValueError, match="world size"):
        WorkerPool(2, _init_echo, parallel=ParallelConfig(ulysses_degree=4))


def test_run_and_payloads(pool):
    info = pool.run_all("ping")
    assert [i["rank"] for i in info] == [0, 1] and info[0]["sp"] == (0, 1)
    assert [i["pid"] for i in info] == pool.pids
    y, arr = pool.run("scale_tensor", torch.ones(2, 3), np.zeros(4))
    assert torch.equal(y, torch.full((2, 3), 6.0)) and arr.tolist() == [0, 0, 0, 0]
    assert pool.run_all("scale_tensor", torch.ones(1), np.zeros(1))[1][1].tolist() == [1]


def test_job_error_keeps_pool(pool):
    pids = pool.pids
    with pytest.raises(WorkerJobError, match="ValueError: bad input") as ei:
        pool.run("fail")
    assert "Traceback" in ei.value.remote_traceback
    assert pool.pids == pids and pool.run("ping")["pid"] == pids[0]


def test_unknown_method(pool):
    with pytest.raises(WorkerJobError, match="no public method 'nope'"):
        pool.run("nope")


def test_cancel_stops_within_one_step(pool):
    pids = pool.pids
    threading.Timer(0.5, pool.cancel).start()
    t0 = time.monotonic()
    with pytest.raises(JobCancelledError, match="cancelled"):
        pool.run("steps", 200, 0.1)
    assert time.monotonic() - t0 < 0.5 + 0.5, "cancellation took more than a few steps"
    # through cancel_check (what Triton's request.is_cancelled() plugs into)
    t0 = time.monotonic()
    with pytest.raises(JobCancelledError):
        pool.execute("steps", (200, 0.1), cancel_check=lambda: time.monotonic() - t0 > 0.3)
    assert pool.pids == pids and pool.run("steps", 2, 0.0) == 2  # no restart needed


def test_kill9_during_call_then_recovery(pool):
    old = pool.pids
    threading.Timer(0.5, os.kill, (old[1], signal.SIGKILL)).start()
    with pytest.raises(WorkerDiedError, match=r"rank 1 \(pid \d+\) exit code -9"):
        pool.run("steps", 200, 0.05)
    assert not any(_alive(p) for p in old), "torn-down workers still alive"
    info = pool.run_all("ping")  # respawned automatically
    assert [i["rank"] for i in info] == [0, 1] and set(pool.pids).isdisjoint(old)


def test_kill9_while_idle_then_recovery(pool):
    old = pool.pids
    os.kill(old[0], signal.SIGKILL)
    time.sleep(0.5)  # the monitor thread notices through the sentinel
    assert not pool.is_running
    y, _ = pool.run("scale_tensor", torch.ones(1), np.zeros(1))
    assert y.item() == 6.0 and set(pool.pids).isdisjoint(old)


def test_hang_times_out_then_recovery(pool):
    old = pool.pids
    t0 = time.monotonic()
    with pytest.raises(WorkerTimeoutError, match=r"no progress from ranks \[.*1.*\]"):
        pool.run("hang", 1)
    assert time.monotonic() - t0 < STEP_TIMEOUT_S + 8
    assert not any(_alive(p) for p in old)
    assert pool.run("ping")["rank"] == 0 and set(pool.pids).isdisjoint(old)


def test_startup_failure_cleans_up():
    before = {p.pid for p in multiprocessing.active_children()}
    bad = WorkerPool(2, _init_fails_on_rank1, num_threads=1, start_timeout_s=120)
    with pytest.raises(WorkerPoolError, match="cannot load the transformer"):
        bad.start()
    assert not bad.pids
    assert {p.pid for p in multiprocessing.active_children()} <= before
    bad.shutdown()


def test_shutdown_leaves_nothing(pool, shm_before):
    pids = pool.pids
    pool.shutdown()
    assert not any(_alive(p) for p in pids)
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("sd-worker-")]
    assert _shm() - shm_before == set(), f"/dev/shm leftovers: {_shm() - shm_before}"
    pool.shutdown()  # idempotent


def _sleep_forever() -> None:
    time.sleep(60)


def test_reap_reports_the_exit_code_when_two_threads_reap_at_once():
    # The pool's monitor thread and the caller reap a dead worker concurrently; both must see its code.
    from smart_diffusion_backend.parallel.worker_pool import _reap

    ctx = multiprocessing.get_context("fork")
    for _ in range(20):
        process = ctx.Process(target=_sleep_forever, daemon=True)
        process.start()
        os.kill(process.pid, signal.SIGKILL)
        seen: list[int | None] = []
        reapers = [threading.Thread(target=lambda: (_reap(process), seen.append(process.exitcode))) for _ in range(2)]
        for t in reapers:
            t.start()
        for t in reapers:
            t.join()
        assert seen == [-9, -9]
