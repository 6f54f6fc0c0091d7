"""Per-request context (pure ASGI): request id, request metrics, one access log line.

Also the last line of defence: an exception that escapes a route becomes a JSON 500 with the
request id, logged with its traceback on the server and never shown to the client. A client that
goes away before its request is read (``ClientDisconnect``) is no server error: it is counted
and logged as 499, nginx's "client closed request", with no answer and no traceback.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.requests import ClientDisconnect

from service.errors import error_body
from service.logs import new_request_id, set_request_id

log = logging.getLogger("atop.access")
_QUIET = {"/healthz", "/readyz", "/metrics"}
CLIENT_CLOSED = 499  # the status label of a request whose client went away (nginx's)


class RequestContextMiddleware:
    """``direct``: routes served straight from here for their exact method and path
    (``DirectRoute.direct``: /classify skips the router and the framework's inner layers, ~7% of
    the server's CPU under load; docs/benchmarks.md); behind a root path, everything takes the
    router."""

    def __init__(self, app, metrics, direct=()):
        self.app, self.metrics = app, metrics
        self.direct = {(m, r.path): r.direct for r in direct for m in r.methods}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        client_id = headers.get(b"x-request-id", b"").decode("latin-1") or None
        rid = new_request_id(client_id)
        set_request_id(rid)
        t0 = time.perf_counter()
        state = {"status": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        direct = None if scope.get("root_path") else self.direct.get((scope["method"], scope["path"]))
        try:
            await (direct or self.app)(scope, receive, send_with_id)
        except ClientDisconnect:  # nobody is left to answer, and nothing failed here
            state["status"] = CLIENT_CLOSED
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not state["started"]:
                body = json.dumps(error_body("internal_error", "internal server error")).encode()
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            dt = time.perf_counter() - t0
            route = scope.get("route")
            label = getattr(route, "path", None) or "other"
            status = state["status"]
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_seconds.labels(label).observe(dt)
            level = logging.DEBUG if label in _QUIET and status < 400 else logging.INFO
            log.log(
                level,
                "%s %s %d %.1fms",
                scope.get("method"),
                scope.get("path"),
                status,
                dt * 1000,
                extra={"route": label, "status": status, "duration_ms": round(dt * 1000, 2)},
            )
