"""Light helpers for the wire format between stages (no torch: orchestrator processes use them)."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

import numpy as np

from .params import ModelParams, ParamError, request_fields_for

TEXT_INPUTS = ("PROMPT", "NEGATIVE_PROMPT")
EMBEDDING_TENSORS = ("PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS")
STAGE_TENSORS = (*EMBEDDING_TENSORS, "LATENTS")  # may stay in GPU memory between the stages


def denoiser_inputs(model: ModelParams) -> list[str]:
    return [n for n in request_fields_for(model) if n not in TEXT_INPUTS]


def output_name(model: ModelParams) -> str:
    return "VIDEO" if model.task == "video" else "IMAGE"


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
