"""What every model.py shares: config parsing, tensor unpacking, error mapping, BLS calls.

The library never imports Triton: model.py passes its `triton_python_backend_utils` module in as
`pb`. That keeps each model.py a thin adapter and keeps this module testable without a server.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .params import ConfigError, ParamError, parse_user_params
from .progress import DenoiseCancelled
from .wire import output_name, read_stats, stats_tensor

logger = logging.getLogger("smart_diffusion")


def model_parameters(args: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(model_config dict, its string `parameters`) from TritonPythonModel.initialize's args."""
    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return config, params


def required_parameter(pb, params: Mapping[str, str], key: str, model_name: str) -> str:
    value = params.get(key, "")
    if not value:
        raise pb.TritonModelException(f"{model_name}: config.pbtxt parameter '{key}' is missing")
    return value


@dataclass(frozen=True)
class ModelSetup:
    """What initialize() needs from config.pbtxt: the Triton model's name and inputs, and its params."""

    name: str
    inputs: list[str]
    model_config: str
    system_config: str
    extra: dict[str, str]


def setup(pb, args: Mapping[str, str], extra_keys: tuple[str, ...] = ()) -> ModelSetup:
    """Parse initialize()'s args; a missing parameter fails the model load with its name."""
    config, params = model_parameters(args)
    name = config["name"]
    values = {key: required_parameter(pb, params, key, name) for key in ("model_config", "system_config", *extra_keys)}
    return ModelSetup(
        name=name,
        inputs=input_names(config),
        model_config=values.pop("model_config"),
        system_config=values.pop("system_config"),
        extra=values,
    )


STAGE_MODEL_KEYS = ("text_encoder_model", "denoiser_model", "vae_decoder_model")


def load_or_fail(pb, model_name: str, loader: Callable[[], Any]) -> Any:
    """Run a loader at initialize(); a broken config or weights directory fails the model load."""
    try:
        return loader()
    except (ConfigError, OSError, ValueError) as exc:
        raise pb.TritonModelException(f"{model_name}: cannot load: {exc}") from exc


def load_service(pb, model_setup: ModelSetup, service_class: type) -> Any:
    """A stage service built from the model's model/system yamls, or a failed model load."""
    from .service import load_params  # imports torch: only stage processes pay for it

    return load_or_fail(
        pb,
        model_setup.name,
        lambda: service_class(*load_params(model_setup.model_config, model_setup.system_config)),
    )


def input_names(config: Mapping[str, Any]) -> list[str]:
    return [tensor["name"] for tensor in config.get("input", [])]


def read_inputs(pb, request, names: list[str]) -> dict[str, np.ndarray]:
    """The request's input tensors present among `names` (optional inputs may be absent)."""
    values = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is not None:
            values[name] = tensor.as_numpy()
    return values


def response(pb, outputs: Mapping[str, np.ndarray]):
    return pb.InferenceResponse(output_tensors=[pb.Tensor(name, value) for name, value in outputs.items()])


def error_for(pb, exc: BaseException, model_name: str):
    """Exception -> TritonError with the right code. Bad user input is INVALID_ARG, never INTERNAL."""
    codes = pb.TritonError
    if isinstance(exc, StageError):
        return pb.TritonError(exc.message, exc.code)
    if isinstance(exc, ValueError):  # ParamError and other input checks
        return pb.TritonError(str(exc), codes.INVALID_ARG)
    if isinstance(exc, DenoiseCancelled):
        return pb.TritonError(str(exc), getattr(codes, "CANCELLED", codes.UNAVAILABLE))
    logger.error("%s: %s", model_name, "".join(traceback.format_exception(exc)))
    return pb.TritonError(f"{model_name}: internal error: {type(exc).__name__}: {exc}", codes.INTERNAL)


def error_response(pb, exc: BaseException, model_name: str):
    return pb.InferenceResponse(error=error_for(pb, exc, model_name))


def execute_each(pb, requests, model_name: str, handle: Callable[[Any], Mapping[str, np.ndarray]]) -> list:
    """One response per request; one request's failure never fails the others."""
    responses = []
    for request in requests:
        try:
            responses.append(response(pb, handle(request)))
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
            responses.append(error_response(pb, exc, model_name))
    return responses


class StageError(RuntimeError):
    """A stage called over BLS answered with an error; keeps its Triton error code."""

    def __init__(self, message: str, code: Any):
        super().__init__(message)
        self.message, self.code = message, code


def call_stage(
    pb, model_name: str, inputs: Mapping[str, np.ndarray], outputs: list[str]
) -> dict[str, np.ndarray]:
    """A blocking BLS call to one stage model; its error (and code) becomes a StageError."""
    request = pb.InferenceRequest(
        model_name=model_name,
        inputs=[pb.Tensor(name, value) for name, value in inputs.items()],
        requested_output_names=outputs,
    )
    result = request.exec()
    if result.has_error():
        error = result.error()
        code = error.code() if hasattr(error, "code") else pb.TritonError.INTERNAL
        raise StageError(error.message(), code)
    return {name: pb.get_output_tensor_by_name(result, name).as_numpy() for name in outputs}


def user_param_tensors(params) -> dict[str, np.ndarray]:
    """UserParams -> explicit request tensors for the stages (so every stage sees the same seed)."""
    tensors = {
        "HEIGHT": np.array([params.height], np.int32),
        "WIDTH": np.array([params.width], np.int32),
        "STEPS": np.array([params.steps], np.int32),
        "GUIDANCE_SCALE": np.array([params.guidance_scale], np.float32),
        "CACHE_RATIO": np.array([params.cache_ratio], np.float32),
        "SEED": np.array([params.seed], np.int64),
    }
    if params.num_frames is not None:
        tensors["NUM_FRAMES"] = np.array([params.num_frames], np.int32)
    return tensors


def text_tensors(params) -> dict[str, np.ndarray]:
    tensors = {"PROMPT": np.array([params.prompt.encode("utf-8")], dtype=np.object_)}
    if params.negative_prompt:
        tensors["NEGATIVE_PROMPT"] = np.array([params.negative_prompt.encode("utf-8")], dtype=np.object_)
    return tensors


__all__ = [
    "ParamError",
    "StageError",
    "call_stage",
    "error_for",
    "error_response",
    "execute_each",
    "input_names",
    "ModelSetup",
    "STAGE_MODEL_KEYS",
    "load_or_fail",
    "load_service",
    "setup",
    "model_parameters",
    "read_inputs",
    "required_parameter",
    "response",
    "text_tensors",
    "user_param_tensors",
]


class PipelineOrchestrator:
    """The BLS flow shared by `smart_diffusion` and `smart_diffusion_stream`:
    validate everything up front, then text_encoder -> denoiser -> vae_decoder."""

    def __init__(self, pb, model, system, stage_models: Mapping[str, str]):

        self.pb, self.model, self.system = pb, model, system
        self.stage_models = dict(stage_models)
        self.output = output_name(model)

    def parse(self, inputs: Mapping[str, np.ndarray]):
        return parse_user_params(inputs, self.model, self.system)

    def run(self, params, progress_channel: str | None = None) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        encoded = call_stage(
            self.pb,
            self.stage_models["text_encoder_model"],
            text_tensors(params),
            ["PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS", "STATS"],
        )
        denoise_inputs = {**encoded, **user_param_tensors(params)}
        if progress_channel is not None:
            denoise_inputs["PROGRESS_CHANNEL"] = np.array([progress_channel.encode()], dtype=np.object_)
        denoised = call_stage(self.pb, self.stage_models["denoiser_model"], denoise_inputs, ["LATENTS", "STATS"])
        decoded = call_stage(self.pb, self.stage_models["vae_decoder_model"], denoised, [self.output, "STATS"])

        stats = read_stats(decoded)
        stats["total_ms"] = round((time.perf_counter() - started) * 1000, 3)
        stats["orchestration_ms"] = round(stats["total_ms"] - sum(stats.get("stages_ms", {}).values()), 3)
        return {self.output: decoded[self.output], "STATS": stats_tensor(stats)}
