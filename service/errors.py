"""JSON errors: ``{"error": {"code": ..., "message": ...}, "request_id": ...}``, never a traceback.

Codes are stable strings clients may switch on; messages are for humans and may change.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.logs import current_request_id
from service.registry import NotReady

log = logging.getLogger("atop.service")

# status -> code for errors raised by the framework itself (unknown route, wrong method)
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_options",
    429: "queue_full",
    503: "unavailable",
}


class ApiError(Exception):
    """An error with an HTTP status, a stable code and a message safe to show the client."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}, "request_id": current_request_id()}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def format_validation(errors: list[dict], default: str = "request") -> str:
    """The first few pydantic validation errors as one line: ``where: what; ...``."""
    parts = []
    for err in errors[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
        parts.append(f"{where or default}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or f"invalid {default}"


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    if exc.status >= 500:
        log.warning("%s: %s", exc.code, exc.message)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _not_ready(request: Request, exc: NotReady) -> JSONResponse:
    """No version is loaded and warm yet: the same answer from every route."""
    return error_response(503, "not_ready", "no model version is loaded yet", {"Retry-After": "5"})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_options", format_validation(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(NotReady, _not_ready)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
