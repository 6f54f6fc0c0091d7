"""The three ways to send images to /classify, and the options that come with them.

* raw body: ``Content-Type: image/png | image/jpeg | image/webp | image/bmp`` (or
  ``application/octet-stream``), one image; options in the query string.
* ``multipart/form-data``: every file part is an image, in order; options as text fields or in
  the query string.
* ``application/json``: ``{"images": ["<base64>", ...], "top_k": 3, "samples": 4, "seed": 7}``
  (``"image": "<base64>"`` for one; ``data:image/png;base64,`` prefixes are accepted).

Body fields override query parameters. Unknown option names in a JSON or form body are 422 (a
typo must not silently change the answer); unknown query parameters are ignored.
"""

from __future__ import annotations

import base64
import binascii
import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.errors import ApiError, format_validation

RAW_TYPES = {
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/webp",
    "image/bmp",
    "image/x-bmp",
    "image/x-ms-bmp",
    "application/octet-stream",
}


class ClassifyOptions(BaseModel):
    """Per-request options; the server caps (max_top_k, max_samples) are checked by the route."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(1, ge=1, description="how many classes to return per image, best first")
    samples: int | None = Field(
        None,
        ge=1,
        description="RT draws averaged per answer (default: the model version's serving.samples, else 1)",
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="seed the random transform: same image + seed = same answer"
    )
    deadline_ms: float | None = Field(
        None, gt=0, description="answer within this or get 504 (at most the server's deadline)"
    )


OPTION_NAMES = tuple(ClassifyOptions.model_fields)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"request body is {declared} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _b64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, "invalid_request", f"{where} must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "invalid_base64", f"{where} is not valid base64") from e


def _from_json(body: bytes) -> tuple[list[bytes], dict]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {e}") from e
    except RecursionError:  # nested deeper than the parser's recursion limit (a request is 2 deep)
        raise ApiError(400, "invalid_json", "body is not a request: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "invalid_request", "JSON body must be an object with an 'images' list")
    if "image" in doc and "images" in doc:
        raise ApiError(400, "invalid_request", "give either 'image' or 'images', not both")
    if "image" in doc:
        items = [doc.pop("image")]
    else:
        items = doc.pop("images", None)
        if not isinstance(items, list):
            raise ApiError(400, "invalid_request", "'images' must be a list of base64 strings")
    return [_b64(v, f"image {i}") for i, v in enumerate(items)], doc


async def _from_multipart(headers: Headers, body: bytes, max_images: int) -> tuple[list[bytes], dict]:
    async def stream():
        yield body

    parser = MultiPartParser(
        headers, stream(), max_files=max_images + 1, max_fields=32, max_part_size=64 * 1024
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            raise ApiError(413, "too_many_images", f"more than {max_images} images in one request") from e
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {e.message}") from e
    blobs, options = [], {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                blobs.append(await value.read())
            else:
                options[key] = value
    finally:
        await form.close()
    return blobs, options


async def parse_request(request: Request, *, max_body: int, max_images: int) -> tuple[list[bytes], dict]:
    """(image blobs, raw body options) from any accepted form; 400/413/415 on bad input."""
    kind = media_type(request.headers)
    if kind not in RAW_TYPES and kind not in ("application/json", "multipart/form-data"):
        shown = kind or "none"
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {shown} is not accepted; send an image (png, jpeg, webp, bmp), "
            "multipart/form-data or application/json",
        )
    body = await read_body(request, max_body)
    if kind in RAW_TYPES:
        blobs, options = ([body] if body else []), {}
    elif kind == "application/json":
        blobs, options = _from_json(body)
    else:
        blobs, options = await _from_multipart(request.headers, body, max_images)
    if not blobs:
        raise ApiError(400, "no_images", "the request contains no image")
    if len(blobs) > max_images:
        raise ApiError(
            413, "too_many_images", f"{len(blobs)} images in one request; the limit is {max_images}"
        )
    return blobs, options


def parse_options(query: dict, body_options: dict) -> ClassifyOptions:
    """Merge query parameters (known names only) and body options; 422 on anything invalid."""
    merged = {k: v for k, v in query.items() if k in OPTION_NAMES}
    merged.update(body_options)
    try:
        return ClassifyOptions.model_validate(merged)
    except ValidationError as e:
        raise ApiError(422, "invalid_options", format_validation(e.errors(), "options")) from e
