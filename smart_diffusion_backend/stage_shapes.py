"""The exact shapes of the tensors between the stages, from the weights' own configs (torch-free).

The model's family reads its dimensions from the weights (``Family.wire_dims``, families/<name>/spec.py);
this module turns them into the shapes config.pbtxt declares and the checks every stage runs.

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

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .errors import ConfigError, ParamError
from .families import family
from .params import ModelParams, Range, SystemParams
from .wire import conditioning_rank


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
        try:
            wire_dims = family(model.family).wire_dims
        except ValueError as exc:
            raise ConfigError(f"no stage shapes: {exc}") from None
        try:
            dims = wire_dims(model.weights)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{model.weights}: config lacks a stage dimension ({exc!r})") from exc
        return cls(
            model=model,
            text_rows=2 if model.negative_prompt else 1,
            text_len=model.max_sequence_length,
            **asdict(dims),
        )

    # -- what config.pbtxt declares ------------------------------------------------------------

    def embeds_dims(self) -> list[int]:
        return [self.text_rows, self.text_len, self.text_dim]

    def pooled_dims(self) -> list[int]:
        return [self.text_rows, self.pooled_dim]

    def latent_dims(self) -> list[int]:
        batch = -1 if self.model.num_images.max > 1 else 1  # NUM_IMAGES images per request
        spatial = [-1, -1]
        return [batch, self.channels, -1, *spatial] if self.model.task == "video" else [batch, self.channels, *spatial]

    # -- checks on what a stage receives (shapes only: nothing is read) ---------------------------

    def check_embeddings(self, prompt_shape: Sequence[int], pooled_shape: Sequence[int]) -> None:
        _check_shape("PROMPT_EMBEDS", prompt_shape, self.embeds_dims())
        _check_shape("POOLED_PROMPT_EMBEDS", pooled_shape, self.pooled_dims())

    def check_conditioning(self, name: str, shape: Sequence[int], params: Any) -> None:
        """An image-conditioning tensor: zero-size (no image), else of the rank the wire declares, with
        no side larger than the request's latents could need (the family checks the exact shape)."""
        rank = conditioning_rank(name, self.model.task)
        shape = [int(d) for d in shape]
        if len(shape) != rank:
            raise ParamError(name, f"shape {shape}: expected {rank} dims")
        if 0 in shape:
            return
        if name == "IMAGE_EMBEDS":
            if shape[0] > self.text_rows or shape[1] > 4096 or shape[2] > 8192:
                raise ParamError(name, f"shape {shape} is larger than an image encoder's output")
            return
        latent_h = max(1, int(self.model.height.max) // self.spatial_scale)
        latent_w = max(1, int(self.model.width.max) // self.spatial_scale)
        if shape[0] > max(self.text_rows, int(self.model.num_images.max)) or shape[-2] > latent_h or shape[-1] > latent_w:
            raise ParamError(name, f"shape {shape} is larger than this model's latents (h <= {latent_h}, w <= {latent_w})")

    def check_latents(self, shape: Sequence[int], system: SystemParams) -> None:
        """LATENTS must be what the denoiser makes for a request within the model's and system's limits."""
        dims = self.latent_dims()
        _check_shape("LATENTS", shape, dims)
        model = self.model
        images = int(shape[0])
        if not 1 <= images <= model.num_images.max:
            raise ParamError("LATENTS", f"shape {list(shape)}: {images} images; allowed [1, {int(model.num_images.max)}]")
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
        pixels = height * width * frames * images
        if pixels > system.max_pixels_per_request:
            raise ParamError(
                "LATENTS",
                f"shape {list(shape)} decodes to {images}x{height}x{width}x{frames} = {pixels} pixels; "
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
