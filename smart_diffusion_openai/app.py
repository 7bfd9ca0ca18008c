"""The aiohttp application: OpenAI's images API in front of tritonserver.

    POST /v1/images/generations   JSON (stream: true -> server-sent events)
    POST /v1/images/edits         multipart/form-data: image (+ mask) and the same fields (stream too)
    GET  /v1/models, /v1/models/{id}
    GET  /health                  200 when tritonserver is ready, else 503
    GET  /health/live             200 while this process serves

Handlers are cancelled when the HTTP client disconnects (aiohttp's handler_cancellation), which cancels
their gRPC calls, so the server stops work nobody waits for within one denoising step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .encode import png_b64
from .errors import ApiError, bad_request
from .params import GenerationJob, auto_sizes, parse_edit, parse_generation, with_images
from .triton import Generated, Pipeline, Progress, TritonGateway, generate_images, stream_images
from .uploads import decode_edit, read_form

logger = logging.getLogger("smart_diffusion_openai")

PROGRESS_EVENT = "smart_diffusion.progress"  # ours: OpenAI has no step-progress event (see docs/openai.md)
COMPLETED_EVENT = "image_generation.completed"  # OpenAI's, for generations
EDIT_COMPLETED_EVENT = "image_edit.completed"  # OpenAI's, for edits


@dataclass(frozen=True)
class FacadeConfig:
    triton_grpc: str = "127.0.0.1:8001"  # tritonserver's gRPC endpoint
    host: str = "127.0.0.1"
    port: int = 8080
    max_n: int = 4  # most images one request may ask for
    timeout_s: float = 600.0  # each Triton request's `timeout`: the server refuses or stops work past it
    shutdown_timeout_s: float = 10.0  # on SIGTERM, how long requests in flight may still finish
    max_body_bytes: int = 1 << 20  # a JSON body (generations)
    max_upload_bytes: int = 50 << 20  # an edit's multipart body, images included (OpenAI allows 50 MB an image)
    max_input_pixels: int = 4096 * 4096  # an uploaded image's or mask's pixels, checked before decoding


CONFIG = web.AppKey("config", FacadeConfig)
GATEWAY = web.AppKey("gateway", TritonGateway)
GATEWAY_CLASS = web.AppKey("gateway_class", type)
STARTED = web.AppKey("started", int)


@web.middleware
async def openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error in OpenAI's shape, aiohttp's own (404 route, 405, 413 body too large) included."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return web.json_response(
            ApiError(exc.status, f"{request.method} {request.path}: {exc.reason}", code=code).body(), status=exc.status
        )
    except asyncio.CancelledError:
        # handler_cancellation: the client disconnected (or a shutdown ran out of time); the cancel has
        # reached our gRPC calls, so the server stops their work
        logger.info(
            "%s %s: cancelled (the client left); its Triton requests are cancelled", request.method, request.path
        )
        raise
    except ConnectionResetError:  # the client is gone: nothing to answer
        raise
    except Exception as exc:  # noqa: BLE001 - answered, and logged with its traceback
        logger.exception("%s %s failed", request.method, request.path)
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
        return web.json_response(error.body(), status=500)


async def _gateway(app: web.Application) -> AsyncIterator[None]:
    """The gRPC client lives on the server's event loop: made at start-up, closed at clean-up."""
    config = app[CONFIG]
    app[GATEWAY] = app[GATEWAY_CLASS](config.triton_grpc, config.timeout_s)
    yield
    await app[GATEWAY].close()


def create_app(config: FacadeConfig, gateway_class: type[TritonGateway] = TritonGateway) -> web.Application:
    """The application; `gateway_class` lets a test serve fixed pipelines (a subclass) without Triton."""
    app = web.Application(middlewares=[openai_errors], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[GATEWAY_CLASS] = gateway_class
    app[STARTED] = int(time.time())
    app.cleanup_ctx.append(_gateway)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_post("/v1/images/edits", edits)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    return app


def run(config: FacadeConfig) -> None:
    """Serve until SIGINT/SIGTERM (then requests in flight get `shutdown_timeout_s` to finish)."""
    logger.info(
        "OpenAI images API on http://%s:%d/v1 -> tritonserver gRPC %s", config.host, config.port, config.triton_grpc
    )
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        shutdown_timeout=config.shutdown_timeout_s,
        handler_cancellation=True,
        print=None,
    )


# -- images ------------------------------------------------------------------------------------------


def _size(stats: dict[str, Any]) -> str:
    params = stats.get("params", {})
    return f"{params.get('width')}x{params.get('height')}"


async def _b64(image: Generated) -> str:
    # PNG encoding is CPU work: off the event loop, which keeps serving the other requests meanwhile
    return await asyncio.get_running_loop().run_in_executor(None, png_b64, image.pixels)


def _ours(image: Generated) -> dict[str, Any]:
    """Our per-image extra: the openai client keeps unknown fields (`image.smart_diffusion` / model_extra)."""
    return {"index": image.index, "seed": image.stats.get("seed"), "stats": image.stats}


async def generations(request: web.Request) -> web.StreamResponse:
    try:
        body = json.loads(await request.text())  # any Content-Type: curl -d sends form-urlencoded
    except ValueError as exc:
        raise bad_request(None, f"the request body is not valid JSON: {exc}") from None
    job = parse_generation(body, request.app[CONFIG].max_n)
    gateway = request.app[GATEWAY]
    pipeline = await gateway.pipeline(job.model)
    pipeline.check(job)
    return await _answer(request, gateway, pipeline, [job], COMPLETED_EVENT)


async def edits(request: web.Request) -> web.StreamResponse:
    """An image (+ mask) and a prompt: image-to-image, inpainting, or editing on a Kontext model, as the
    model's weights make it (docs/image-conditioning.md). Cheap checks first (fields, the model takes an
    image), then the images are decoded off the event loop."""
    config = request.app[CONFIG]
    form = await read_form(request, config.max_upload_bytes)
    try:
        upload, mask_upload = form.image(), form.mask()
        job = parse_edit(form.texts, config.max_n)
        gateway = request.app[GATEWAY]
        pipeline = await gateway.pipeline(job.model)
        if "INPUT_IMAGE" not in pipeline.inputs:
            takers = [p.id for p in await gateway.pipelines() if "INPUT_IMAGE" in p.inputs]
            raise bad_request(
                "image",
                f"image: model {pipeline.id!r} takes no input image (its yaml's `accepts:` lists no INPUT_IMAGE), "
                f"so it cannot edit; served models that can: {', '.join(takers) or 'none'}",
                code="unsupported_value",
            )
        image, mask = await asyncio.get_running_loop().run_in_executor(
            None, decode_edit, upload, mask_upload, config.max_input_pixels
        )
    finally:
        form.close()
    job = with_images(job, image, mask)
    pipeline.check(job)  # a mask or strength the model takes no input for (Kontext) -> 400 naming it
    jobs = [job] if job.request.height is not None else auto_sizes(job, image.shape)
    return await _answer(request, gateway, pipeline, jobs, EDIT_COMPLETED_EVENT)


async def _answer(
    request: web.Request, gateway: TritonGateway, pipeline: Pipeline, jobs: list[GenerationJob], completed: str
) -> web.StreamResponse:
    """The first of `jobs` whose size the server takes, answered as JSON or (stream) as server-sent events.
    A later job is a fallback, tried only when the server refused the one before with a 400 on `size`: an
    edit without `size` tries the image's own size, then the model's default (params.auto_sizes). The
    server refuses a size while parsing the request, before any work, so a fallback costs milliseconds."""
    for attempt, job in enumerate(jobs, 1):
        try:
            if job.stream:
                return await _stream(request, gateway, pipeline, job, completed)
            images = await generate_images(gateway, pipeline, job)
        except ApiError as exc:
            if attempt == len(jobs) or exc.status != 400 or exc.param != "size":
                raise
            logger.info("%s: %s; trying %s", request.path, exc.message, _job_size(jobs[attempt]))
            continue
        encoded = await asyncio.gather(*(_b64(image) for image in images))
        return web.json_response(
            {
                "created": int(time.time()),
                "data": [
                    {"b64_json": b64, "revised_prompt": None, "smart_diffusion": _ours(image)}
                    for image, b64 in zip(images, encoded)
                ],
                "output_format": "png",
                "size": _size(images[0].stats),
            }
        )
    raise AssertionError("unreachable: the last job's failure is raised")


def _job_size(job: GenerationJob) -> str:
    height, width = job.request.height, job.request.width
    return "the model's default size" if height is None else f"{width}x{height}"


async def _event(item: Progress | Generated, completed: str = COMPLETED_EVENT) -> dict[str, Any]:
    created = int(time.time())
    if isinstance(item, Progress):
        return {
            "type": PROGRESS_EVENT,
            "created_at": created,
            "image_index": item.index,
            "step": item.step,
            "total_steps": item.total_steps,
        }
    return {
        # OpenAI's completed event, every field its type declares, so strict clients parse it too
        "type": completed,
        "b64_json": await _b64(item),
        "created_at": created,
        "background": "opaque",
        "output_format": "png",
        "quality": "auto",
        "size": _size(item.stats),
        "usage": {
            "input_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": 0,
            "total_tokens": 0,
        },
        "smart_diffusion": _ours(item),
    }


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())


async def _stream(
    request: web.Request, gateway: TritonGateway, pipeline: Pipeline, job: GenerationJob, completed: str
) -> web.StreamResponse:
    """Server-sent events. The first item is awaited before the response starts, so a request the server
    refuses (bad params, full queue) gets a plain HTTP error; a later failure is an `error` event."""
    async with contextlib.aclosing(stream_images(gateway, pipeline, job)) as items:
        item = await anext(items)  # ApiError here -> the middleware's JSON error
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            while True:
                await _send(response, await _event(item, completed))
                item = await anext(items)
        except StopAsyncIteration:
            pass
        except ApiError as exc:
            await _send(response, {"type": "error", **exc.body()})
        except ConnectionResetError:  # the client is gone: aclosing() cancels its Triton requests
            raise
        except Exception as exc:  # noqa: BLE001 - the response has started: report it in the stream
            logger.exception("stream %s failed", request.path)
            await _send(
                response,
                {
                    "type": "error",
                    **ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error").body(),
                },
            )
        await response.write_eof()
        return response


# -- models, health -----------------------------------------------------------------------------------


def _model(pipeline: Pipeline, created: int) -> dict[str, Any]:
    return {
        "id": pipeline.id,
        "object": "model",
        "created": created,
        "owned_by": "smart-diffusion",
        "smart_diffusion": {
            "task": pipeline.task,
            "triton_model": pipeline.entry_model,
            "stream_model": pipeline.stream_model if pipeline.streams else None,
        },
    }


async def list_models(request: web.Request) -> web.Response:
    pipelines = await request.app[GATEWAY].pipelines(refresh=True)
    return web.json_response({"object": "list", "data": [_model(p, request.app[STARTED]) for p in pipelines]})


async def get_model(request: web.Request) -> web.Response:
    pipeline = await request.app[GATEWAY].pipeline(request.match_info["model"])
    return web.json_response(_model(pipeline, request.app[STARTED]))


async def health(request: web.Request) -> web.Response:
    if await request.app[GATEWAY].is_ready():
        return web.json_response({"status": "ready"})
    error = ApiError(503, f"tritonserver at {request.app[CONFIG].triton_grpc} is not ready", code="not_ready")
    return web.json_response(error.body(), status=503)


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "live"})
