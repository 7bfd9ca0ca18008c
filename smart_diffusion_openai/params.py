"""OpenAI request bodies -> our request tensors (smart_diffusion_client.api.Request, i.e. the wire schema).

One parsed job per HTTP request: the user params shared by its n images, the pipeline asked for, how many
images and whether to stream. Checks here are about the OpenAI shape (types, `size` syntax, `n`,
`response_format`); the ranges (multiples of 16, max steps, ...) are the server's to check, and its
INVALID_ARG comes back naming the field (errors.py).

/v1/images/generations is a JSON body (parse_generation). /v1/images/edits is multipart/form-data: its text
fields are coerced to the JSON types (form_body: "3" -> 3, "true" -> True) and parsed by the same
parse_generation, with `strength` beside our other extra fields (parse_edit); the decoded image and mask
(uploads.py) then go into the job's Request (with_images). Generation, streaming, errors and encoding are
shared.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from smart_diffusion_backend.params import SEED_MAX
from smart_diffusion_backend.wire import FIELDS
from smart_diffusion_client.api import Request

from .errors import ApiError, bad_request

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
# The OpenAI fields both endpoints take, and their JSON types (form_body coerces multipart text to them)
OPENAI_FIELDS: dict[str, type] = {
    "prompt": str,
    "model": str,
    "n": int,
    "size": str,
    "response_format": str,
    "output_format": str,
    "seed": int,
    "stream": bool,
}
KNOWN_FIELDS = frozenset({*OPENAI_FIELDS, *EXTRA_FIELDS}) | IGNORED_FIELDS

# /v1/images/edits: also STRENGTH (image-to-image and inpainting: how far into the noise the image goes),
# and OpenAI's `input_fidelity` (how closely GPT-image follows the input) is accepted and ignored as well.
EDIT_EXTRA_FIELDS: dict[str, tuple[type, str]] = {**EXTRA_FIELDS, "strength": (float, "strength")}
EDIT_IGNORED_FIELDS = IGNORED_FIELDS | {"input_fidelity"}

Tensors = dict[str, tuple[np.ndarray, str]]  # Triton input name -> (array, Triton dtype)


@dataclass(frozen=True)
class GenerationJob:
    """What one HTTP request asks for: `n` images of `request`, image i with seed `seed + i`."""

    request: Request  # user params (an edit's image and mask too); request.seed is the first image's seed
    model: str | None  # the pipeline asked for; None = the served default
    n: int = 1
    stream: bool = False

    def seeds(self) -> list[int]:
        assert self.request.seed is not None
        return [self.request.seed + i for i in range(self.n)]

    def tensors(self, index: int) -> Tensors:
        """Image `index`'s request tensors."""
        return replace(self.request, seed=self.seeds()[index]).tensors()

    def sized(self, height: int | None, width: int | None) -> "GenerationJob":
        return replace(self, request=replace(self.request, height=height, width=width))


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


def unknown_field(name: str, accepted: frozenset[str]) -> ApiError:
    """A field we do not know: refused, so that a typo ("step" for "steps") does not pass silently."""
    return bad_request(
        name, f"{name}: unknown field; accepted: {', '.join(sorted(accepted))}", code="unknown_parameter"
    )


def parse_generation(
    body: Any,
    max_n: int,
    extra_fields: Mapping[str, tuple[type, str]] = EXTRA_FIELDS,
    ignored_fields: frozenset[str] = IGNORED_FIELDS,
    also_known: frozenset[str] = frozenset(),
) -> GenerationJob:
    """A /v1/images/generations JSON body -> GenerationJob, or ApiError 400 naming the field. The edits
    endpoint passes its own extra and ignored fields, and its file fields as `also_known` (named among the
    accepted ones in the unknown-field message)."""
    if not isinstance(body, Mapping):
        raise bad_request(None, "the request body must be a JSON object")
    known = frozenset({*OPENAI_FIELDS, *extra_fields}) | ignored_fields
    unknown = sorted(set(body) - known)
    if unknown:
        raise unknown_field(unknown[0], (known - ignored_fields) | also_known)
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
        for name, (kind, attr) in extra_fields.items()
        if body.get(name) is not None
    }
    request = Request(prompt=prompt, height=height, width=width, seed=seed, **extras)
    return GenerationJob(request=request, model=model, n=n, stream=stream)


# -- /v1/images/edits ---------------------------------------------------------------------------------

# The multipart file fields: the image (OpenAI's client sends `image`, or `image[]` for a list) and the mask
IMAGE_FIELDS = ("image", "image[]")
MASK_FIELD = "mask"
FILE_FIELDS = frozenset({*IMAGE_FIELDS, MASK_FIELD})
EDIT_TEXT_FIELDS = frozenset({*OPENAI_FIELDS, *EDIT_EXTRA_FIELDS}) | EDIT_IGNORED_FIELDS
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


def _form_value(name: str, text: str, kind: type) -> Any:
    """One multipart text field as its JSON type, or ApiError 400 naming it."""
    if kind is str:
        return text
    value = text.strip()
    if kind is bool:
        if value.lower() in _BOOLEANS:
            return _BOOLEANS[value.lower()]
    elif kind is int:
        if _INTEGER.match(value):
            return int(value)
    else:
        try:
            return float(value)  # "nan" and "inf" pass: the server refuses them naming the field
        except ValueError:
            pass
    raise bad_request(name, f"{name}: expected {_TYPE_NAMES[kind]}, got {text!r}")


# The file fields, as the unknown-field message names them
_EDIT_FILES = frozenset({"image", MASK_FIELD})


def edit_unknown_field(name: str) -> ApiError:
    return unknown_field(name, (EDIT_TEXT_FIELDS - EDIT_IGNORED_FIELDS) | _EDIT_FILES)


def form_body(fields: Mapping[str, str], extra_fields: Mapping[str, tuple[type, str]] = EDIT_EXTRA_FIELDS) -> dict:
    """Multipart text fields -> the JSON body parse_generation reads. Multipart carries only text, so each
    value is parsed as its field's JSON type; an empty value is an absent one (the openai client sends a
    None in extra_body as ""), except `prompt`, which the server refuses empty. Unknown and ignored fields
    stay strings (parse_generation names an unknown one)."""
    types = {**OPENAI_FIELDS, **{name: kind for name, (kind, _) in extra_fields.items()}}
    body: dict[str, Any] = {}
    for name, text in fields.items():
        if text == "" and name != "prompt":
            continue
        body[name] = _form_value(name, text, types.get(name, str))
    return body


def parse_edit(fields: Mapping[str, str], max_n: int) -> GenerationJob:
    """A /v1/images/edits form's text fields -> GenerationJob without its images (with_images adds them),
    or ApiError 400 naming the field. `size` absent or "auto" leaves HEIGHT and WIDTH unset: the caller
    picks them from the image (auto_sizes)."""
    return parse_generation(form_body(fields), max_n, EDIT_EXTRA_FIELDS, EDIT_IGNORED_FIELDS, _EDIT_FILES)


def with_images(job: GenerationJob, image: np.ndarray, mask: np.ndarray | None) -> GenerationJob:
    """The job with its INPUT_IMAGE (uint8 [H, W, 3]) and MASK_IMAGE (uint8 [H, W], 255 = repaint)."""
    return replace(job, request=replace(job.request, input_image=image, mask_image=mask))


# Every served family's size_multiple (VAE 8x down, 2x2 patches): an image's own size is rounded down to it
AUTO_SIZE_MULTIPLE = 16


def auto_sizes(job: GenerationJob, image_shape: tuple[int, ...]) -> list[GenerationJob]:
    """An edit without `size`: the jobs to try in turn. First the image's own size, rounded down to
    multiples of 16 (as Kontext rounds its reference); the model itself says whether it allows it (its
    height/width limits, the server's max pixels), and when it refuses that size, its default size."""
    height, width = (side - side % AUTO_SIZE_MULTIPLE for side in image_shape[:2])
    default = job.sized(None, None)
    if min(height, width) < AUTO_SIZE_MULTIPLE:
        return [default]
    return [job.sized(height, width), default]
