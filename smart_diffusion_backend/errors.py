"""Every exception the library raises on purpose, in one place (a leaf: imports nothing of ours).

How each reaches a client (triton_adapter.error_for):

| exception | raised when | Triton code |
|---|---|---|
| ParamError (ValueError) | a user param or stage tensor is missing, malformed or out of range | INVALID_ARG |
| ConfigError (ValueError) | a model or system yaml (or the weights' config) is malformed | fails the model load |
| GrantError (PermissionError) | a stage request without a valid grant: a direct call from outside | UNSUPPORTED |
| Refused | the admission will not run a request (busy, or its deadline cannot be met) | UNAVAILABLE |
| DenoiseCancelled | the client cancelled or the request's timeout passed, between two steps | CANCELLED |
| StageError | a stage called over BLS answered with an error (keeps that error's code) | the stage's |
| ServerError, UpgradeError | the tritonserver launcher / hot upgrade failed (operator tools, not requests) | — |
"""

from __future__ import annotations

from typing import Any


class ParamError(ValueError):
    """A user parameter that is missing, malformed or out of range; maps to Triton INVALID_ARG."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


class ConfigError(ValueError):
    """A model or system config file that is malformed; fails the model at load time."""


class GrantError(PermissionError):
    """A stage request without a valid grant: it did not come from this server's own models."""


class Refused(Exception):
    """A request the admission will not run: the reason is the client's error message (UNAVAILABLE)."""


class DenoiseCancelled(RuntimeError):
    """Raised by a step callback to stop a request between steps."""


class StageError(RuntimeError):
    """A stage called over BLS answered with an error; keeps its Triton error code."""

    def __init__(self, message: str, code: Any):
        super().__init__(message)
        self.message, self.code = message, code


class ServerError(RuntimeError):
    """tritonserver could not be started or did not become ready (serving.py)."""


class UpgradeError(RuntimeError):
    """A hot upgrade step failed or timed out (upgrade.py)."""
