"""A per-request step channel between an orchestrator and the denoiser running its request.

The denoiser is a plain (non-decoupled) Triton model, so the ensemble and HTTP `infer` can use it;
per-step progress therefore cannot ride on its responses. Instead the streaming orchestrator opens a
channel, passes its address to the denoiser as the PROGRESS_CHANNEL input, and receives one datagram
per step while the BLS call is in flight. The same channel carries a cancel message back, so a
cancelled stream stops its denoiser within one step.

Linux abstract-namespace UNIX datagram sockets: local only, no file left behind, reliable delivery.
"""

from __future__ import annotations

import json
import os
import socket
import uuid

from .errors import DenoiseCancelled

_PREFIX = "smart-diffusion/"


_CANCEL = b"cancel"
_WAKE = b"wake"  # the channel to itself: end a receive() now (no denoiser sends it)


def _abstract(name: str) -> str:
    return "\0" + name


def _new_socket(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(_abstract(name))
    return sock


class StepChannel:
    """The orchestrator's end: receives (step, total) updates and can ask for cancellation."""

    def __init__(self) -> None:
        self.address = f"{_PREFIX}{os.getpid()}/{uuid.uuid4().hex}"
        self._sock = _new_socket(self.address)
        self._peer: str | None = None

    def receive(self, timeout_s: float) -> tuple[int, int] | None:
        """Next update, or None when nothing arrived within `timeout_s`."""
        self._sock.settimeout(timeout_s)
        try:
            data, peer = self._sock.recvfrom(256)
        except (TimeoutError, socket.timeout):
            return None
        if data == _WAKE:
            return None
        if peer:
            self._peer = peer if isinstance(peer, str) else peer.decode()
        message = json.loads(data)
        return int(message["step"]), int(message["total"])

    def cancel(self) -> bool:
        """Tell the denoiser to stop after its current step; False if it has not reported yet."""
        if self._peer is None:
            return False
        try:
            self._sock.sendto(_CANCEL, self._peer)
            return True
        except OSError:
            return False

    def wake(self) -> None:
        """Make a receive() waiting in another thread return None now instead of at its timeout."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waker:
            try:
                waker.sendto(_WAKE, _abstract(self.address))
            except OSError:
                pass  # the receiver still returns at its timeout

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "StepChannel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StepReporter:
    """The denoiser's end: a step callback that reports progress and raises when cancelled."""

    def __init__(self, channel_address: str) -> None:
        if not channel_address.startswith(_PREFIX):
            raise ValueError(f"PROGRESS_CHANNEL: {channel_address!r} is not a step channel address")
        self._target = _abstract(channel_address)
        self._sock = _new_socket(f"{_PREFIX}{os.getpid()}/{uuid.uuid4().hex}")
        self._sock.setblocking(False)

    def __call__(self, step: int, total: int) -> None:
        try:
            self._sock.sendto(json.dumps({"step": step, "total": total}).encode(), self._target)
        except OSError:
            pass  # the listener went away; the request itself still completes
        try:
            if self._sock.recv(16) == _CANCEL:
                raise DenoiseCancelled(f"cancelled by the client after step {step} of {total}")
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._sock.close()
