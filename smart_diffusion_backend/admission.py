"""Admission for the entry models: a bounded wait, and no work on a request that cannot finish in time.

An entry model (smart_diffusion, smart_diffusion_stream) hands each request to an `Admission` the
moment Triton gives it over, so the arrival time is known exactly. A request then:

- is refused at once (UNAVAILABLE) when the queue already holds `max_queue_size` requests, when its
  predicted wait exceeds the system's `max_queue_delay_s`, or when its predicted completion lies past
  its own deadline (the request's `timeout` parameter, counted from its arrival);
- otherwise waits, FIFO, for one of `slots` pipeline slots (several requests in flight let the
  stages overlap: one encodes while another denoises);
- is refused when it reaches the head of the queue after its deadline or `max_queue_delay_s` has
  passed, or when the client has cancelled it: a request is never started only to be abandoned.
  A watchdog answers such requests while they wait, not only when a slot frees.

Predictions come from the server's own recent history: a request's cost as `a + b * work` (work = steps ×
pixels), fitted to the time between recent completions (CostModel). The first completion is not counted (a server's first
request pays lazy initialisation and is several times slower); until the second, nothing is predicted
and requests are admitted on the queue bounds alone. Triton-free and torch-free: the entry models' thin
adapters supply the callbacks.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import Refused

logger = logging.getLogger(__name__)

PIPELINE_SLOTS = 4  # requests an entry model runs at once: while one is denoising, others encode or decode


@dataclass
class Job:
    """One request as the admission sees it. `run` does the work and answers the client; `refuse`
    answers it with an error instead; `cancelled` polls the client's cancellation."""

    work: float  # steps x pixels (+1 step for encoding and decoding)
    run: Callable[[], None]
    refuse: Callable[[Refused], None]
    cancelled: Callable[[], bool] = lambda: False
    timeout_s: float | None = None  # the request's own deadline, from its arrival
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_s is None else self.arrived + self.timeout_s


class CostModel:
    """Seconds one request costs the server, as `a + b * work`, fitted by least squares (a, b >= 0) to the
    last WINDOW completions. A sample is the time since the previous completion while the server was busy
    (its throughput, whatever the overlap between slots), or a lone request's latency.

    Where the samples' work hardly varies, `b` cannot be told from `a`: the model then predicts their mean
    for any work, under-predicting larger requests. That is the safe side: an under-predicted request runs
    and stops at its deadline, an over-predicted one would be refused for nothing."""

    WINDOW = 32

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.WINDOW)
        self.completions = 0
        self._last_completion: float | None = None
        self._fit: tuple[float, float] | None = None

    def observe(self, job: Job, now: float) -> None:
        assert job.started is not None
        since = job.started if self._last_completion is None else max(job.started, self._last_completion)
        self._last_completion = now
        self.completions += 1
        if self.completions == 1:  # the warm-up request
            return
        self.samples.append((job.work, now - since))
        self._fit = self._least_squares()

    def _least_squares(self) -> tuple[float, float]:
        n = len(self.samples)
        mean_w = sum(w for w, _ in self.samples) / n
        mean_t = sum(t for _, t in self.samples) / n
        var_w = sum((w - mean_w) ** 2 for w, _ in self.samples)
        if var_w <= (0.05 * mean_w) ** 2 * n:  # work hardly varies: no slope to fit
            return mean_t, 0.0
        slope = sum((w - mean_w) * (t - mean_t) for w, t in self.samples) / var_w
        intercept = mean_t - slope * mean_w
        if slope < 0:
            return mean_t, 0.0
        if intercept < 0:  # through the origin
            return 0.0, sum(w * t for w, t in self.samples) / sum(w * w for w, _ in self.samples)
        return intercept, slope

    def seconds(self, work: float) -> float | None:
        if self._fit is None:
            return None
        intercept, slope = self._fit
        return intercept + slope * work


class Admission:
    """A FIFO of jobs waiting for `slots` worker threads, with the refusals described above."""

    WATCH_S = 0.05  # how often waiting jobs are checked for expiry and cancellation

    def __init__(
        self,
        name: str,
        slots: int,
        max_queue_size: int,
        max_queue_delay_s: float,
        on_waiting: Callable[[int], None] = lambda count: None,
    ) -> None:
        """`on_waiting(count)` hears every change of the number of waiting requests (a metrics gauge)."""
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        self.name, self.max_queue_size, self.max_queue_delay_s = name, max_queue_size, max_queue_delay_s
        self.on_waiting = on_waiting
        self.cost = CostModel()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running_jobs: dict[int, Job] = {}
        self._lock = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"{name}-slot{i}", daemon=True) for i in range(slots)
        ]
        self._threads.append(threading.Thread(target=self._watchdog, name=f"{name}-watchdog", daemon=True))
        for thread in self._threads:
            thread.start()

    # -- the client side ----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue `job` or raise Refused at once."""
        with self._lock:
            if self._closed:
                raise Refused(f"{self.name}: the server is shutting down")
            if self.max_queue_size and len(self._waiting) >= self.max_queue_size:
                raise Refused(f"{self.name}: {len(self._waiting)} requests are waiting, the queue's limit; retry later")
            self._check_predicted(job)
            self._waiting.append(job)
            self.on_waiting(len(self._waiting))
            self._lock.notify_all()

    def _check_predicted(self, job: Job) -> None:
        wait = self._backlog_seconds()
        if wait is None:
            return
        if self.max_queue_delay_s and wait > self.max_queue_delay_s:
            raise Refused(
                f"{self.name}: predicted wait {wait:.1f} s exceeds this server's max_queue_delay_s "
                f"{self.max_queue_delay_s:g}; retry later"
            )
        run = self.cost.seconds(job.work) or 0.0
        if job.timeout_s is not None and wait + run > job.timeout_s:
            raise Refused(
                f"{self.name}: predicted wait {wait:.1f} s + run {run:.1f} s exceeds the request's timeout "
                f"{job.timeout_s:g} s; refused without running it (retry later or allow more time)"
            )

    def _backlog_seconds(self) -> float | None:
        """Predicted time until a new arrival starts: everything waiting, and half of what runs (on average
        half done); None before the cost model has a sample."""
        if self.cost.seconds(0.0) is None:
            return None
        waiting = sum(self.cost.seconds(j.work) or 0.0 for j in self._waiting)
        running = sum(self.cost.seconds(j.work) or 0.0 for j in self._running_jobs.values())
        return waiting + 0.5 * running

    # -- the server side ----------------------------------------------------------------------

    def _expired(self, job: Job, now: float) -> Refused | None:
        if job.cancelled():
            return Refused(f"{self.name}: cancelled by the client while waiting")
        waited = now - job.arrived
        if job.deadline is not None and now >= job.deadline:
            return Refused(f"{self.name}: waited {waited:.1f} s in the queue, past the request's timeout {job.timeout_s:g} s")
        if self.max_queue_delay_s and waited > self.max_queue_delay_s:
            return Refused(
                f"{self.name}: waited {waited:.1f} s in the queue, past this server's max_queue_delay_s "
                f"{self.max_queue_delay_s:g}"
            )
        return None

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self.on_waiting(len(self._waiting))
                refusal = self._expired(job, time.monotonic())
                if refusal is None:
                    job.started = time.monotonic()
                    self._running_jobs[id(job)] = job
            if refusal is not None:
                self._answer(job.refuse, refusal)
                continue
            try:
                job.run()
            except Exception:  # noqa: BLE001 - run() answers its own errors; this is a bug, logged
                logger.exception("%s: a request's run raised", self.name)
            finally:
                with self._lock:
                    self._running_jobs.pop(id(job), None)
                    self.cost.observe(job, time.monotonic())

    def _watchdog(self) -> None:
        """Answers waiting jobs that expired or were cancelled, while they wait."""
        while True:
            with self._lock:
                if self._closed and not self._waiting:
                    return
                now = time.monotonic()
                expired = [(job, why) for job in self._waiting if (why := self._expired(job, now)) is not None]
                for job, _ in expired:
                    self._waiting.remove(job)
                if expired:
                    self.on_waiting(len(self._waiting))
                self._lock.wait(self.WATCH_S)
            for job, why in expired:
                self._answer(job.refuse, why)

    @staticmethod
    def _answer(refuse: Callable[[Refused], None], why: Refused) -> None:
        try:
            refuse(why)
        except Exception:  # noqa: BLE001 - a client that went away cannot be answered
            logger.warning("could not send a refusal", exc_info=True)

    def queued(self) -> int:
        with self._lock:
            return len(self._waiting)

    def close(self, timeout_s: float = 30.0) -> None:
        """Refuse what still waits, let running jobs finish (bounded), stop the threads."""
        with self._lock:
            self._closed = True
            leftover = list(self._waiting)
            self._waiting.clear()
            self.on_waiting(0)
            self._lock.notify_all()
        for job in leftover:
            self._answer(job.refuse, Refused(f"{self.name}: the server is shutting down"))
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
