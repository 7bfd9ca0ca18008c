"""The per-request step channel between the streaming orchestrator and the denoiser."""

from __future__ import annotations

import pytest

from smart_diffusion_backend.errors import DenoiseCancelled
from smart_diffusion_backend.progress import StepChannel, StepReporter


def test_steps_arrive_in_order_and_cancel_reaches_the_reporter():
    with StepChannel() as channel:
        reporter = StepReporter(channel.address)
        reporter(1, 3)
        reporter(2, 3)
        assert channel.receive(1.0) == (1, 3)
        assert channel.receive(1.0) == (2, 3)
        assert channel.receive(0.01) is None
        assert channel.cancel()
        with pytest.raises(DenoiseCancelled, match="after step 3 of 3"):
            reporter(3, 3)
        reporter.close()


def test_reporter_survives_a_vanished_listener():
    channel = StepChannel()
    reporter = StepReporter(channel.address)
    channel.close()
    reporter(1, 2)  # no exception: progress is advisory, the request still completes
    reporter.close()


def test_reporter_rejects_foreign_addresses():
    with pytest.raises(ValueError, match="PROGRESS_CHANNEL"):
        StepReporter("/tmp/some-socket")
