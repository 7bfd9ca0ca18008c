"""The exact shapes of the tensors between the stages, from the weights' own configs (torch-free).

Every stage checks what it receives against these before it touches the data: a tensor of the wrong
rank, width or size is refused by its shape alone (INVALID_ARG naming the field), never decoded or
fed to a transformer. The repository generator writes the fixed dimensions into config.pbtxt, so
Triton itself refuses a mismatching tensor before it reaches the model's process.

    PROMPT_EMBEDS        [rows, text_len, text_dim]   rows: 1, or 2 with a negative prompt (CFG)
    POOLED_PROMPT_EMBEDS [rows, pooled_dim]           pooled_dim 0 for families without one
    LATENTS              [1, channels, h, w]           image: h = HEIGHT / spatial_scale
                         [1, channels, f, h, w]        video: f = (NUM_FRAMES - 1) / temporal_scale + 1
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError, ParamError
from .params import ModelParams, Range, SystemParams


def _read_config(weights: Path, component: str) -> dict[str, Any]:
    path = Path(weights) / component / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _flux_dims(weights: Path) -> dict[str, int | None]:
    transformer, vae = _read_config(weights, "transformer"), _read_config(weights, "vae")
    return {
        "text_dim": int(transformer["joint_attention_dim"]),
        "pooled_dim": int(transformer["pooled_projection_dim"]),
        "channels": int(vae["latent_channels"]),
        "spatial_scale": 2 ** (len(vae["block_out_channels"]) - 1),  # as FluxPipeline.__init__
        "temporal_scale": None,
    }


def _wan_dims(weights: Path) -> dict[str, int | None]:
    transformer, vae = _read_config(weights, "transformer"), _read_config(weights, "vae")
    return {
        "text_dim": int(transformer["text_dim"]),
        "pooled_dim": 0,
        "channels": int(vae["z_dim"]),
        # AutoencoderKLWan's defaults, for configs written before these keys existed
        "spatial_scale": int(vae.get("scale_factor_spatial", 8)),
        "temporal_scale": int(vae.get("scale_factor_temporal", 4)),
    }


_FAMILY_DIMS: dict[str, Callable[[Path], dict[str, int | None]]] = {"flux": _flux_dims, "wan": _wan_dims}


@dataclass(frozen=True)
class StageShapes:
    model: ModelParams
    text_rows: int
    text_len: int
    text_dim: int
    pooled_dim: int
    channels: int
    spatial_scale: int
    temporal_scale: int | None

    @classmethod
    def load(cls, model: ModelParams) -> "StageShapes":
        if model.family not in _FAMILY_DIMS:
            raise ConfigError(f"no stage shapes for family {model.family!r}; known: {sorted(_FAMILY_DIMS)}")
        try:
            dims = _FAMILY_DIMS[model.family](model.weights)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{model.weights}: config lacks a stage dimension ({exc!r})") from exc
        return cls(
            model=model,
            text_rows=2 if model.negative_prompt else 1,
            text_len=model.max_sequence_length,
            **dims,  # type: ignore[arg-type]
        )

    # -- what config.pbtxt declares ------------------------------------------------------------

    def embeds_dims(self) -> list[int]:
        return [self.text_rows, self.text_len, self.text_dim]

    def pooled_dims(self) -> list[int]:
        return [self.text_rows, self.pooled_dim]

    def latent_dims(self) -> list[int]:
        spatial = [-1, -1]
        return [1, self.channels, -1, *spatial] if self.model.task == "video" else [1, self.channels, *spatial]

    # -- checks on what a stage receives (shapes only: nothing is read) ---------------------------

    def check_embeddings(self, prompt_shape: Sequence[int], pooled_shape: Sequence[int]) -> None:
        _check_shape("PROMPT_EMBEDS", prompt_shape, self.embeds_dims())
        _check_shape("POOLED_PROMPT_EMBEDS", pooled_shape, self.pooled_dims())

    def check_latents(self, shape: Sequence[int], system: SystemParams) -> None:
        """LATENTS must be what the denoiser makes for a request within the model's and system's limits."""
        dims = self.latent_dims()
        _check_shape("LATENTS", shape, dims)
        model = self.model
        height, width = shape[-2] * self.spatial_scale, shape[-1] * self.spatial_scale
        latent_multiple = max(1, model.size_multiple // self.spatial_scale)
        for axis, size, pixels, allowed in (("h", shape[-2], height, model.height), ("w", shape[-1], width, model.width)):
            if not (allowed.min <= pixels <= allowed.max) or size % latent_multiple:
                raise ParamError(
                    "LATENTS",
                    f"shape {list(shape)}: {axis}={size} decodes to {pixels} pixels; allowed multiples of "
                    f"{latent_multiple} in {_latent_range(allowed, self.spatial_scale)}",
                )
        frames = 1
        if model.task == "video":
            assert self.temporal_scale is not None and model.num_frames is not None
            frames = (shape[2] - 1) * self.temporal_scale + 1
            if not (model.num_frames.min <= frames <= model.num_frames.max):
                lo = (int(model.num_frames.min) - 1) // self.temporal_scale + 1
                hi = (int(model.num_frames.max) - 1) // self.temporal_scale + 1
                raise ParamError("LATENTS", f"shape {list(shape)}: {shape[2]} latent frames; allowed [{lo}, {hi}]")
        if height * width * frames > system.max_pixels_per_request:
            raise ParamError(
                "LATENTS",
                f"shape {list(shape)} decodes to {height}x{width}x{frames} = {height * width * frames} pixels; "
                f"this server's max_pixels_per_request is {system.max_pixels_per_request}",
            )


def _latent_range(allowed: Range, scale: int) -> str:
    return f"[{int(allowed.min) // scale}, {int(allowed.max) // scale}]"


def _check_shape(name: str, shape: Sequence[int], expected: list[int]) -> None:
    """`expected` dims of -1 take any size; the rest must match exactly."""
    shape = [int(d) for d in shape]
    if len(shape) != len(expected) or any(e != -1 and s != e for s, e in zip(shape, expected)):
        wanted = ", ".join("*" if e == -1 else str(e) for e in expected)
        raise ParamError(name, f"shape {shape} does not match this model's [{wanted}]")
