"""A pool of one process per rank that joins the parallel groups and runs jobs in lockstep.

Style of vLLM's ``multiproc_executor``: spawn context, one process per rank, a ready pipe per worker,
cleanup in ``finally`` when start-up fails part-way, a monitor thread on the process sentinels, every wait
bounded, replies as ``(job_id, status, payload)`` tuples — exceptions never cross the process boundary.

Lifecycle
---------
``WorkerPool(world_size, worker_init, ...)`` -> ``start()`` (or the first ``run``) spawns the workers; each
sets its device, calls ``init_parallel_state`` (TCP rendezvous on a free 127.0.0.1 port) and then
``worker_init(ctx, *init_args, **init_kwargs)``, which returns the worker's state object (loads the
transformer, ...). ``run(method, *args, **kwargs)`` sends the same job to every rank, each calls
``state.method(*args, **kwargs)``, and rank 0's result comes back (``run_all``: every rank's).
A worker that dies or stops making progress fails the call with :class:`WorkerPoolError`; the pool tears
itself down and the next call (or ``restart()``) spawns a fresh one. ``shutdown()`` stops everything.

Progress and cancellation: a job that runs many steps calls ``ctx.should_stop()`` (collective: every rank
gets the same answer) or ``ctx.heartbeat()`` between steps. ``step_timeout_s`` bounds the time between two
heartbeats of a rank (or from the job start to its reply), so a long denoise loop is fine and a rank stuck
in a collective is caught within one step's budget. ``cancel()`` (or ``cancel_check`` polled while
waiting) sets a shared flag; the next ``should_stop()`` returns True on every rank and
``ctx.check_cancelled()`` raises, which comes back as :class:`JobCancelledError`.

Payloads travel through the pipes as plain pickles (CUDA tensors are moved to the CPU first): no shared
memory segments, so nothing is left in /dev/shm.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from typing import Any, Callable, Sequence

from .parallel_state import ParallelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "WorkerPool",
    "WorkerContext",
    "WorkerPoolError",
    "WorkerJobError",
    "WorkerDiedError",
    "WorkerTimeoutError",
    "JobCancelledError",
    "JobCancelled",
]


class WorkerPoolError(RuntimeError):
    """A pool call failed (worker died, hung, errored, or the pool could not start)."""


class WorkerJobError(WorkerPoolError):
    """The job raised inside one or more workers; ``remote_traceback`` holds the first one."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


class WorkerDiedError(WorkerPoolError):
    """A worker process exited (killed, crashed) while the pool needed it."""


class WorkerTimeoutError(WorkerPoolError):
    """A worker made no progress within the bound (hung in a collective, deadlock, ...)."""


class JobCancelledError(WorkerPoolError):
    """The job was cancelled and every rank stopped at the same step."""


class JobCancelled(Exception):
    """Raised inside a worker by ``WorkerContext.check_cancelled()``; reported as status 'cancelled'."""


# ---- worker side --------------------------------------------------------------------------------------


@dataclass
class WorkerContext:
    """What a worker's ``worker_init`` and job methods get: identity, device, and the step hooks."""

    rank: int
    world_size: int
    device: Any  # torch.device
    backend: str
    parallel: ParallelConfig
    _flags: Any = field(repr=False)  # RawArray('d', world_size + 1): [cancel flag, heartbeat per rank]

    def heartbeat(self) -> None:
        """Tell the parent this rank is making progress (resets its step timeout)."""
        self._flags[1 + self.rank] = time.monotonic()

    def cancel_requested(self) -> bool:
        """This rank's view of the cancel flag (local, no collective: do not branch on it before one)."""
        return self._flags[0] != 0.0

    def request_cancel(self) -> None:
        """Ask for cancellation from inside a worker (e.g. rank 0 heard a client cancel); every rank
        sees it at the next collective ``should_stop()``."""
        self._flags[0] = 1.0

    def should_stop(self) -> bool:
        """Collective: True on every rank if cancellation was requested. Call at the same point on all ranks."""
        from . import parallel_state as ps

        self.heartbeat()
        return ps.all_reduce_any(self.cancel_requested())

    def check_cancelled(self) -> None:
        """Collective ``should_stop()`` that raises :class:`JobCancelled` (all ranks raise together)."""
        if self.should_stop():
            raise JobCancelled(f"cancelled at rank {self.rank}")


def _set_parent_death_signal(parent_pid: int) -> None:
    """Linux: SIGKILL this worker when the parent dies, so a killed server leaves no orphan behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _to_cpu(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj.detach()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _send(conn: mp_connection.Connection, obj: Any) -> None:
    # Plain pickle, not multiprocessing's ForkingPickler: torch registers shared-memory reductions there.
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: mp_connection.Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


@dataclass(frozen=True)
class _WorkerSpec:
    rank: int
    world_size: int
    init_method: str
    backend: str
    device: str
    parallel: ParallelConfig
    collective_timeout_s: float
    num_threads: int | None
    parent_pid: int
    worker_init: Callable[..., Any]
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]


def _worker_main(spec: _WorkerSpec, conn: mp_connection.Connection, ready: mp_connection.Connection, flags: Any) -> None:
    _set_parent_death_signal(spec.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which shuts us down
    state: Any = None
    try:
        import torch

        from . import parallel_state as ps

        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        if spec.device == "cuda":
            torch.cuda.set_device(spec.rank)
            device = torch.device("cuda", spec.rank)
        else:
            device = torch.device("cpu")
        ps.init_parallel_state(
            rank=spec.rank,
            world_size=spec.world_size,
            init_method=spec.init_method,
            backend=spec.backend,
            ulysses_degree=spec.parallel.ulysses_degree,
            ring_degree=spec.parallel.ring_degree,
            cfg_degree=spec.parallel.cfg_degree,
            timeout_s=spec.collective_timeout_s,
            device=device,
        )
        ctx = WorkerContext(spec.rank, spec.world_size, device, spec.backend, spec.parallel, flags)
        state = spec.worker_init(ctx, *spec.init_args, **spec.init_kwargs)
    except BaseException as e:  # noqa: BLE001 - reported through the ready pipe
        try:
            _send(ready, ("error", f"rank {spec.rank} start-up failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        finally:
            ready.close()
        sys.exit(1)
    _send(ready, ("ready", os.getpid()))
    ready.close()
    try:
        _serve(spec.rank, state, conn)
    finally:
        close = getattr(state, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 - shutting down anyway
                logger.exception("rank %d: state.close() failed", spec.rank)
        from . import parallel_state as ps

        ps.destroy_parallel_state()
        conn.close()


def _serve(rank: int, state: Any, conn: mp_connection.Connection) -> None:
    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):
            return  # parent gone
        if msg[0] == "shutdown":
            return
        _, job_id, method, args, kwargs = msg
        try:
            if method.startswith("_") or not callable(getattr(state, method, None)):
                raise AttributeError(f"worker state {type(state).__name__} has no public method {method!r}")
            reply = (job_id, "ok", _to_cpu(getattr(state, method)(*args, **kwargs)))
        except JobCancelled as e:
            reply = (job_id, "cancelled", str(e))
        except BaseException as e:  # noqa: BLE001 - replied, never raised across the boundary
            reply = (job_id, "error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        try:
            _send(conn, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            _send(conn, (job_id, "error", f"rank {rank}: result of {method!r} is not picklable: {e}"))
        except (BrokenPipeError, OSError):
            return


# ---- parent side --------------------------------------------------------------------------------------


# A process whose sentinel fired is exiting, but tearing down a large address space (a loaded model)
# can take a while on a busy host; wait this long for its exit code before reporting it.
REAP_TIMEOUT_S = 10.0


def _reap(process: Any) -> None:
    deadline = time.monotonic() + REAP_TIMEOUT_S
    process.join(timeout=REAP_TIMEOUT_S)
    # The monitor thread may reap the same process at the same moment: the loser's waitpid fails with
    # ECHILD and its join returns before the winner has stored the exit code. Wait for the winner.
    while process.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.005)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Worker:
    rank: int
    process: Any  # multiprocessing.Process
    conn: mp_connection.Connection


class WorkerPool:
    """One process per rank running ``worker_init``'s state; jobs are method calls broadcast to all ranks."""

    def __init__(
        self,
        world_size: int,
        worker_init: Callable[..., Any],
        *,
        init_args: Sequence[Any] = (),
        init_kwargs: dict[str, Any] | None = None,
        parallel: ParallelConfig | None = None,
        device: str = "cpu",
        backend: str | None = None,
        start_timeout_s: float = 300.0,
        step_timeout_s: float = 120.0,
        collective_timeout_s: float | None = None,
        num_threads: int | None = None,
        auto_restart: bool = True,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        backend = backend or ("nccl" if device == "cuda" else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl" and device != "cuda":
            raise ValueError("backend 'nccl' needs device='cuda'")
        parallel = parallel or ParallelConfig(ulysses_degree=world_size)
        if parallel.world_size != world_size:
            raise ValueError(f"parallel layout {parallel} has world size {parallel.world_size}, pool has {world_size}")
        for name, value in (("start_timeout_s", start_timeout_s), ("step_timeout_s", step_timeout_s)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not callable(worker_init):
            raise TypeError("worker_init must be a picklable module-level callable")
        self.world_size = world_size
        self.worker_init = worker_init
        self.init_args = tuple(init_args)
        self.init_kwargs = dict(init_kwargs or {})
        self.parallel = parallel
        self.device = device
        self.backend = backend
        self.start_timeout_s = start_timeout_s
        self.step_timeout_s = step_timeout_s
        self.collective_timeout_s = collective_timeout_s or max(step_timeout_s, 30.0)
        self.num_threads = num_threads
        self.auto_restart = auto_restart

        self._ctx = mp.get_context("spawn")
        self._ctx.set_executable(sys.executable)
        self._lock = threading.RLock()
        self._workers: list[_Worker] = []
        self._flags: Any = None
        self._job_id = 0
        self._broken: str | None = None  # why the running pool can no longer serve
        self._monitor: threading.Thread | None = None
        self._monitor_stop: tuple[mp_connection.Connection, mp_connection.Connection] | None = None
        self._finalizer = weakref.finalize(self, WorkerPool._kill_all, self._workers)
        self.starts = 0  # how many times workers were spawned (tests, metrics)

    # -- lifecycle --------------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return bool(self._workers) and self._broken is None

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def __enter__(self) -> "WorkerPool":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def start(self) -> None:
        """Spawn the workers and wait (bounded) until every rank is ready; cleans up on any failure."""
        with self._lock:
            if self._workers:
                if self._broken is None:
                    return
                self._teardown(graceful=False)
            self._flags = self._ctx.RawArray("d", self.world_size + 1)
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            ready_conns: list[mp_connection.Connection] = []
            try:
                for rank in range(self.world_size):
                    spec = _WorkerSpec(
                        rank, self.world_size, init_method, self.backend, self.device, self.parallel,
                        self.collective_timeout_s, self.num_threads, os.getpid(),
                        self.worker_init, self.init_args, self.init_kwargs,
                    )
                    parent_conn, child_conn = self._ctx.Pipe(duplex=True)
                    ready_r, ready_w = self._ctx.Pipe(duplex=False)
                    proc = self._ctx.Process(
                        target=_worker_main, args=(spec, child_conn, ready_w, self._flags),
                        name=f"sd-worker-{rank}", daemon=True,
                    )
                    proc.start()
                    child_conn.close()  # the child owns its end; EOF on ours when it dies
                    ready_w.close()
                    self._workers.append(_Worker(rank, proc, parent_conn))
                    ready_conns.append(ready_r)
                self._wait_ready(ready_conns)
            except BaseException:
                self._teardown(graceful=False)
                raise
            finally:
                for c in ready_conns:
                    c.close()
            self._broken = None
            self.starts += 1
            self._start_monitor()
            logger.info("worker pool up: %d ranks, pids %s", self.world_size, self.pids)

    def _wait_ready(self, ready_conns: list[mp_connection.Connection]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        pending = dict(enumerate(ready_conns))
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeoutError(
                    f"worker pool start-up timed out after {self.start_timeout_s:.0f} s (start_timeout_s); "
                    f"ranks not ready: {sorted(pending)}"
                )
            conn_rank = {c: r for r, c in pending.items()}
            sentinel_rank = {self._workers[r].process.sentinel: r for r in pending}
            ready = mp_connection.wait(list(conn_rank) + list(sentinel_rank), timeout=min(left, 1.0))
            for rank in sorted({conn_rank.get(obj, sentinel_rank.get(obj)) for obj in ready} - {None}):
                if rank not in pending:
                    continue
                conn = pending[rank]
                try:
                    # A dead worker may still have its error message in the pipe: read it before judging.
                    if not conn.poll():
                        raise EOFError
                    status, payload = _recv(conn)
                except (EOFError, OSError):
                    proc = self._workers[rank].process
                    _reap(proc)
                    raise WorkerDiedError(
                        f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode} during start-up"
                    ) from None
                if status != "ready":
                    raise WorkerPoolError(f"worker pool start-up failed: {payload}")
                del pending[rank]

    def _start_monitor(self) -> None:
        stop_r, stop_w = mp.Pipe(duplex=False)
        self._monitor_stop = (stop_r, stop_w)
        workers = list(self._workers)

        def monitor() -> None:
            sentinels = {w.process.sentinel: w for w in workers}
            while True:
                ready = mp_connection.wait(list(sentinels) + [stop_r])
                if stop_r in ready:
                    return
                dead = [sentinels[s] for s in ready if s in sentinels]
                for w in dead:
                    _reap(w.process)
                    why = f"worker rank {w.rank} (pid {w.process.pid}) exited with code {w.process.exitcode}"
                    if self._broken is None:
                        self._broken = why
                        logger.error("worker pool: %s; the pool will restart on the next call", why)
                return

        self._monitor = threading.Thread(target=monitor, name="sd-worker-pool-monitor", daemon=True)
        self._monitor.start()

    def _stop_monitor(self) -> None:
        if self._monitor_stop is not None:
            stop_r, stop_w = self._monitor_stop
            try:
                stop_w.send_bytes(b"x")
            except OSError:
                pass
            if self._monitor is not None and self._monitor is not threading.current_thread():
                self._monitor.join(timeout=5.0)
            stop_r.close()
            stop_w.close()
        self._monitor = None
        self._monitor_stop = None

    def _teardown(self, *, graceful: bool) -> None:
        """Stop every worker: ask politely if healthy, then SIGTERM, then SIGKILL; every wait bounded."""
        self._stop_monitor()
        workers, self._workers[:] = list(self._workers), []
        if graceful:
            for w in workers:
                try:
                    _send(w.conn, ("shutdown",))
                except (OSError, BrokenPipeError):
                    pass
            deadline = time.monotonic() + 10.0
            for w in workers:
                w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        WorkerPool._kill_all(workers)
        for w in workers:
            w.conn.close()
        self._broken = None
        self._flags = None

    @staticmethod
    def _kill_all(workers: list[_Worker]) -> None:
        alive = [w for w in workers if w.process.is_alive()]
        for w in alive:
            w.process.terminate()
        deadline = time.monotonic() + 5.0
        for w in alive:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in alive:
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5.0)

    def restart(self) -> None:
        """Tear the workers down (forcefully) and spawn fresh ones."""
        with self._lock:
            self._teardown(graceful=False)
            self.start()

    def shutdown(self) -> None:
        """Stop every worker; leaves no process behind. Idempotent."""
        with self._lock:
            if self._workers:
                self._teardown(graceful=self._broken is None)
            self._stop_monitor()

    def cancel(self) -> None:
        """Request cancellation of the running job (thread-safe; workers see it at their next should_stop)."""
        flags = self._flags
        if flags is not None:
            flags[0] = 1.0

    # -- jobs -------------------------------------------------------------------------------------------

    def run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``state.method(*args, **kwargs)`` on every rank; return rank 0's result."""
        return self.execute(method, args, kwargs, collect="rank0")

    def run_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Like :meth:`run` but returns every rank's result, in rank order."""
        return self.execute(method, args, kwargs, collect="all")

    def execute(
        self,
        method: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        collect: str = "rank0",
        timeout_s: float | None = None,
        cancel_check: Callable[[], bool] | None = None,
    ) -> Any:
        """Broadcast one job and wait for every rank (see the module docstring for the bounds).

        ``timeout_s`` caps the whole job; ``cancel_check`` is polled while waiting (e.g. Triton's
        ``request.is_cancelled``) and requests cancellation when it returns True.
        """
        if collect not in ("rank0", "all"):
            raise ValueError(f"collect must be 'rank0' or 'all', got {collect!r}")
        with self._lock:
            if self._broken is not None or not self._workers:
                if self.starts and not self.auto_restart:
                    raise WorkerPoolError(f"worker pool is down ({self._broken or 'torn down'}); call restart()")
                if self._workers:
                    self._teardown(graceful=False)
                self.start()
            self._job_id += 1
            job_id = self._job_id
            flags = self._flags
            flags[0] = 0.0
            now = time.monotonic()
            for r in range(self.world_size):
                flags[1 + r] = now
            msg = ("job", job_id, method, tuple(args), dict(kwargs or {}))
            try:
                payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:
                raise WorkerPoolError(f"arguments of {method!r} are not picklable: {e}") from e
            try:
                for w in self._workers:
                    w.conn.send_bytes(payload)
                replies = self._collect(job_id, method, timeout_s, cancel_check)
            except WorkerPoolError as e:
                if not isinstance(e, (WorkerJobError, JobCancelledError)) or self._broken is not None:
                    self._teardown(graceful=False)  # the next call respawns (auto_restart) or restart() does
                raise
            except BaseException:
                self._teardown(graceful=False)  # KeyboardInterrupt, broken pipe...: collective state unknown
                raise
        return replies[0] if collect == "rank0" else replies

    def _collect(
        self, job_id: int, method: str, timeout_s: float | None, cancel_check: Callable[[], bool] | None
    ) -> list[Any]:
        start = time.monotonic()
        replies: dict[int, tuple[str, Any]] = {}
        conns = {w.conn: w for w in self._workers}
        sentinels = {w.process.sentinel: w for w in self._workers}
        first_error_at: float | None = None
        while len(replies) < self.world_size:
            pending = [w for w in self._workers if w.rank not in replies]
            ready = mp_connection.wait([w.conn for w in pending] + list(sentinels), timeout=0.05)
            for obj in ready:
                w = conns.get(obj)
                if w is None or w.rank in replies:
                    continue
                try:
                    rid, status, payload = _recv(w.conn)
                except (EOFError, OSError):
                    continue  # the sentinel below reports the death
                if rid != job_id:
                    continue  # a late reply of an older job
                replies[w.rank] = (status, payload)
                if status != "ok" and first_error_at is None:
                    first_error_at = time.monotonic()
            dead = [sentinels[s] for s in ready if s in sentinels]
            if dead:
                for w in dead:
                    _reap(w.process)
                desc = ", ".join(f"rank {w.rank} (pid {w.process.pid}) exit code {w.process.exitcode}" for w in dead)
                self._broken = f"worker died: {desc}"
                raise WorkerDiedError(
                    f"job {method!r} failed: worker process died ({desc}); the pool is restarted on the next call"
                )
            now = time.monotonic()
            if cancel_check is not None and self._flags[0] == 0.0:
                try:
                    if cancel_check():
                        self._flags[0] = 1.0
                except Exception:  # noqa: BLE001 - a broken check must not kill the pool
                    logger.exception("cancel_check raised; ignoring")
            if len(replies) == self.world_size:
                break
            if timeout_s is not None and now - start > timeout_s:
                self._broken = "job timeout"
                raise WorkerTimeoutError(
                    f"job {method!r} timed out after {timeout_s:.1f} s (timeout_s); ranks without a reply: "
                    f"{sorted(set(range(self.world_size)) - set(replies))}; the pool is restarted"
                )
            if first_error_at is not None and now - first_error_at > min(self.step_timeout_s, 5.0):
                # Some ranks failed, the others are stuck waiting for them in a collective.
                self._broken = "ranks diverged"
                status, payload = next(v for v in replies.values() if v[0] != "ok")
                raise WorkerJobError(
                    f"job {method!r} failed on some ranks while others did not reply (pool restarted): "
                    f"{str(payload).splitlines()[0] if payload else status}",
                    str(payload),
                )
            stale = [
                w.rank for w in pending
                if w.rank not in replies and now - max(self._flags[1 + w.rank], start) > self.step_timeout_s
            ]
            if stale:
                self._broken = "step timeout"
                raise WorkerTimeoutError(
                    f"job {method!r} timed out: no progress from ranks {stale} for {self.step_timeout_s:.1f} s "
                    f"(step_timeout_s; a rank hung or stuck in a collective); the pool is restarted"
                )
        statuses = [replies[r][0] for r in range(self.world_size)]
        if all(s == "ok" for s in statuses):
            return [replies[r][1] for r in range(self.world_size)]
        if all(s == "cancelled" for s in statuses):
            raise JobCancelledError(f"job {method!r} was cancelled")
        errors = [(r, replies[r][1]) for r in range(self.world_size) if replies[r][0] == "error"]
        if len(set(statuses)) > 1:
            # Some ranks finished or cancelled while others failed: their collective sequences may differ.
            self._broken = "mixed replies"
        rank, tb = errors[0] if errors else (0, "")
        first_line = str(tb).splitlines()[0] if tb else "unknown error"
        raise WorkerJobError(f"job {method!r} failed on rank(s) {[r for r, _ in errors]}: {first_line}", str(tb))
