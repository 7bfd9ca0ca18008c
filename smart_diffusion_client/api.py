"""A small client for Smart-Diffusion servers (tritonclient HTTP / gRPC, plain or streaming).

    from smart_diffusion_client import SmartDiffusionClient
    with SmartDiffusionClient("127.0.0.1:8000") as c:
        result = c.generate("a red circle", seed=1)
    result.image  # uint8 [H, W, 3]; result.stats: per-stage milliseconds, seed used, ...
"""

from __future__ import annotations

import http.client
import json
import queue
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from smart_diffusion_backend.wire import FIELDS, encode_request

ProgressCallback = Callable[[int, int], None]


class GenerationError(RuntimeError):
    """The server refused or failed the request; `status` is the HTTP status / gRPC code name."""

    def __init__(self, message: str, status: str | int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class GenerationResult:
    pixels: np.ndarray  # the model's output: IMAGE uint8 [N, H, W, 3], or VIDEO [F, H, W, 3]
    stats: dict[str, Any]
    progress: list[tuple[int, int]] = field(default_factory=list)
    output: str = "IMAGE"

    @property
    def images(self) -> np.ndarray:
        """Every image of an image model's answer: [N, H, W, 3] (N = NUM_IMAGES)."""
        if self.output != "IMAGE":
            raise ValueError(f"the model answered {self.output}, not images")
        return self.pixels

    @property
    def image(self) -> np.ndarray:
        """The (first) image [H, W, 3]; for a video model, the video [F, H, W, 3]."""
        return self.pixels[0] if self.output == "IMAGE" else self.pixels


@dataclass(frozen=True)
class Request:
    """User params; None means "the model's default" (the tensor is not sent)."""

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    cache_ratio: float | None = None
    seed: int | None = None
    # Optional features (models whose yaml accepts them): image conditioning, LoRA, several images
    input_image: np.ndarray | None = None  # uint8 [H, W, 3]
    mask_image: np.ndarray | None = None  # uint8 [H, W], 255 = repaint
    strength: float | None = None
    lora: tuple[str, ...] | None = None
    lora_scale: tuple[float, ...] | None = None
    num_images: int | None = None

    def tensors(self) -> dict[str, tuple[np.ndarray, str]]:
        """Triton input name -> (array, Triton dtype), for the fields that are set (the server's schema)."""
        return {name: (array, FIELDS[name].dtype.triton) for name, array in encode_request(vars(self)).items()}

    def json_inputs(self) -> dict[str, Any]:
        """The same fields for HTTP generate_stream (JSON scalars, lists for list and image fields)."""
        out: dict[str, Any] = {}
        for name, (arr, _) in self.tensors().items():
            values = [v.decode() for v in arr] if arr.dtype == np.object_ else arr.tolist()
            out[name] = values[0] if FIELDS[name].scalar else values
        return out


class SmartDiffusionClient:
    """`url` is host:port of the HTTP (protocol="http") or gRPC (protocol="grpc") endpoint."""

    def __init__(self, url: str = "127.0.0.1:8000", protocol: str = "http", model_prefix: str = "", timeout_s: float = 600.0):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol={protocol!r}; allowed: http, grpc")
        self.url, self.protocol, self.prefix, self.timeout_s = url, protocol, model_prefix, timeout_s
        if protocol == "http":
            import tritonclient.http as module

            self._client = module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            import tritonclient.grpc as module

            self._client = module.InferenceServerClient(url)
        self._module = module
        self._pixel_outputs: dict[str, str] = {}

    def model_name(self, base: str) -> str:
        return f"{self.prefix}{base}"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "SmartDiffusionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:  # noqa: BLE001 - not reachable yet is "not ready"
            return False

    def _inputs(self, request: Request) -> list:
        inputs = []
        for name, (array, dtype) in request.tensors().items():
            tensor = self._module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def pixel_output(self, model: str) -> str:
        """The pixel output the served model declares, VIDEO or IMAGE (asked once per model)."""
        name = self.model_name(model)
        if name not in self._pixel_outputs:
            try:
                if self.protocol == "grpc":
                    metadata = self._client.get_model_metadata(name, as_json=True)
                else:
                    metadata = self._client.get_model_metadata(name)
            except Exception as exc:  # tritonclient raises InferenceServerException
                raise _generation_error(exc) from None
            declared = {output["name"] for output in metadata.get("outputs", [])}
            self._pixel_outputs[name] = "VIDEO" if "VIDEO" in declared else "IMAGE"
        return self._pixel_outputs[name]

    def infer(self, request: Request, model: str = "smart_diffusion", output: str | None = None) -> GenerationResult:
        """Plain request/response (the BLS orchestrator or the ensemble); `output` defaults to the model's."""
        output = output or self.pixel_output(model)
        outputs = [self._module.InferRequestedOutput(output), self._module.InferRequestedOutput("STATS")]
        try:
            # The request's own timeout, so the server refuses or stops work a client would give up on; over
            # gRPC also a deadline, so the client itself gives up then.
            kwargs = {"timeout": int(self.timeout_s * 1e6)}
            if self.protocol == "grpc":
                kwargs["client_timeout"] = self.timeout_s
            result = self._client.infer(self.model_name(model), self._inputs(request), outputs=outputs, **kwargs)
        except Exception as exc:  # tritonclient raises InferenceServerException
            raise _generation_error(exc) from None
        return GenerationResult(result.as_numpy(output), json.loads(result.as_numpy("STATS")[0]), output=output)

    def stream(
        self,
        request: Request,
        on_progress: ProgressCallback | None = None,
        model: str = "smart_diffusion_stream",
        output: str | None = None,
    ) -> GenerationResult:
        """Streaming generation: progress after every step, then the result (image or video)."""
        output = output or self.pixel_output(model)
        if self.protocol == "grpc":
            return self._stream_grpc(request, on_progress, model, output)
        return self._stream_http(request, on_progress, model, output)

    def generate(self, prompt: str, *, stream: bool = False, on_progress: ProgressCallback | None = None, **params) -> GenerationResult:
        request = Request(prompt=prompt, **params)
        if stream:
            return self.stream(request, on_progress)
        return self.infer(request)

    def _stream_grpc(self, request, on_progress, model, output) -> GenerationResult:
        responses: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: responses.put((result, error)))
        progress: list[tuple[int, int]] = []
        finished = False  # the final response (or error) arrived: nothing left to cancel server-side
        try:
            try:
                self._client.async_stream_infer(
                    self.model_name(model), self._inputs(request), timeout=int(self.timeout_s * 1e6)
                )
            except Exception as exc:  # a broken stream raises InferenceServerException here
                raise _generation_error(exc) from None
            while True:
                result, error = responses.get(timeout=self.timeout_s)
                if error is not None:
                    finished = True
                    raise _generation_error(error)
                pixels = result.as_numpy(output)
                if pixels is not None:
                    finished = True
                    return GenerationResult(pixels, json.loads(result.as_numpy("STATS")[0]), progress, output)
                update = (int(result.as_numpy("STEP")[0]), int(result.as_numpy("TOTAL_STEPS")[0]))
                progress.append(update)
                if on_progress:
                    on_progress(*update)
        finally:
            # Cancel only a request still running (timeout, an exception in on_progress, Ctrl-C).
            self._client.stop_stream(cancel_requests=not finished)

    def _stream_http(self, request, on_progress, model, output) -> GenerationResult:
        if request.input_image is not None or request.mask_image is not None:
            # Triton's generate_stream maps JSON values to 1-D tensors only; an image is [H, W, 3].
            raise GenerationError("streaming a request with an image needs protocol 'grpc': HTTP generate_stream "
                                  "carries scalars and 1-D lists only (or use infer over HTTP)")
        host, _, port = self.url.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=self.timeout_s)
        progress: list[tuple[int, int]] = []
        try:
            connection.request(
                "POST",
                f"/v2/models/{self.model_name(model)}/generate_stream",
                body=json.dumps(request.json_inputs()),
                headers={"Content-Type": "application/json"},
            )
            reply = connection.getresponse()
            if reply.status != 200:
                body = reply.read().decode(errors="replace")
                raise GenerationError(_json_error(body), reply.status)
            for raw in reply:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[len("data:"):])
                if "error" in event:
                    raise GenerationError(event["error"], 400 if "INVALID_ARG" in event["error"] else None)
                if output in event:
                    stats = json.loads(_scalar(event["STATS"]))
                    # generate_stream sends tensors flattened; the shape is in the request's params
                    params = stats["params"]
                    leading = params.get("num_frames") if output == "VIDEO" else params.get("num_images", 1)
                    shape = [leading, params["height"], params["width"], 3]
                    pixels = np.asarray(event[output], dtype=np.uint8).reshape(shape)
                    return GenerationResult(pixels, stats, progress, output)
                update = (int(_scalar(event["STEP"])), int(_scalar(event["TOTAL_STEPS"])))
                progress.append(update)
                if on_progress:
                    on_progress(*update)
            raise GenerationError("stream ended without a final response")
        finally:
            connection.close()


def _scalar(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


def _json_error(body: str) -> str:
    try:
        return json.loads(body).get("error", body)
    except ValueError:
        return body


def _generation_error(exc: Any) -> GenerationError:
    status = exc.status() if hasattr(exc, "status") and callable(exc.status) else None
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return GenerationError(message, status)
