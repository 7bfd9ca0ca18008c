"""OpenAI's error shape, and Triton's errors mapped onto it.

Every error the facade answers is `{"error": {"message", "type", "param", "code"}}` with an HTTP status, so
the official `openai` client raises its usual exception classes (BadRequestError, NotFoundError, ...) with
`.param` and `.code` set. Triton's message is kept as it is: it says why (the field and its allowed range,
a full queue, a passed deadline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from smart_diffusion_backend.wire import FIELDS

# Request tensor -> the OpenAI body field it came from: HEIGHT and WIDTH both come from "size", the edit's
# images from its multipart fields "image" and "mask"; the others from the field of their own name.
_RENAMED = {"height": "size", "width": "size", "input_image": "image", "mask_image": "mask"}
OPENAI_FIELD: dict[str, str] = {name: _RENAMED.get(f.attr, f.attr) for name, f in FIELDS.items()}

# gRPC status (tritonclient's "StatusCode.X", without the prefix) -> HTTP status
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,  # the admission refused it: queue full, predicted past its deadline, shutting down
    "DEADLINE_EXCEEDED": 504,  # our gRPC deadline passed
    "CANCELLED": 504,  # the server stopped a running request at its `timeout`
}

# A ParamError's message starts with the tensor it names: "STEPS: 0 is out of range; allowed [1, 50]", or
# a product of them: "HEIGHT*WIDTH: ... exceeds this server's max_pixels_per_request".
_FIELD_PREFIX = re.compile(r"^([A-Z][A-Z_]*(?:\*[A-Z][A-Z_]*)*): ")

# Decoupled (streaming) responses carry only a message, never a status code (Triton's gRPC
# ModelStreamInferResponse has `error_message` alone), so the code is recovered from what our models say:
# the admission's refusals (admission.py) and Triton's own queue-policy refusal are UNAVAILABLE.
_UNAVAILABLE = re.compile(
    r"retry later|Exceeds maximum queue size|shutting down|in the queue, past|cancelled by the client while waiting"
)
_CANCELLED = re.compile(r"cancelled|the denoiser stopped|timeout of .* exceeded", re.IGNORECASE)


@dataclass
class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def field_param(message: str) -> str | None:
    """The OpenAI field a Triton INVALID_ARG message names, or None."""
    match = _FIELD_PREFIX.match(message)
    if not match:
        return None
    params = [OPENAI_FIELD[name] for name in match.group(1).split("*") if name in OPENAI_FIELD]
    return params[0] if params else None


def stream_error_code(message: str) -> str:
    """The gRPC status name a streamed error message stands for (see _UNAVAILABLE)."""
    if field_param(message) is not None:
        return "INVALID_ARGUMENT"
    if _UNAVAILABLE.search(message):
        return "UNAVAILABLE"
    if _CANCELLED.search(message):
        return "CANCELLED"
    return "INTERNAL"


def triton_error(code: str, message: str) -> ApiError:
    """A Triton error (gRPC status name and message) -> the facade's answer."""
    status = HTTP_STATUS.get(code, 500)
    param = field_param(message) if status == 400 else None
    if param is not None and param != message.split(":", 1)[0].lower():
        # "WIDTH: 65 is not a multiple of 16" came from `size`: say so, keeping Triton's words.
        message = f"{message} (request field {param!r})"
    return ApiError(status, message, param, code.lower())


def from_exception(exc: BaseException) -> ApiError:
    """A tritonclient InferenceServerException or a grpc.RpcError -> ApiError."""
    if isinstance(exc, ApiError):
        return exc
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    if status is None and callable(getattr(exc, "code", None)):  # grpc.aio.AioRpcError (a broken stream)
        status = exc.code()
    message = exc.message() if callable(getattr(exc, "message", None)) else None
    if message is None and callable(getattr(exc, "details", None)):
        message = exc.details()
    message = message or str(exc)
    code = str(status).rsplit(".", 1)[-1] if status is not None else stream_error_code(message)
    return triton_error(code, message)
