"""What every model.py shares: config parsing, tensor unpacking, error mapping, BLS calls.

The library never imports Triton: model.py passes its `triton_python_backend_utils` module in as
`pb`. That keeps each model.py a thin adapter and keeps this module testable without a server.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .admission import PIPELINE_SLOTS, Admission, Job, Refused
from .params import ConfigError, ParamError, parse_user_params
from .progress import DenoiseCancelled, StepChannel
from .stage_guard import GRANT_KEY, NEXT_STAGE, GrantError, binding, mint, server_key, take_grant, verify
from .wire import STAGE_TENSORS, TEXT_INPUTS, ms_since, output_name, read_stats, stats_tensor

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


def text_encoder_grant(key: bytes, pipeline_model: str, text_inputs: Mapping[str, Any]) -> np.ndarray:
    """The STATS an entry model sends the text encoder with the text inputs it sends: a grant over them."""
    return stats_tensor({GRANT_KEY: mint(key, pipeline_model, "text_encoder", binding("text_encoder", text_inputs))})


class RequestGate:
    """The ensemble's entry check (request_gate): the user params parse as they would in the BLS
    orchestrator, and the text encoder gets a grant over the text inputs the ensemble passes it."""

    def __init__(self, model, system):
        self.model, self.system = model, system
        self.key = server_key()

    @classmethod
    def load(cls, model_config: str, system_config: str) -> "RequestGate":
        from .params import ModelParams, SystemParams

        return cls(ModelParams.load(model_config), SystemParams.load(system_config))

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        parse_user_params(inputs, self.model, self.system)
        text_inputs = {name: inputs[name] for name in TEXT_INPUTS if name in inputs}
        return {"STATS": text_encoder_grant(self.key, self.model.name, text_inputs)}


def entry_admission(model_setup: ModelSetup, pipeline: "PipelineOrchestrator") -> Admission:
    system = pipeline.system
    return Admission(model_setup.name, PIPELINE_SLOTS, system.max_queue_size, system.max_queue_delay_s)


def serve_admitted(
    pb,
    request,
    model_setup: ModelSetup,
    pipeline: "PipelineOrchestrator",
    admission: Admission,
    run: Callable[[Any, Any, Job], Mapping[str, Any]],
    metrics: Any = None,
) -> None:
    """An entry model's request, answered through its response sender: bad params at once, then a queued
    job that the admission runs (`run(params, sender, job)` -> the final outputs) or refuses.
    execute() returns at once, so Triton's queue stays empty and the arrival time is exact."""
    sender = request.get_response_sender()
    started = time.perf_counter()

    def finish(outputs: Mapping[str, Any] | None = None, exc: BaseException | None = None) -> None:
        final = response(pb, outputs) if exc is None else error_response(pb, exc, model_setup.name)
        if metrics is not None:
            metrics.observe_stage("pipeline", time.perf_counter() - started)
            metrics.count_responses([final])
        sender.send(final, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    try:
        params = pipeline.parse(read_inputs(pb, request, model_setup.inputs))
    except Exception as exc:  # noqa: BLE001 - bad input is this request's error response
        finish(exc=exc)
        return

    def run_job() -> None:
        try:
            if metrics is not None:
                with metrics.in_flight():
                    outputs = run(params, sender, job)
            else:
                outputs = run(params, sender, job)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
            finish(exc=exc)
            return
        finish(outputs)

    job = Job(
        work=pipeline.work(params),
        run=run_job,
        refuse=lambda why: finish(exc=why),
        cancelled=request.is_cancelled,
        timeout_s=request_timeout_s(request),
    )
    try:
        admission.submit(job)
    except Refused as why:
        finish(exc=why)


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


class StageError(RuntimeError):
    """A stage called over BLS answered with an error; keeps its Triton error code."""

    def __init__(self, message: str, code: Any):
        super().__init__(message)
        self.message, self.code = message, code


def call_stage(
    pb, model_name: str, inputs: Mapping[str, Any], outputs: list[str], gpu_outputs: bool = False
) -> dict[str, Any]:
    """A blocking BLS call to one stage model; its error (and code) becomes a StageError.

    Inputs are numpy arrays or tensors of an earlier stage's response; the outputs come back as Triton
    tensors, so the orchestrator relays embeddings, latents and pixels without copying them (read one
    with `.as_numpy()`). `gpu_outputs`: outputs the stage made on the GPU stay there (CUDA IPC) instead
    of being copied to host memory and back for the next stage."""
    extra = {}
    if gpu_outputs:
        extra["preferred_memory"] = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_GPU, 0)
    request = pb.InferenceRequest(
        model_name=model_name,
        inputs=[as_tensor(pb, name, value) for name, value in inputs.items()],
        requested_output_names=outputs,
        **extra,
    )
    result = request.exec()
    if result.has_error():
        error = result.error()
        code = error.code() if hasattr(error, "code") else pb.TritonError.INTERNAL
        raise StageError(error.message(), code)
    return {name: pb.get_output_tensor_by_name(result, name) for name in outputs}


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
    "StageGuard",
    "PIPELINE_SLOTS",
    "entry_admission",
    "serve_admitted",
    "RequestGate",
    "text_encoder_grant",
    "call_stage",
    "error_for",
    "error_response",
    "execute_each",
    "input_names",
    "ModelSetup",
    "STAGE_MODEL_KEYS",
    "load_or_fail",
    "load_orchestrator",
    "load_service",
    "pool_restarts",
    "setup",
    "model_parameters",
    "read_inputs",
    "request_timeout_s",
    "required_parameter",
    "response",
    "text_tensors",
    "user_param_tensors",
]


def load_orchestrator(pb, args: Mapping[str, str]) -> tuple[ModelSetup, "PipelineOrchestrator"]:
    """initialize() of both orchestrators: their config, and the pipeline over the stage models it names."""
    from .params import ModelParams, SystemParams

    model_setup = setup(pb, args, STAGE_MODEL_KEYS)
    pipeline = load_or_fail(
        pb,
        model_setup.name,
        lambda: PipelineOrchestrator(
            pb,
            ModelParams.load(model_setup.model_config),
            SystemParams.load(model_setup.system_config),
            model_setup.extra,
        ),
    )
    return model_setup, pipeline


def pool_restarts(service: Any) -> int:
    """How many times a denoiser's worker pool was respawned (0 without a pool)."""
    pool = getattr(getattr(service, "pool", None), "pool", None)
    return max(0, int(getattr(pool, "starts", 1)) - 1) if pool is not None else 0


class PipelineOrchestrator:
    """The BLS flow shared by `smart_diffusion` and `smart_diffusion_stream`:
    validate everything up front, then text_encoder -> denoiser -> vae_decoder."""

    def __init__(self, pb, model, system, stage_models: Mapping[str, str]):

        self.pb, self.model, self.system = pb, model, system
        self.stage_models = dict(stage_models)
        self.output = output_name(model)
        self.key = server_key()

    def parse(self, inputs: Mapping[str, np.ndarray]):
        return parse_user_params(inputs, self.model, self.system)

    @staticmethod
    def work(params) -> float:
        """A request's cost in admission units: denoising steps (+1 for encoding and decoding) x pixels."""
        return float((params.steps + 1) * params.height * params.width * (params.num_frames or 1))

    def run(
        self,
        params,
        on_progress: Callable[[int, int], None] | None = None,
        cancel_check: Callable[[], bool] | None = None,
        timeout_s: float | None = None,
        arrived: float | None = None,
    ) -> dict[str, Any]:
        """The three BLS calls. `on_progress(step, total)` after every denoising step; a request whose
        `cancel_check` turns True (client cancel or disconnect) or that runs past `timeout_s` (counted from
        `arrived`, a time.monotonic() reading; default now) stops
        within one denoising step (the denoiser hears it on the step channel), or before the next stage."""
        started = time.perf_counter()
        arrived = time.monotonic() if arrived is None else arrived
        stop = _StopCondition(cancel_check, arrived + timeout_s if timeout_s else None, timeout_s)
        # Stages on a GPU keep embeddings and latents there between them (the pixels come back to host).
        gpu_outputs = self.system.stage_tensors_on_gpu
        hop_started = time.perf_counter()
        text_inputs = text_tensors(params)
        text_inputs["STATS"] = text_encoder_grant(self.key, self.model.name, text_inputs)
        encoded = call_stage(
            self.pb,
            self.stage_models["text_encoder_model"],
            text_inputs,
            ["PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS", "STATS"],
            gpu_outputs=gpu_outputs,
        )
        hops_ms = {"text_encoder": ms_since(hop_started)}
        stop.check("before denoising")
        denoise_inputs = {**encoded, **user_param_tensors(params)}
        with StepChannel() as channel, _StepRelay(channel, on_progress, stop):
            denoise_inputs["PROGRESS_CHANNEL"] = np.array([channel.address.encode()], dtype=np.object_)
            try:
                hop_started = time.perf_counter()
                denoised = call_stage(
                    self.pb,
                    self.stage_models["denoiser_model"],
                    denoise_inputs,
                    ["LATENTS", "STATS"],
                    gpu_outputs=gpu_outputs,
                )
                hops_ms["denoiser"] = ms_since(hop_started)
            except StageError as exc:
                why = stop.reason()
                if why is None:
                    raise
                raise DenoiseCancelled(f"{why}; the denoiser stopped: {exc.message}") from None
        stop.check("before decoding")
        hop_started = time.perf_counter()
        decoded = call_stage(self.pb, self.stage_models["vae_decoder_model"], denoised, [self.output, "STATS"])
        hops_ms["vae_decoder"] = ms_since(hop_started)

        stats = read_stats({"STATS": decoded["STATS"].as_numpy()})
        stats["total_ms"] = ms_since(started)
        stats["orchestration_ms"] = round(stats["total_ms"] - sum(stats.get("stages_ms", {}).values()), 3)
        # Each BLS call's wall time as the orchestrator saw it; minus the stage's own ms = that hop's cost.
        stats["hops_ms"] = hops_ms
        return {self.output: decoded[self.output], "STATS": stats_tensor(stats)}


class _StopCondition:
    """Why a request should stop now (client cancel, its own timeout), or None."""

    def __init__(self, cancel_check: Callable[[], bool] | None, deadline: float | None, timeout_s: float | None):
        self.cancel_check, self.deadline, self.timeout_s = cancel_check, deadline, timeout_s

    def reason(self) -> str | None:
        if self.cancel_check is not None and self.cancel_check():
            return "cancelled by the client"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return f"request timeout of {self.timeout_s:g} s exceeded"
        return None

    def check(self, where: str) -> None:
        why = self.reason()
        if why:
            raise DenoiseCancelled(f"{why} {where}")


_WAKE_UP = (0, 0)  # a step message no denoiser sends (steps count from 1)


class _StepRelay:
    """A thread that, while the denoiser's BLS call is in flight, relays its step messages to
    `on_progress` and sends `cancel` back on the channel as soon as the request should stop."""

    POLL_S = 0.05  # well below one denoising step

    def __init__(self, channel: StepChannel, on_progress: Callable[[int, int], None] | None, stop: _StopCondition):
        self.channel, self.on_progress, self.stop = channel, on_progress, stop
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="step-relay")

    def _loop(self) -> None:
        cancel_sent = False
        while True:
            update = self.channel.receive(timeout_s=self.POLL_S)
            if update == _WAKE_UP:
                update = None
            if update is not None and self.on_progress is not None:
                try:
                    self.on_progress(*update)
                except Exception:  # noqa: BLE001 - a response that cannot be sent: the client is gone
                    logger.warning("progress response could not be sent; stopping the request", exc_info=True)
                    self.stop.cancel_check = lambda: True
            elif update is None and self.done.is_set():
                return
            # The denoiser's address is known after its first step message; until then cancel() is False.
            if not cancel_sent and self.stop.reason() is not None:
                cancel_sent = self.channel.cancel()

    def __enter__(self) -> "_StepRelay":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        # Wake the relay now rather than at its next receive timeout (50 ms added to every request).
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waker:
            try:
                waker.sendto(json.dumps({"step": _WAKE_UP[0], "total": _WAKE_UP[1]}).encode(), "\0" + self.channel.address)
            except OSError:
                pass  # the relay still ends at its receive timeout
        self.thread.join()
