"""The entry models' flow: admission, then the BLS calls text_encoder -> denoiser -> vae_decoder.

`smart_diffusion` and `smart_diffusion_stream` hand each request to `serve_admitted`, which parses it
(bad input answered at once), queues it in the model's Admission, and runs `PipelineOrchestrator.run`
in one of its pipeline slots. While the denoiser's BLS call is in flight a relay thread forwards its
step messages (progress.py) and sends `cancel` back once the request should stop (client cancel, its
own timeout). `RequestGate` is the ensemble's first step: the same validation, and the text encoder's
grant. Triton-free like triton_adapter: model.py passes `pb` in.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from .admission import PIPELINE_SLOTS, Admission, Job
from .errors import DenoiseCancelled, Refused, StageError
from .params import ModelParams, SystemParams, parse_user_params
from .progress import StepChannel
from .stage_guard import GRANT_KEY, binding, mint, server_key
from .triton_adapter import (
    ModelSetup,
    as_tensor,
    error_response,
    load_or_fail,
    read_inputs,
    request_timeout_s,
    response,
    setup,
)
from .wire import (
    CONDITIONING_TENSORS,
    EMBEDDING_TENSORS,
    FIELDS,
    IMAGE_INPUTS,
    TEXT_INPUTS,
    conditioning_rank,
    denoiser_input_names,
    encode_request,
    encoder_input_names,
    ms_since,
    pixel_output,
    read_stats,
    stats_tensor,
)

logger = logging.getLogger("smart_diffusion")


STAGE_MODEL_KEYS = ("text_encoder_model", "denoiser_model", "vae_decoder_model")


def text_encoder_grant(key: bytes, pipeline_model: str, text_inputs: Mapping[str, Any]) -> np.ndarray:
    """The STATS an entry model sends the text encoder with the text inputs it sends: a grant over them."""
    return stats_tensor({GRANT_KEY: mint(key, pipeline_model, "text_encoder", binding("text_encoder", text_inputs))})


class RequestGate:
    """The ensemble's entry check (request_gate): the user params parse as they would in the BLS
    orchestrator, the text encoder gets a grant over the text inputs the ensemble passes it, and the seed
    is resolved once (drawn when the request has none) for every stage."""

    def __init__(self, model, system):
        self.model, self.system = model, system
        self.key = server_key()

    @classmethod
    def load(cls, model_config: str, system_config: str) -> "RequestGate":
        return cls(ModelParams.load(model_config), SystemParams.load(system_config))

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        params = parse_user_params(inputs, self.model, self.system)
        text_inputs = {name: inputs[name] for name in (*TEXT_INPUTS, *IMAGE_INPUTS) if name in inputs}
        return {
            "STATS": text_encoder_grant(self.key, self.model.name, text_inputs),
            "SEED": FIELDS["SEED"].encode(params.seed),
        }


def entry_admission(model_setup: ModelSetup, pipeline: "PipelineOrchestrator", metrics: Any = None) -> Admission:
    system = pipeline.system
    on_waiting = metrics.set_waiting if metrics is not None else (lambda count: None)
    return Admission(model_setup.name, PIPELINE_SLOTS, system.max_queue_size, system.max_queue_delay_s, on_waiting)


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
        message = error.message()
        # Triton 2.51's BLS hands every stage error back as INTERNAL (server issue #7804). A stage's ParamError
        # names a request field first ("LORA: unknown adapter ..."): that one is the client's, INVALID_ARG.
        if code == pb.TritonError.INTERNAL and message.split(":", 1)[0] in FIELDS:
            code = pb.TritonError.INVALID_ARG
        raise StageError(message, code)
    return {name: pb.get_output_tensor_by_name(result, name) for name in outputs}


def empty_conditioning(task: str) -> dict[str, np.ndarray]:
    """The conditioning tensors of a request without an image: zero-size, of each tensor's rank."""
    return {name: np.zeros((0,) * conditioning_rank(name, task), np.float32) for name in CONDITIONING_TENSORS}


def user_param_tensors(params, model: ModelParams) -> dict[str, np.ndarray]:
    """UserParams -> explicit request tensors for the denoiser (so every stage sees the same seed)."""
    return encode_request(vars(params), denoiser_input_names(model.task, model.accepts))


def text_tensors(params, model: ModelParams) -> dict[str, np.ndarray]:
    """UserParams -> the encoder's inputs: the texts (an empty negative prompt is not sent) and, for
    models that take image conditioning, the images with the size and seed."""
    names = [n for n in encoder_input_names(model.task, model.accepts) if n != "NEGATIVE_PROMPT" or params.negative_prompt]
    return encode_request(vars(params), names)


def load_orchestrator(pb, args: Mapping[str, str]) -> tuple[ModelSetup, "PipelineOrchestrator"]:
    """initialize() of both orchestrators: their config, and the pipeline over the stage models it names."""
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


class PipelineOrchestrator:
    """The BLS flow shared by `smart_diffusion` and `smart_diffusion_stream`:
    validate everything up front, then text_encoder -> denoiser -> vae_decoder."""

    def __init__(self, pb, model, system, stage_models: Mapping[str, str]):

        self.pb, self.model, self.system = pb, model, system
        self.stage_models = dict(stage_models)
        self.output = pixel_output(model.task)
        # What the encoder hands the denoiser besides the embeddings (models taking image conditioning)
        self.conditioning = list(CONDITIONING_TENSORS) if model.takes("INPUT_IMAGE") else []
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
        text_inputs = text_tensors(params, self.model)
        text_inputs["STATS"] = text_encoder_grant(self.key, self.model.name, text_inputs)
        # Conditioning comes from the encoder only when the request has an image. Some of it may still be
        # empty (no mask, no image embeddings), and Triton 2.51's Python backend crashes sending a zero-size
        # output into GPU memory, so that hop stays in host memory; without an image the denoiser gets
        # zero-size host arrays made here.
        with_image = bool(self.conditioning) and params.input_image is not None
        encoded = call_stage(
            self.pb,
            self.stage_models["text_encoder_model"],
            text_inputs,
            [*EMBEDDING_TENSORS, *(self.conditioning if with_image else ()), "STATS"],
            gpu_outputs=gpu_outputs and not with_image,
        )
        if self.conditioning and not with_image:
            encoded.update(empty_conditioning(self.model.task))
        hops_ms = {"text_encoder": ms_since(hop_started)}
        stop.check("before denoising")
        denoise_inputs = {**encoded, **user_param_tensors(params, self.model)}
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
        self.channel.wake()  # now rather than at its next receive timeout (50 ms added to every request)
        self.thread.join()
