"""OpenAI request bodies -> our request tensors (client.api.Request, i.e. the wire schema).

One parsed job per HTTP request: the user params shared by its n images, the pipeline asked for, how many
images and whether to stream. Checks here are about the OpenAI shape (types, `size` syntax, `n`,
`response_format`); the ranges (multiples of 16, max steps, ...) are the server's to check, and its
INVALID_ARG comes back naming the field (errors.py).

`/v1/images/edits` (later, once the Triton models take image inputs) is one more parser here:
multipart fields -> their text fields coerced to JSON types and parsed by parse_generation, then
`dataclasses.replace(job, extra_tensors=...)` with the image tensors; generation, streaming, errors and
encoding are shared.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from client.api import Request
from smart_diffusion_backend.params import SEED_MAX
from smart_diffusion_backend.wire import FIELDS

from .errors import bad_request

_SIZE = re.compile(r"^([0-9]{1,6})x([0-9]{1,6})$")

# OpenAI fields we accept and ignore: they steer GPT-image features this server does not have
# (quality tiers, moderation, partial images, compression), and clients send some of them by default.
IGNORED_FIELDS = frozenset(
    {
        "quality",
        "style",
        "background",
        "moderation",
        "user",
        "safety_identifier",
        "output_compression",
        "partial_images",
    }
)
# Our fields beyond OpenAI's: name -> (JSON type, Request attribute)
EXTRA_FIELDS: dict[str, tuple[type, str]] = {
    "negative_prompt": (str, "negative_prompt"),
    "steps": (int, "steps"),
    "guidance_scale": (float, "guidance_scale"),
    "cache_ratio": (float, "cache_ratio"),
    "num_frames": (int, "num_frames"),
}
KNOWN_FIELDS = (
    frozenset({"prompt", "model", "n", "size", "response_format", "output_format", "seed", "stream", *EXTRA_FIELDS})
    | IGNORED_FIELDS
)

Tensors = dict[str, tuple[np.ndarray, str]]  # Triton input name -> (array, Triton dtype)


@dataclass(frozen=True)
class GenerationJob:
    """What one HTTP request asks for: `n` images of `request`, image i with seed `seed + i`."""

    request: Request  # user params; request.seed is the first image's seed (always set)
    model: str | None  # the pipeline asked for; None = the served default
    n: int = 1
    stream: bool = False
    extra_tensors: Tensors = field(default_factory=dict)  # e.g. an input image, for edits

    def seeds(self) -> list[int]:
        assert self.request.seed is not None
        return [self.request.seed + i for i in range(self.n)]

    def tensors(self, index: int) -> Tensors:
        """Image `index`'s request tensors."""
        return {**replace(self.request, seed=self.seeds()[index]).tensors(), **self.extra_tensors}


def parse_size(value: Any) -> tuple[int | None, int | None]:
    """OpenAI's "WIDTHxHEIGHT" -> (height, width); None or "auto" -> the model's default size."""
    if value is None or value == "auto":
        return None, None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise bad_request(
            "size", f"size: {value!r} is not WIDTHxHEIGHT with positive integers, e.g. '64x64' (or 'auto')"
        )
    width, height = int(match.group(1)), int(match.group(2))
    return height, width


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
_ATTR_DTYPES = {f.attr: np.dtype(f.dtype.numpy) for f in FIELDS.values()}


def _typed(name: str, value: Any, kind: type, attr: str | None = None) -> Any:
    """A JSON value of the expected type (ints pass as numbers; bools never do). Integers must fit their
    tensor's dtype: numpy would otherwise wrap 2**32 + 2 steps to 2."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise bad_request(name, f"{name}: expected {_TYPE_NAMES[kind]}, got {value!r}")
    if kind is int and attr in _ATTR_DTYPES:
        info = np.iinfo(_ATTR_DTYPES[attr])
        if not info.min <= value <= info.max:
            raise bad_request(name, f"{name}: {value} does not fit the server's {_ATTR_DTYPES[attr]} field")
    return float(value) if kind is float else value


def parse_generation(body: Any, max_n: int) -> GenerationJob:
    """A /v1/images/generations JSON body -> GenerationJob, or ApiError 400 naming the field."""
    if not isinstance(body, Mapping):
        raise bad_request(None, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise bad_request(
            unknown[0],
            f"{unknown[0]}: unknown field; accepted: {', '.join(sorted(KNOWN_FIELDS - IGNORED_FIELDS))}",
            code="unknown_parameter",
        )
    if "prompt" not in body:
        raise bad_request("prompt", "prompt: is required")
    prompt = _typed("prompt", body["prompt"], str)

    model = body.get("model")
    if model is not None:
        model = _typed("model", model, str)

    n = 1 if body.get("n") is None else _typed("n", body["n"], int)
    if not 1 <= n <= max_n:
        raise bad_request("n", f"n: {n} is out of range; allowed [1, {max_n}]")

    response_format = body.get("response_format")
    if response_format == "url":
        raise bad_request(
            "response_format",
            "response_format: 'url' is not supported: this server keeps no files; use 'b64_json'",
            code="unsupported_value",
        )
    if response_format not in (None, "b64_json"):
        raise bad_request("response_format", f"response_format: {response_format!r} is not supported; use 'b64_json'")
    if body.get("output_format") not in (None, "png"):
        raise bad_request(
            "output_format",
            f"output_format: {body['output_format']!r} is not supported; this server returns 'png'",
            code="unsupported_value",
        )

    stream = False if body.get("stream") is None else _typed("stream", body["stream"], bool)
    height, width = parse_size(body.get("size"))

    if body.get("seed") is None:
        seed = secrets.randbelow(SEED_MAX - max_n + 2)  # drawn once; image i gets seed + i, all in range
    else:
        seed = _typed("seed", body["seed"], int)
        if not 0 <= seed <= SEED_MAX - (n - 1):
            raise bad_request("seed", f"seed: {seed} is out of range for n={n}; allowed [0, {SEED_MAX - (n - 1)}]")

    extras = {
        attr: _typed(name, body[name], kind, attr)
        for name, (kind, attr) in EXTRA_FIELDS.items()
        if body.get(name) is not None
    }
    request = Request(prompt=prompt, height=height, width=width, seed=seed, **extras)
    return GenerationJob(request=request, model=model, n=n, stream=stream)
