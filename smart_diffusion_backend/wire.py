"""The wire schema: every tensor that crosses a process boundary, declared once (torch-free).

Request fields (user params), the stage tensors between the Triton models, and the outputs: their
Triton names, their Triton and numpy dtypes. params.py parses request fields with it, repository.py
writes config.pbtxt from it, the Triton adapter and the client encode tensors with it, and
tests/test_wire.py checks that the committed repository and the client agree with it.

    text_encoder: PROMPT, NEGATIVE_PROMPT, STATS            -> PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS, STATS
    denoiser:     PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS, user params, STATS, PROGRESS_CHANNEL -> LATENTS, STATS
    vae_decoder:  LATENTS, STATS                            -> IMAGE (or VIDEO), STATS
    entry models: PROMPT, NEGATIVE_PROMPT, user params     -> IMAGE (or VIDEO), STATS (+ STEP, TOTAL_STEPS streamed)

STATS is one JSON document that every stage extends (timings, seed, cache counters) and that carries
the stage grants (stage_guard.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import ParamError


@dataclass(frozen=True)
class WireDtype:
    triton: str  # the protocol's name: what tritonclient's InferInput takes
    numpy: type

    @property
    def config(self) -> str:
        """The config.pbtxt data_type."""
        return "TYPE_STRING" if self.triton == "BYTES" else f"TYPE_{self.triton}"


BYTES = WireDtype("BYTES", np.object_)
INT32 = WireDtype("INT32", np.int32)
INT64 = WireDtype("INT64", np.int64)
FP32 = WireDtype("FP32", np.float32)
UINT8 = WireDtype("UINT8", np.uint8)


@dataclass(frozen=True)
class RequestField:
    """One user param: its request tensor and the UserParams attribute it fills.

    `shape` is the tensor's declared dims ((1,) for a scalar; -1 = any size). `optional_feature`: fields a
    model takes only when its yaml lists them under `accepts:` (image conditioning, LoRA, several images)."""

    name: str
    attr: str
    dtype: WireDtype
    video_only: bool = False
    shape: tuple[int, ...] = (1,)
    optional_feature: bool = False

    @property
    def kind(self) -> str:
        """How params.py reads it: "bytes", "int" or "float"."""
        return {"BYTES": "bytes", "FP32": "float"}.get(self.dtype.triton, "int")

    @property
    def scalar(self) -> bool:
        return self.shape == (1,)

    def encode(self, value: Any) -> np.ndarray:
        """A Python value (a scalar, a sequence for list fields, an array for images) -> its request tensor."""
        if self.dtype is BYTES:
            items = [value] if self.scalar else list(value)
            return np.array([v.encode("utf-8") if isinstance(v, str) else v for v in items], dtype=np.object_)
        if self.scalar:
            return np.array([value], dtype=self.dtype.numpy)
        return np.ascontiguousarray(np.asarray(value, dtype=self.dtype.numpy))


REQUEST_FIELDS: tuple[RequestField, ...] = (
    RequestField("PROMPT", "prompt", BYTES),
    RequestField("NEGATIVE_PROMPT", "negative_prompt", BYTES),
    RequestField("HEIGHT", "height", INT32),
    RequestField("WIDTH", "width", INT32),
    RequestField("NUM_FRAMES", "num_frames", INT32, video_only=True),
    RequestField("STEPS", "steps", INT32),
    RequestField("GUIDANCE_SCALE", "guidance_scale", FP32),
    RequestField("CACHE_RATIO", "cache_ratio", FP32),
    RequestField("SEED", "seed", INT64),
    # Optional features (a model yaml's `accepts:`)
    RequestField("INPUT_IMAGE", "input_image", UINT8, shape=(-1, -1, 3), optional_feature=True),
    RequestField("MASK_IMAGE", "mask_image", UINT8, shape=(-1, -1), optional_feature=True),
    RequestField("STRENGTH", "strength", FP32, optional_feature=True),
    RequestField("LORA", "lora", BYTES, shape=(-1,), optional_feature=True),
    RequestField("LORA_SCALE", "lora_scale", FP32, shape=(-1,), optional_feature=True),
    RequestField("NUM_IMAGES", "num_images", INT32, optional_feature=True),
)
FIELDS: dict[str, RequestField] = {f.name: f for f in REQUEST_FIELDS}
TEXT_INPUTS = ("PROMPT", "NEGATIVE_PROMPT")
# What the encoder stage takes besides the texts when a model accepts image conditioning: the images, and
# the size, the frame count (video models: an image-to-video condition spans the video) and the seed (the
# image is resized to the request's size; VAE sampling draws from the seed).
IMAGE_INPUTS = ("INPUT_IMAGE", "MASK_IMAGE")
ENCODER_PARAM_INPUTS = ("HEIGHT", "WIDTH", "NUM_FRAMES", "SEED")

# Tensors between the stages and out of the pipeline (dims are per model: repository.py, stage_shapes.py)
EMBEDDING_TENSORS = ("PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS")
# The encoder's image conditioning for the denoiser (models that accept INPUT_IMAGE): zero-size when a
# request carries no image, so the ensemble always has every tensor. Their dims are the family's.
CONDITIONING_TENSORS = ("IMAGE_LATENTS", "MASK_LATENTS", "IMAGE_EMBEDS")
STAGE_TENSORS = (*EMBEDDING_TENSORS, *CONDITIONING_TENSORS, "LATENTS")  # may stay in GPU memory between stages
TENSOR_DTYPES: dict[str, WireDtype] = {
    "PROMPT_EMBEDS": FP32,
    "POOLED_PROMPT_EMBEDS": FP32,
    "LATENTS": FP32,
    "IMAGE_LATENTS": FP32,
    "MASK_LATENTS": FP32,
    "IMAGE_EMBEDS": FP32,
    "STATS": BYTES,
    "PROGRESS_CHANNEL": BYTES,
    "IMAGE": UINT8,
    "VIDEO": UINT8,
    "STEP": INT32,
    "TOTAL_STEPS": INT32,
}


def conditioning_rank(name: str, task: str) -> int:
    """Rank of a conditioning tensor: latents and masks have the latents' rank, image embeddings 3."""
    return 3 if name == "IMAGE_EMBEDS" else (5 if task == "video" else 4)


def request_field_names(task: str, accepts: tuple[str, ...] = ()) -> list[str]:
    """The request tensors a pipeline of this task ("image" or "video") accepts, in schema order:
    the base fields, and the optional features its model yaml lists under `accepts:`."""
    return [
        f.name
        for f in REQUEST_FIELDS
        if (task == "video" or not f.video_only) and (not f.optional_feature or f.name in accepts)
    ]


def encoder_input_names(task: str, accepts: tuple[str, ...] = ()) -> list[str]:
    """The user params the encoder stage takes: the texts, and with image conditioning the images, the
    size and the seed."""
    names = request_field_names(task, accepts)
    images = [n for n in IMAGE_INPUTS if n in names]
    return [n for n in names if n in TEXT_INPUTS or n in images or (images and n in ENCODER_PARAM_INPUTS)]


def denoiser_input_names(task: str, accepts: tuple[str, ...] = ()) -> list[str]:
    return [n for n in request_field_names(task, accepts) if n not in TEXT_INPUTS and n not in IMAGE_INPUTS]


def pixel_output(task: str) -> str:
    return "VIDEO" if task == "video" else "IMAGE"


def encode_request(values: Mapping[str, Any], names: list[str] | None = None) -> dict[str, np.ndarray]:
    """UserParams-style values by attribute name -> request tensors by Triton name: those set (not None, not
    an empty list) and, when `names` is given, among them."""

    def is_set(value: Any) -> bool:
        return value is not None and not (isinstance(value, (tuple, list)) and not value)

    return {
        f.name: f.encode(values[f.attr])
        for f in REQUEST_FIELDS
        if is_set(values.get(f.attr)) and (names is None or f.name in names)
    }


def progress_tensors(step: int, total: int) -> dict[str, np.ndarray]:
    """A streamed progress response."""
    return {"STEP": np.array([step], INT32.numpy), "TOTAL_STEPS": np.array([total], INT32.numpy)}


# --------------------------------------------------------------------------------------------
# STATS: one JSON document extended by every stage
# --------------------------------------------------------------------------------------------


def read_stats(inputs: Mapping[str, Any]) -> dict[str, Any]:
    raw = inputs.get("STATS")
    if raw is None:
        return {}
    item = np.asarray(raw).reshape(-1)
    if item.size != 1:
        raise ParamError("STATS", f"expected exactly one element, got {item.size}")
    try:
        stats = json.loads(bytes(item[0]).decode("utf-8") if not isinstance(item[0], str) else item[0])
    except (ValueError, TypeError) as exc:
        raise ParamError("STATS", f"is not a JSON object ({exc})") from None
    if not isinstance(stats, dict):
        raise ParamError("STATS", "is not a JSON object")
    return stats


def stats_tensor(stats: Mapping[str, Any]) -> np.ndarray:
    return np.array([json.dumps(stats, sort_keys=True).encode("utf-8")], dtype=np.object_)


def ms_since(started: float) -> float:
    """Milliseconds since a `time.perf_counter()` reading, as STATS reports them."""
    return round((time.perf_counter() - started) * 1000, 3)


def add_stage_time(stats: dict[str, Any], stage: str, started: float) -> dict[str, Any]:
    stats.setdefault("stages_ms", {})[stage] = ms_since(started)
    return stats
