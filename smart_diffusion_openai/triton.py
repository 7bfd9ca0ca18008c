"""The facade's side of Triton: served pipelines, and generation over gRPC (tritonclient.grpc.aio).

A pipeline is one set of entry models under a name prefix (`<prefix>smart_diffusion`, `..._stream`),
found in Triton's repository index; its OpenAI model id is the model yaml it serves (the entry model's
`model_config` parameter, e.g. "tiny-flux").

Every request carries the `timeout` parameter (µs), which the server's admission uses to refuse or stop
work that cannot finish in time, and a gRPC deadline a little later, so that the server's own answer
(which says why) arrives before ours.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient

from smart_diffusion_backend.wire import pixel_output

from .errors import OPENAI_FIELD, ApiError, bad_request, from_exception
from .params import GenerationJob, Tensors

logger = logging.getLogger(__name__)

ENTRY, STREAM = "smart_diffusion", "smart_diffusion_stream"
DEADLINE_MARGIN_S = 5.0  # gRPC deadline = request timeout + this: the server answers a passed timeout itself
PIPELINES_TTL_S = 10.0  # re-read the repository index at most this often (models load and unload)
T = TypeVar("T")


@dataclass(frozen=True)
class Pipeline:
    id: str  # the OpenAI model id
    prefix: str  # Triton model-name prefix ("" for a single-pipeline server)
    task: str  # "image" or "video"
    inputs: frozenset[str]  # the request tensors its entry model declares
    streams: bool  # its streaming entry model is served

    @property
    def entry_model(self) -> str:
        return f"{self.prefix}{ENTRY}"

    @property
    def stream_model(self) -> str:
        return f"{self.prefix}{STREAM}"

    @property
    def output(self) -> str:
        return pixel_output(self.task)

    @property
    def batches(self) -> bool:
        """Its entry model takes NUM_IMAGES: n images come from one request (one batched denoise)."""
        return "NUM_IMAGES" in self.inputs

    def images(self, pixels: np.ndarray) -> list[np.ndarray]:
        """An entry model's answer -> its images: IMAGE [N, H, W, 3] holds N of them, a VIDEO is one."""
        return list(pixels) if self.output == "IMAGE" else [pixels]

    def answers_to(self, name: str) -> bool:
        """`model` may be the id, the prefix (with or without its "_") or the entry model's name."""
        return name in {self.id, self.prefix, self.prefix.rstrip("_"), self.entry_model} - {""}

    def check(self, job: GenerationJob) -> None:
        """Fields this pipeline has no input for (NUM_FRAMES on an image model, an edit's mask on a Kontext
        model) -> 400 naming the request field."""
        for name in job.tensors(0):
            if name not in self.inputs:
                field = OPENAI_FIELD.get(name, name.lower())
                raise bad_request(field, f"{field}: model {self.id!r} ({self.task}s) takes no {name} input")
        if job.stream and not self.streams:
            raise bad_request("stream", f"stream: model {self.id!r} serves no {self.stream_model} model")


@dataclass
class Generated:
    index: int  # which of the job's n images
    pixels: np.ndarray  # uint8 [H, W, 3], or [F, H, W, 3] for a video (after Pipeline.images)
    stats: dict[str, Any]  # the server's STATS: seed used, per-stage milliseconds, resolved params


@dataclass
class Progress:
    index: int
    step: int
    total_steps: int


class TritonGateway:
    """One gRPC channel to tritonserver, used from one event loop."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url, self.timeout_s = url, timeout_s
        self._client = grpcclient.InferenceServerClient(url)
        self._pipelines: list[Pipeline] = []
        self._read_at = float("-inf")

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=5.0))
        except Exception:  # noqa: BLE001 - unreachable is "not ready"
            return False

    # -- pipelines -------------------------------------------------------------------------------

    async def pipelines(self, refresh: bool = False) -> list[Pipeline]:
        if refresh or time.monotonic() - self._read_at > PIPELINES_TTL_S:
            self._pipelines = await self._read_pipelines()
            self._read_at = time.monotonic()
        return self._pipelines

    async def _read_pipelines(self) -> list[Pipeline]:
        try:
            index = await self._client.get_model_repository_index(as_json=True, client_timeout=10.0)
            ready = {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}
            entries = sorted(name for name in ready if name.endswith(ENTRY))
            configs = await asyncio.gather(
                *(self._client.get_model_config(name, as_json=True, client_timeout=10.0) for name in entries)
            )
        except Exception as exc:  # noqa: BLE001 - tritonclient raises InferenceServerException
            raise ApiError(
                503,
                f"cannot read the served models from tritonserver at {self.url}: {from_exception(exc).message}",
                code="unavailable",
            ) from None
        found = []
        for name, reply in zip(entries, configs):
            config = reply.get("config", reply)
            prefix = name[: -len(ENTRY)]
            yaml_name = config.get("parameters", {}).get("model_config", {}).get("string_value", "")
            outputs = {o["name"] for o in config.get("output", [])}
            found.append(
                Pipeline(
                    id=Path(yaml_name).stem if yaml_name else (prefix.rstrip("_") or name),
                    prefix=prefix,
                    task="video" if "VIDEO" in outputs else "image",
                    inputs=frozenset(i["name"] for i in config.get("input", [])),
                    streams=f"{prefix}{STREAM}" in ready,
                )
            )
        return found

    async def pipeline(self, name: str | None) -> Pipeline:
        """The pipeline `model` names; None: the first served (the only one, on most servers)."""
        for refresh in (False, True):  # a miss re-reads the index: the model may have loaded since
            served = await self.pipelines(refresh=refresh)
            if name is None and served:
                return served[0]
            for pipeline in served:
                if name is not None and pipeline.answers_to(name):
                    return pipeline
        if not served:
            raise ApiError(503, f"tritonserver at {self.url} serves no {ENTRY} model (yet)", code="unavailable")
        ids = ", ".join(p.id for p in served)
        raise ApiError(404, f"model: {name!r} is not served here; served: {ids}", "model", "model_not_found")

    # -- generation ------------------------------------------------------------------------------

    def _inputs(self, tensors: Tensors) -> list[grpcclient.InferInput]:
        inputs = []
        for name, (array, dtype) in tensors.items():
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    @property
    def _timeout_us(self) -> int:
        return int(self.timeout_s * 1e6)

    async def infer(self, pipeline: Pipeline, tensors: Tensors) -> tuple[np.ndarray, dict[str, Any]]:
        """One request to the plain entry model -> (pixels, STATS)."""
        outputs = [grpcclient.InferRequestedOutput(pipeline.output), grpcclient.InferRequestedOutput("STATS")]
        try:
            result = await self._client.infer(
                pipeline.entry_model,
                self._inputs(tensors),
                outputs=outputs,
                timeout=self._timeout_us,
                client_timeout=self.timeout_s + DEADLINE_MARGIN_S,
            )
        except Exception as exc:  # noqa: BLE001 - InferenceServerException; CancelledError is not an Exception
            raise from_exception(exc) from None
        return result.as_numpy(pipeline.output), json.loads(result.as_numpy("STATS")[0])

    async def stream(self, pipeline: Pipeline, tensors: Tensors) -> AsyncIterator[Progress | Generated]:
        """One request to the streaming entry model: a Progress per denoising step, then the Generated
        (index 0: the caller numbers them). Leaving early (an error, the HTTP client gone) cancels the
        request on the server, which stops within one step."""
        request = {"model_name": pipeline.stream_model, "inputs": self._inputs(tensors), "timeout": self._timeout_us}

        async def one_request():  # the stream half-closes after it; Triton ends it after the final response
            yield request

        responses = self._client.stream_infer(one_request(), stream_timeout=self.timeout_s + DEADLINE_MARGIN_S)
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    finished = True
                    raise from_exception(error)
                pixels = result.as_numpy(pipeline.output)
                if pixels is not None:
                    finished = True
                    yield Generated(0, pixels, json.loads(result.as_numpy("STATS")[0]))
                    return
                yield Progress(0, int(result.as_numpy("STEP")[0]), int(result.as_numpy("TOTAL_STEPS")[0]))
        except grpc.RpcError as exc:  # the stream itself broke (server gone, deadline)
            finished = True
            raise from_exception(exc) from None
        finally:
            if not finished:
                responses.cancel()
        raise ApiError(502, f"{pipeline.stream_model}: the stream ended without an image", code="incomplete_stream")


async def _all_or_none(coroutines: list[Awaitable[T]]) -> list[T]:
    """Run concurrently; the first failure cancels the rest (the server stops their work) and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _requests(pipeline: Pipeline, job: GenerationJob) -> list[Tensors]:
    """How the job's n images become Triton requests: one request with NUM_IMAGES = n where the model
    takes it (one batched denoise; the images are diffusers' num_images_per_prompt from one seed),
    else n requests, image i with seed + i (the admission runs them side by side)."""
    if pipeline.batches and job.n > 1:
        return [{**job.tensors(0), "NUM_IMAGES": (np.array([job.n], np.int32), "INT32")}]
    return [job.tensors(i) for i in range(job.n)]


async def generate_images(gateway: TritonGateway, pipeline: Pipeline, job: GenerationJob) -> list[Generated]:
    """The job's n images, numbered 0..n-1."""
    results = await _all_or_none([gateway.infer(pipeline, tensors) for tensors in _requests(pipeline, job)])
    images = [(image, stats) for pixels, stats in results for image in pipeline.images(pixels)][: job.n]
    return [Generated(i, image, stats) for i, (image, stats) in enumerate(images)]


async def stream_images(
    gateway: TritonGateway, pipeline: Pipeline, job: GenerationJob
) -> AsyncIterator[Progress | Generated]:
    """generate_images, streamed: the n requests' Progress and Generated items as they come, each with its
    image's index; ends after the n-th image. The first error cancels the other requests and is raised."""
    queue: asyncio.Queue[tuple[int, Progress | Generated | BaseException]] = asyncio.Queue()
    requests = _requests(pipeline, job)
    per_request = job.n // len(requests)  # images each request answers

    async def run(index: int) -> None:
        try:
            async for item in gateway.stream(pipeline, requests[index]):
                if isinstance(item, Generated):
                    for k, image in enumerate(pipeline.images(item.pixels)[:per_request]):
                        await queue.put((index, Generated(index * per_request + k, image, item.stats)))
                else:
                    item.index = index
                    await queue.put((index, item))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(run(i)) for i in range(len(requests))]
    try:
        remaining = job.n
        while remaining:
            _, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Generated):
                remaining -= 1
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
