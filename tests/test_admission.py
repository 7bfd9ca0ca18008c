"""The entry models' admission (smart_diffusion_backend/admission.py), without a server: bounded queue,
predicted refusals, expiry while waiting, cancellation, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from smart_diffusion_backend.admission import Admission, Job
from smart_diffusion_backend.errors import Refused


class Recorder:
    """Jobs whose run blocks until released; records what ran and what was refused, with when."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.refused: dict[str, tuple[str, float]] = {}
        self.release = threading.Event()
        self.lock = threading.Lock()

    def job(self, name: str, work: float = 1.0, timeout_s: float | None = None, hold: bool = True, **kw) -> Job:
        def run() -> None:
            with self.lock:
                self.ran.append(name)
            if hold:
                self.release.wait(10)

        def refuse(why: Refused) -> None:
            with self.lock:
                self.refused[name] = (str(why), time.monotonic())

        return Job(work=work, run=run, refuse=refuse, timeout_s=timeout_s, **kw)


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_full_queue_refuses_at_once_and_slots_run_fifo():
    rec = Recorder()
    admission = Admission("m", slots=2, max_queue_size=2, max_queue_delay_s=0)
    try:
        for name in "ab":
            admission.submit(rec.job(name))
        wait_until(lambda: sorted(rec.ran) == ["a", "b"])
        for name in "cd":
            admission.submit(rec.job(name))
        assert admission.queued() == 2
        with pytest.raises(Refused, match="2 requests are waiting, the queue's limit"):
            admission.submit(rec.job("e"))
        rec.release.set()
        wait_until(lambda: sorted(rec.ran) == ["a", "b", "c", "d"])
        assert not rec.refused
    finally:
        rec.release.set()
        admission.close()


def test_a_waiting_request_is_refused_at_its_deadline_and_never_runs():
    rec = Recorder()
    admission = Admission("m", slots=1, max_queue_size=0, max_queue_delay_s=0)
    try:
        admission.submit(rec.job("busy"))
        wait_until(lambda: rec.ran == ["busy"])
        job = rec.job("late", timeout_s=0.3)
        admission.submit(job)
        wait_until(lambda: "late" in rec.refused)
        message, when = rec.refused["late"]
        assert "past the request's timeout 0.3 s" in message
        assert 0.3 <= when - job.arrived < 0.5  # answered while waiting, by the watchdog
        rec.release.set()
        admission.close()
        assert "late" not in rec.ran
    finally:
        rec.release.set()
        admission.close()


def test_max_queue_delay_bounds_the_wait_and_cancelled_requests_leave_the_queue():
    rec = Recorder()
    admission = Admission("m", slots=1, max_queue_size=0, max_queue_delay_s=0.3)
    cancelled = threading.Event()
    try:
        admission.submit(rec.job("busy"))
        wait_until(lambda: rec.ran == ["busy"])
        admission.submit(rec.job("slow-queue"))
        admission.submit(rec.job("gone", cancelled=cancelled.is_set))
        cancelled.set()
        wait_until(lambda: "gone" in rec.refused and "slow-queue" in rec.refused)
        assert "cancelled by the client while waiting" in rec.refused["gone"][0]
        assert "past this server's max_queue_delay_s 0.3" in rec.refused["slow-queue"][0]
    finally:
        rec.release.set()
        admission.close()
    assert rec.ran == ["busy"]


def test_predictions_refuse_at_once_what_cannot_finish_in_time():
    rec = Recorder()
    admission = Admission("m", slots=1, max_queue_size=0, max_queue_delay_s=5.0)
    try:
        # Learn the cost: 0.2 s for 10 units of work, 0.4 s for 20 -> 0.02 s per unit (the first request is a
        # warm-up that is not counted: it takes 2 s here).
        timed = Recorder()
        for done, (work, seconds) in enumerate([(10, 2.0), (10, 0.2), (20, 0.4)], start=1):
            job = timed.job("learn", work=work, hold=False)
            job.run = lambda seconds=seconds: time.sleep(seconds)
            admission.submit(job)
            wait_until(lambda: admission.cost.completions == done, timeout_s=10)
        assert admission.cost.seconds(10) == pytest.approx(0.2, rel=0.3)
        assert admission.cost.seconds(100) == pytest.approx(2.0, rel=0.3)
        # 100 units ahead (~2 s): a request allowing 1 s is refused at once, one allowing 30 s waits.
        admission.submit(rec.job("busy", work=100))
        wait_until(lambda: rec.ran == ["busy"])
        admission.submit(rec.job("queued", work=100))
        with pytest.raises(Refused, match=r"predicted wait .* exceeds the request's timeout 1 s"):
            admission.submit(rec.job("hurried", work=10, timeout_s=1.0))
        admission.submit(rec.job("patient", work=10, timeout_s=30.0))
        # 1000 more units (~20 s) would push the wait past max_queue_delay_s.
        admission.submit(rec.job("huge", work=1000))
        with pytest.raises(Refused, match="exceeds this server's max_queue_delay_s 5"):
            admission.submit(rec.job("after-huge"))
    finally:
        rec.release.set()
        admission.close()


def test_close_refuses_what_waits_and_new_requests():
    rec = Recorder()
    admission = Admission("m", slots=1, max_queue_size=0, max_queue_delay_s=0)
    admission.submit(rec.job("busy"))
    wait_until(lambda: rec.ran == ["busy"])
    admission.submit(rec.job("waiting"))
    threading.Timer(0.2, rec.release.set).start()
    admission.close()
    assert "shutting down" in rec.refused["waiting"][0]
    with pytest.raises(Refused, match="shutting down"):
        admission.submit(rec.job("new"))


def test_cost_model_without_a_slope_under_predicts_larger_requests():
    """Only small requests seen: a large one is predicted at their mean time (it may then run and stop at its
    deadline), never extrapolated into a refusal; with two sizes seen, the slope is fitted."""
    from smart_diffusion_backend.admission import CostModel

    cost = CostModel()

    def complete(work: float, seconds: float, at: float) -> None:
        job = Job(work=work, run=lambda: None, refuse=lambda why: None)
        job.started = at - seconds
        cost.observe(job, at)

    complete(1, 5.0, 100.0)  # warm-up: not counted
    assert cost.seconds(1) is None
    for i in range(5):
        complete(1000, 0.5, 200.0 + 10 * i)
    assert cost.seconds(1_000_000) == pytest.approx(0.5)
    for i in range(5):
        complete(3000, 1.5, 300.0 + 10 * i)
    assert cost.seconds(2000) == pytest.approx(1.0, rel=0.01)
    assert cost.seconds(0) == pytest.approx(0.0, abs=0.01)
