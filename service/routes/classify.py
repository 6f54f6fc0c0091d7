"""POST /classify: images in, defended labels with an attack-suspicion signal out."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service.batcher import (
    Batcher,
    BatcherClosed,
    ClientGone,
    DeadlineExceeded,
    InferenceFailed,
    Job,
    QueueFull,
)
from service.decode import decode_many, small_images
from service.deps import DirectRoute, require_api_key
from service.errors import ApiError
from service.inputs import ClassifyOptions, parse_options, parse_request
from service.logs import current_request_id
from service.predict import make_rows, summarize
from service.registry import Slot
from service.schemas import ERROR_RESPONSES, ClassifyResponse, ImageResult, ModelRef, Timing

router = APIRouter(tags=["classify"], route_class=DirectRoute)


_CAPS = {"top_k": "max_top_k", "samples": "max_samples"}


def _option_schemas() -> dict[str, dict]:
    """Each option's JSON schema, from ``ClassifyOptions`` (the one definition): the non-null
    type with its bounds and default, and the description."""
    out = {}
    for name, prop in ClassifyOptions.model_json_schema()["properties"].items():
        schema = next(v for v in prop.get("anyOf", [prop]) if v.get("type") != "null")
        schema = {k: v for k, v in schema.items() if k not in ("title", "description", "default")}
        if prop.get("default") is not None:
            schema["default"] = prop["default"]
        cap = f"; at most the server's `{_CAPS[name]}`" if name in _CAPS else ""
        out[name] = {"schema": schema, "description": prop.get("description", "") + cap}
    return out


def _request_doc() -> dict:
    """The OpenAPI of the request, which FastAPI cannot infer: the route reads the body itself
    (raw, multipart or JSON) and merges the options of the query string and the body, the body's
    winning, before validating them once (service/inputs.py). So the options are documented here
    as query parameters and body fields, not declared as FastAPI parameters."""
    options = _option_schemas()
    fields = {name: o["schema"] | {"description": o["description"]} for name, o in options.items()}
    b64 = {"type": "string", "contentEncoding": "base64"}
    return {
        "parameters": [
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": o["description"] + ". A JSON or form field of the same name wins.",
                "schema": o["schema"],
            }
            for name, o in options.items()
        ],
        "requestBody": {
            "required": True,
            "description": "one image as the raw body (image/png, image/jpeg, image/webp, image/bmp), "
            "images as multipart/form-data files, or JSON "
            '{"images": ["<base64>", ...], "top_k": 3, "samples": 4, "seed": 7}',
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": "every file part is an image, in order",
                            },
                            **fields,
                        },
                        "required": ["images"],
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": b64,
                                "description": "images, base64 (a data:image/...;base64, prefix is accepted)",
                            },
                            "image": b64 | {"description": "one image, instead of `images`"},
                            **fields,
                        },
                        "additionalProperties": False,
                    }
                },
            },
        },
    }


REQUEST_DOC = _request_doc()  # the openapi_extra of /classify and /inspect


def _check_caps(opts: ClassifyOptions, settings) -> None:
    if opts.samples is not None and opts.samples > settings.max_samples:
        raise ApiError(
            422,
            "invalid_options",
            f"samples={opts.samples} exceeds this server's cap of {settings.max_samples}",
        )
    if opts.top_k > settings.max_top_k:
        raise ApiError(
            422, "invalid_options", f"top_k={opts.top_k} exceeds this server's cap of {settings.max_top_k}"
        )


def _prepare(blobs, slot, samples, seed, max_pixels, opened=None):
    """Decode and sample the randomness: CPU work, run in the threadpool unless the images are
    small (``opened``: their headers, already read by ``small_images``)."""
    images = decode_many(blobs, size=slot.facts.image_size, max_pixels=max_pixels, opened=opened)
    return len(images), make_rows(images, slot.facts.spec, samples, seed)


async def _abandon_when_gone(receive, batcher: Batcher, job: Job) -> None:
    """Wait for the client to go away (the request body is read, so the next ASGI message is
    the disconnect) and give up its job: queued rows are never computed, and the request ends
    as 499 (service.middleware), not as an answer sent to nobody."""
    while (await receive())["type"] != "http.disconnect":
        pass
    batcher.abandon(job, ClientGone())


async def _wait(request: Request, batcher: Batcher, job: Job) -> Job:
    watch = asyncio.get_running_loop().create_task(_abandon_when_gone(request.receive, batcher, job))
    try:
        return await batcher.wait(job)
    finally:
        watch.cancel()


@dataclass
class Served:
    """One request answered by the model: what /classify and /inspect build their answers from."""

    slot: Slot  # the version that served it (leased while it ran, released since)
    opts: ClassifyOptions
    n: int  # images
    samples: int  # draws per image: rows i*samples + j
    job: Job  # rows, randomness and outputs
    t0: float  # perf_counter at the start of the request

    def timing(self) -> Timing:
        job, total = self.job, time.perf_counter() - self.t0
        return Timing(
            queue_ms=round(((job.started or job.enqueued) - job.enqueued) * 1000, 3),
            inference_ms=round(job.inference_s * 1000, 3),
            total_ms=round(total * 1000, 3),
            batch_rows=list(job.batches),
        )


async def serve(request: Request, registry, settings, *, views: bool = False) -> Served:
    """Parse, decode, sample and run one request through the batcher, with every limit and
    error of /classify. ``views``: also fetch the graph's image outputs (when it has them)."""
    t0 = time.perf_counter()
    blobs, body_options = await parse_request(
        request, max_body=settings.max_body_bytes, max_images=settings.max_images
    )
    opts = parse_options(dict(request.query_params), body_options)
    _check_caps(opts, settings)
    deadline_ms = min(settings.deadline_ms, opts.deadline_ms or settings.deadline_ms)
    slot = registry.acquire()  # NotReady -> 503 (service.errors)
    # a request without `samples` gets the version's default (its manifest's serving.samples)
    samples = opts.samples if opts.samples is not None else slot.facts.samples
    if not slot.facts.random:  # identity RT: every draw gives the same answer, so compute one
        samples = 1
    try:  # the request finishes on the version it started with, even across a swap
        if views and len(blobs) * samples > settings.max_inspect_draws:
            raise ApiError(
                413,
                "too_many_draws",
                f"{len(blobs)} images x {samples} samples = {len(blobs) * samples} draws to picture;"
                f" /inspect's limit is {settings.max_inspect_draws} (send fewer images or samples)",
            )
        args = (blobs, slot, samples, opts.seed, settings.max_pixels)
        opened = small_images(blobs, slot.facts.image_size)
        if opened is not None:  # cheaper to decode here than to hand over to the threadpool
            n, (rows, noise, masks) = _prepare(*args, opened)
        else:
            n, (rows, noise, masks) = await run_in_threadpool(_prepare, *args)
        remaining = deadline_ms / 1000.0 - (time.perf_counter() - t0)
        if remaining <= 0:
            raise DeadlineExceeded()
        job = slot.batcher.submit(rows, noise, masks, remaining, views=views)
        job = await _wait(request, slot.batcher, job)
    except ClientGone:
        raise ClientDisconnect() from None  # service.middleware: 499, no answer
    except QueueFull as e:
        raise ApiError(
            429, "queue_full", "the server is busy; retry later", {"Retry-After": str(e.retry_after)}
        ) from None
    except DeadlineExceeded:
        raise ApiError(504, "deadline_exceeded", f"not answered within {deadline_ms:g} ms") from None
    except BatcherClosed:
        raise ApiError(503, "unavailable", "the model is shutting down", {"Retry-After": "1"}) from None
    except InferenceFailed:
        raise ApiError(500, "inference_failed", "the model failed on this batch") from None
    finally:
        registry.release(slot)
    return Served(slot, opts, n, samples, job, t0)


def answers(served: Served, metrics) -> list[ImageResult]:
    """Per-image results, counted in the images and suspicions metrics."""
    s = served
    results = summarize(
        s.job.logits, s.job.raw, n=s.n, samples=s.samples, classes=s.slot.facts.classes, top_k=s.opts.top_k
    )
    metrics.images.inc(s.n)
    flagged = sum(1 for r in results if r.suspicion is not None and r.suspicion.suspicious)
    if flagged:
        metrics.suspicions.inc(flagged)
    return results


# What every route that takes images shares: its errors, the documented request forms and
# options, the API key (/classify and /inspect; both are DirectRoutes, service/deps.py).
IMAGE_ROUTE = dict(
    responses=ERROR_RESPONSES, openapi_extra=REQUEST_DOC, dependencies=[Depends(require_api_key)]
)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    **IMAGE_ROUTE,
    summary="Classify images through the AToP defense",
)
async def classify(request: Request) -> Response:
    """Options (query string or body): ``top_k``, ``samples`` (RT draws averaged, capped by the
    server; default: the model version's ``serving.samples``; a version without randomness
    answers with one draw, which is the same answer), ``seed`` (reproducible randomness),
    ``deadline_ms`` (shorter than the server's)."""
    served = await serve(request, request.state.registry, request.app.state.settings)
    results = answers(served, request.state.metrics)
    answer = ClassifyResponse(
        request_id=current_request_id() or "",
        model=ModelRef(name=served.slot.name, version=served.slot.version),
        samples=served.samples,
        seed=served.opts.seed,
        results=results,
        timing=served.timing(),
    )
    # Serialised here, by pydantic, once: returned as a model, FastAPI would validate it again
    # against response_model and encode it with json.dumps (~15 us more per request).
    return Response(answer.model_dump_json(), media_type="application/json")
