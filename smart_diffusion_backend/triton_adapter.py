"""What every model.py shares: config parsing, tensor unpacking, responses and error mapping, and the
stage models' grant check.

The library never imports Triton: model.py passes its `triton_python_backend_utils` module in as
`pb`. That keeps each model.py a thin adapter and keeps this module testable without a server. The
entry models' flow (admission, BLS calls to the stages, progress relay) is in orchestrator.py.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .errors import ConfigError, DenoiseCancelled, GrantError, ParamError, Refused, StageError
from .stage_guard import GRANT_KEY, NEXT_STAGE, binding, mint, server_key, take_grant, verify
from .wire import STAGE_TENSORS, read_stats, stats_tensor

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


def use_utf8_text_encoding() -> None:
    """The backend stub starts Python isolated and under the "C" locale, so open() without an encoding
    reads ASCII (torch.compile's inductor then fails on its UTF-8 templates). Switch LC_CTYPE to UTF-8;
    numbers and messages keep their formats."""
    import locale

    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            return
        except locale.Error:
            continue
    logger.warning("no UTF-8 locale here; files are read as %s", locale.getpreferredencoding(False))


class _TritonLogHandler(logging.Handler):
    """Library log records -> Triton's server log (pb_utils.Logger), at their level."""

    def __init__(self, pb) -> None:
        super().__init__(logging.INFO)
        self.pb = pb

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                self.pb.Logger.log_error(message)
            elif record.levelno >= logging.WARNING:
                self.pb.Logger.log_warn(message)
            else:
                self.pb.Logger.log_info(message)
        except Exception:  # noqa: BLE001 - logging must never fail a request
            self.handleError(record)


def route_logs_to_triton(pb) -> None:
    """The library's loggers (load times, compile reports, errors) write into the server log; without
    this a stub shows only warnings, on its stderr."""
    if getattr(pb, "Logger", None) is None:
        return
    for name in ("smart_diffusion", "smart_diffusion_backend"):
        library_logger = logging.getLogger(name)
        if not any(isinstance(h, _TritonLogHandler) for h in library_logger.handlers):
            library_logger.addHandler(_TritonLogHandler(pb))
        library_logger.setLevel(logging.INFO)
        library_logger.propagate = False


def setup(pb, args: Mapping[str, str], extra_keys: tuple[str, ...] = ()) -> ModelSetup:
    """Parse initialize()'s args; a missing parameter fails the model load with its name."""
    route_logs_to_triton(pb)
    use_utf8_text_encoding()
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


def read_inputs(pb, request, names: list[str]) -> dict[str, Any]:
    """The request's input tensors present among `names` (optional inputs may be absent): numpy arrays,
    except a stage tensor in GPU memory, which becomes a torch tensor on that GPU (DLPack, no copy). Any
    other input a client placed in GPU memory (CUDA shared memory) is copied to a numpy array."""
    values = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            continue
        if tensor.is_cpu():
            values[name] = tensor.as_numpy()
        else:
            on_gpu = _torch_from_triton(tensor)
            values[name] = on_gpu if name in STAGE_TENSORS else on_gpu.cpu().numpy()
    return values


def _torch_from_triton(tensor):
    import torch  # only stage processes get GPU tensors; the orchestrators never import torch

    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


def as_tensor(pb, name: str, value: Any):
    """A numpy array or torch tensor becomes a Triton tensor (a GPU tensor stays on its GPU, shared by
    DLPack); a tensor out of a BLS response is passed on as it is (it already lives in shared or GPU
    memory: relaying it costs no copy in this process)."""
    if isinstance(value, np.ndarray):
        # A strided array (a transposed view) is copied element by element by Triton's constructor.
        return pb.Tensor(name, np.ascontiguousarray(value))
    if type(value).__module__ == "torch" and type(value).__name__ == "Tensor":
        if value.device.type == "cpu" or value.numel() == 0:  # an empty one (Wan's pooled) has nothing to share
            return pb.Tensor(name, np.ascontiguousarray(value.cpu().numpy()))
        return pb.Tensor.from_dlpack(name, value.contiguous())
    return value


def response(pb, outputs: Mapping[str, Any]):
    return pb.InferenceResponse(output_tensors=[as_tensor(pb, name, value) for name, value in outputs.items()])


def error_for(pb, exc: BaseException, model_name: str):
    """Exception -> TritonError with the right code. Bad user input is INVALID_ARG, never INTERNAL."""
    codes = pb.TritonError
    if isinstance(exc, StageError):
        return pb.TritonError(exc.message, exc.code)
    if isinstance(exc, GrantError):  # a direct call to an internal stage
        return pb.TritonError(str(exc), codes.UNSUPPORTED)
    if isinstance(exc, Refused):  # the admission would not run it: busy, or its deadline cannot be met
        return pb.TritonError(str(exc), codes.UNAVAILABLE)
    if isinstance(exc, ValueError):  # ParamError and other input checks
        return pb.TritonError(str(exc), codes.INVALID_ARG)
    if isinstance(exc, DenoiseCancelled):
        return pb.TritonError(str(exc), getattr(codes, "CANCELLED", codes.UNAVAILABLE))
    logger.error("%s: %s", model_name, "".join(traceback.format_exception(exc)))
    return pb.TritonError(f"{model_name}: internal error: {type(exc).__name__}: {exc}", codes.INTERNAL)


def error_response(pb, exc: BaseException, model_name: str):
    return pb.InferenceResponse(error=error_for(pb, exc, model_name))


def execute_each(
    pb, requests, model_name: str, handle: Callable[[Any], Mapping[str, np.ndarray]], metrics: Any = None, stage: str = ""
) -> list:
    """One response per request; one request's failure never fails the others.

    With `metrics` (a ServingMetrics), each request's latency is observed under `stage` and its
    outcome counted.
    """
    responses = []
    for request in requests:
        started = time.perf_counter()
        try:
            responses.append(response(pb, handle(request)))
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
            responses.append(error_response(pb, exc, model_name))
        if metrics is not None:
            metrics.observe_stage(stage, time.perf_counter() - started)
            metrics.count_responses(responses[-1:])
    return responses


class StageGuard:
    """A stage model's side of stage_guard: admits a request only with a grant for this stage over
    what it received, and hands its successor a grant over what it produced."""

    def __init__(self, stage: str, pipeline_model: str):
        self.stage, self.pipeline_model = stage, pipeline_model
        self.key = server_key()

    def admit(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The request's inputs with STATS stripped of its grant; GrantError without a valid one."""
        stats, grant = take_grant(inputs.get("STATS"))
        verify(self.key, self.pipeline_model, self.stage, binding(self.stage, inputs), grant)
        return {**inputs, "STATS": stats_tensor(stats)}

    def pass_on(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """The outputs with a grant for the next stage over them (none after the last stage)."""
        following = NEXT_STAGE.get(self.stage)
        if following is not None:
            stats = read_stats(outputs)
            stats[GRANT_KEY] = mint(self.key, self.pipeline_model, following, binding(following, outputs))
            outputs["STATS"] = stats_tensor(stats)
        return outputs

    def __call__(self, inputs: Mapping[str, Any], run: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        return self.pass_on(run(self.admit(inputs)))


MAX_CHANNEL_ADDRESS_BYTES = 256


def progress_channel(pb, request) -> str | None:
    """The PROGRESS_CHANNEL address an orchestrator sent the denoiser, if any."""
    tensor = pb.get_input_tensor_by_name(request, "PROGRESS_CHANNEL")
    if tensor is None:
        return None
    raw = tensor.as_numpy().reshape(-1)
    if raw.size != 1 or not isinstance(raw[0], bytes) or len(raw[0]) > MAX_CHANNEL_ADDRESS_BYTES:
        raise ParamError("PROGRESS_CHANNEL", f"expected one address of at most {MAX_CHANNEL_ADDRESS_BYTES} bytes")
    return raw[0].decode("utf-8", errors="replace")


def request_timeout_s(request) -> float | None:
    """The request's own timeout (HTTP/gRPC parameter `timeout`, microseconds) in seconds, if set.

    The orchestrators stop a request past it, so a client that gives up (HTTP has no disconnect
    signal in this Triton) can still bound the server's work.
    """
    try:
        micros = int(request.timeout())
    except (AttributeError, TypeError, ValueError):
        return None
    return micros / 1e6 if micros > 0 else None


def pool_restarts(service: Any) -> int:
    """How many times a denoiser's worker pool was respawned (0 without a pool)."""
    pool = getattr(getattr(service, "pool", None), "pool", None)
    return max(0, int(getattr(pool, "starts", 1)) - 1) if pool is not None else 0
