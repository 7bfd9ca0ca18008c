"""Stage services: tensors in, tensors out — what each Triton model.py wraps.

User params and STATS travel as numpy arrays. The stage tensors (embeddings, latents) leave a service as
float32 torch tensors and may come in as numpy arrays or torch tensors on any device. With one GPU rank
(`SystemParams.stage_tensors_on_gpu`) they stay on the GPU from the text encoder to the VAE decoder
(Triton relays them through CUDA IPC, bench/bls_relay.py); otherwise they are in host memory. The
pixels leave as a uint8 numpy array.

Each service owns one stage of one model family, validates the request tensors it receives
(raising ParamError, a ValueError, for anything a user sent wrong), runs the stage and returns the
output tensors by name. The STATS tensor (JSON) travels through the stages and each appends its
own timing, so the ensemble and the BLS orchestrator report the same thing.

Wire tensors (names are the Triton model inputs/outputs):
    text_encoder: PROMPT, NEGATIVE_PROMPT            -> PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS, STATS
    denoiser:     PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS,
                  HEIGHT, WIDTH, [NUM_FRAMES], STEPS,
                  GUIDANCE_SCALE, CACHE_RATIO, SEED, STATS -> LATENTS, STATS
    vae_decoder:  LATENTS, STATS                     -> IMAGE (or VIDEO), STATS
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .errors import DenoiseCancelled, ParamError
from .families import Embeddings, load_stage
from .params import ModelParams, SystemParams, UserParams, parse_user_params
from .progress import StepReporter
from .stage_shapes import StageShapes
from .wire import (
    CONDITIONING_TENSORS,
    add_stage_time,
    conditioning_rank,
    denoiser_input_names,
    encoder_input_names,
    pixel_output,
    read_stats,
    stats_tensor,
)


def load_params(model_name: str, system_name: str) -> tuple[ModelParams, SystemParams]:
    model = ModelParams.load(model_name)
    system = SystemParams.load(system_name)
    if system.torch_threads:
        torch.set_num_threads(system.torch_threads)
    return model, system


def _stage_input(inputs: Mapping[str, Any], name: str) -> np.ndarray | torch.Tensor:
    """A stage tensor as it arrived (numpy, or torch on any device), its dtype checked: float32."""
    if name not in inputs:
        raise ParamError(name, "is required")
    value = inputs[name]
    if not isinstance(value, torch.Tensor):
        value = np.asarray(value)  # checked before torch sees it: torch cannot hold every numpy dtype
    is_float32 = value.dtype == (torch.float32 if isinstance(value, torch.Tensor) else np.float32)
    if not is_float32:
        raise ParamError(name, f"expected FP32, got {value.dtype} shape {list(value.shape)}")
    return value


def _finite_tensor(name: str, value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The stage tensor as torch (no copy), refused if any value is NaN or infinite."""
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    if not bool(torch.isfinite(tensor).all()):
        raise ParamError(name, "contains non-finite values")
    return tensor


def _finished(tensor: torch.Tensor) -> torch.Tensor:
    """Wait for the GPU work behind a stage output, so a stage's time is its own (not charged to the
    next stage or the hop) and the tensor is complete before another process reads it."""
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()
    return tensor


def _wire(tensor: torch.Tensor, system: SystemParams) -> torch.Tensor:
    """A stage output as it goes on the wire: float32, contiguous, finished; in host memory unless the
    system keeps stage tensors on the GPU."""
    tensor = tensor.float().contiguous()
    return _finished(tensor) if system.stage_tensors_on_gpu else tensor.cpu()


# Params STATS leaves out: the texts (a client has them) and the images (not JSON, and large).
_NOT_IN_STATS = ("prompt", "negative_prompt", "input_image", "mask_image")


def _user_values(inputs: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    return {n: inputs[n] for n in names if n in inputs}


# --------------------------------------------------------------------------------------------
# Stage services
# --------------------------------------------------------------------------------------------


class TextEncoderService:
    stage_name = "text_encoder"

    def __init__(self, model: ModelParams, system: SystemParams):
        self.model, self.system = model, system
        self.stage = load_stage("text_encoder", model, system)

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        stats = read_stats(inputs)
        names = encoder_input_names(self.model.task, self.model.accepts)
        params = parse_user_params(_user_values(inputs, names), self.model, self.system)
        embeddings = self.stage.encode(params.prompt, params.negative_prompt or None)
        outputs = {  # float32 on the stage's device (exact for bf16 embeddings)
            "PROMPT_EMBEDS": _wire(embeddings.prompt_embeds, self.system),
            "POOLED_PROMPT_EMBEDS": _wire(embeddings.pooled_prompt_embeds, self.system),
        }
        if self.model.takes("INPUT_IMAGE"):
            # Every conditioning tensor, zero-size when the request has no image (the ensemble needs all).
            conditioning = self.stage.encode_conditioning(params) if params.input_image is not None else {}
            for name in CONDITIONING_TENSORS:
                empty = torch.zeros((0,) * conditioning_rank(name, self.model.task))
                outputs[name] = _wire(conditioning.get(name, empty), self.system)
        outputs["STATS"] = stats_tensor(add_stage_time(stats, self.stage_name, started))
        return outputs


class DenoiserService:
    """Runs the denoise loop in this process, or — when the system params ask for more than one
    rank — in a worker pool of sequence/CFG-parallel processes that this service owns."""

    stage_name = "denoiser"

    def __init__(self, model: ModelParams, system: SystemParams):
        self.model, self.system = model, system
        self.shapes = StageShapes.load(model)
        self.pool = None
        self.stage = None
        if system.world_size > 1:
            from .parallel.denoise_worker import PooledDenoiser

            self.pool = PooledDenoiser(model, system)
        else:
            self.stage = load_stage("denoiser", model, system)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def parse(self, inputs: Mapping[str, Any]) -> tuple[UserParams, Embeddings]:
        names = denoiser_input_names(self.model.task, self.model.accepts)
        had_image = None  # the images stay with the encoder: non-empty conditioning says there was one
        if self.model.takes("INPUT_IMAGE"):
            had_image = any(0 not in _stage_input(inputs, name).shape for name in CONDITIONING_TENSORS)
        params = parse_user_params(
            _user_values(inputs, names), self.model, self.system, require_prompt=False, had_input_image=had_image
        )
        prompt, pooled = _stage_input(inputs, "PROMPT_EMBEDS"), _stage_input(inputs, "POOLED_PROMPT_EMBEDS")
        self.shapes.check_embeddings(prompt.shape, pooled.shape)  # before any value is read
        conditioning = {}
        if self.model.takes("INPUT_IMAGE"):
            for name in CONDITIONING_TENSORS:
                value = _stage_input(inputs, name)
                self.shapes.check_conditioning(name, value.shape, params)  # before any value is read
                if value.numel() if isinstance(value, torch.Tensor) else value.size:  # zero-size: no image
                    conditioning[name.lower()] = _finite_tensor(name, value)
        embeddings = Embeddings(
            prompt_embeds=_finite_tensor("PROMPT_EMBEDS", prompt),
            pooled_prompt_embeds=_finite_tensor("POOLED_PROMPT_EMBEDS", pooled),
            **conditioning,
        )
        return params, embeddings

    def _denoise(
        self, embeddings: Embeddings, params: UserParams, channel: str | None, cancel_check: Callable[[], bool] | None
    ) -> tuple[torch.Tensor, dict]:
        if self.pool is not None:
            return self.pool.denoise(embeddings, params, channel, cancel_check)
        reporter = StepReporter(channel) if channel else None

        def on_step(step: int, total: int) -> None:
            if reporter is not None:
                reporter(step, total)
            if cancel_check is not None and cancel_check():
                raise DenoiseCancelled(f"cancelled after step {step} of {total}")

        stats: dict = {}
        try:
            return self.stage.denoise(embeddings, params, on_step=on_step, stats=stats), stats
        finally:
            if reporter is not None:
                reporter.close()

    def __call__(
        self,
        inputs: Mapping[str, Any],
        progress_channel: str | None = None,
        cancel_check: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """`progress_channel`: a StepChannel address to report each step to (and hear cancels from);
        `cancel_check`: polled between steps (Triton's request.is_cancelled)."""
        started = time.perf_counter()
        stats = read_stats(inputs)
        params, embeddings = self.parse(inputs)
        latents, cache_stats = self._denoise(embeddings, params, progress_channel, cancel_check)
        stats["cache"] = cache_stats
        stats.update(
            model=self.model.name,
            ranks=self.system.world_size,
            seed=params.seed,
            steps=params.steps,
            params={k: v for k, v in asdict(params).items() if k not in _NOT_IN_STATS},
        )
        return {
            "LATENTS": _wire(latents, self.system),
            "STATS": stats_tensor(add_stage_time(stats, self.stage_name, started)),
        }


class DecoderService:
    """Decodes in this process, or — with several ranks and `vae_tiling` on — tiles decoded in parallel
    by a pool of worker processes on the same devices as the denoiser's."""

    stage_name = "vae_decoder"

    def __init__(self, model: ModelParams, system: SystemParams):
        self.model, self.system = model, system
        self.shapes = StageShapes.load(model)
        self.pool = None
        self.stage = None
        if system.world_size > 1 and system.vae_tiling and model.task == "image":
            from .parallel.vae_decode import PooledDecoder

            self.pool = PooledDecoder(model, system)
        else:
            self.stage = load_stage("decoder", model, system)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        stats = read_stats(inputs)
        latents = _stage_input(inputs, "LATENTS")
        self.shapes.check_latents(latents.shape, self.system)  # before any value is read
        latents = _finite_tensor("LATENTS", latents)
        try:
            pixels = self.pool.decode(latents) if self.pool is not None else self.stage.decode(latents)
        except ValueError as exc:
            raise ParamError("LATENTS", str(exc)) from None
        return {
            pixel_output(self.model.task): pixels,
            "STATS": stats_tensor(add_stage_time(stats, self.stage_name, started)),
        }


__all__ = [
    "DecoderService",
    "DenoiserService",
    "TextEncoderService",
    "load_params",
]
