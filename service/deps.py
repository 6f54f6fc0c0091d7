"""Dependencies: the settings, the lifespan's registry and metrics, and the two credentials.

They are ``async def`` on purpose: each is a few attribute reads, and a plain ``def`` dependency
costs a threadpool round trip per request. The settings are the app's (``create_app`` stores
them in ``app.state``), not a ``dependency_overrides`` entry: with any override present, FastAPI
re-inspects every dependency's signature on every request. Even so, solving them cost about a
quarter of the event loop's CPU per request, so /classify is a ``DirectRoute``, which runs its
one dependency (the API key) itself (bench/load.py, docs/benchmarks.md).

* ``/classify``: when ``api_key`` is set, ``X-API-Key: <key>`` is required.
* ``/v1/admin/*``: when ``admin_token`` is set, ``Authorization: Bearer <token>`` is required.

Missing credentials are 401 (with ``WWW-Authenticate``), wrong ones 403; comparisons are
constant-time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

import fastapi.routing
from fastapi import Depends, Header, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError
from service.metrics import Metrics
from service.registry import Registry
from service.settings import Settings


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_registry(request: Request) -> Registry:
    return request.state.registry


async def get_metrics(request: Request) -> Metrics:
    return request.state.metrics


RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def _same(given: str, secret) -> bool:
    return hmac.compare_digest(given.encode(), secret.get_secret_value().encode())


def check_api_key(settings: Settings, given: str | None) -> None:
    """The /classify credential: nothing when the server sets no key; 401 when it is missing,
    403 when it is wrong."""
    if settings.api_key is None:
        return
    if not given:
        raise ApiError(401, "unauthorized", "missing X-API-Key header", {"WWW-Authenticate": "ApiKey"})
    if not _same(given, settings.api_key):
        raise ApiError(403, "forbidden", "invalid API key")


async def require_api_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header(description="required when the server sets an API key")] = None,
) -> None:
    check_api_key(settings, x_api_key)


_bearer = HTTPBearer(auto_error=False, description="the admin token, when the server sets one")


async def require_admin(
    settings: SettingsDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if settings.admin_token is None:
        return
    if creds is None or creds.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "missing bearer token", {"WWW-Authenticate": "Bearer"})
    if not _same(creds.credentials, settings.admin_token):
        raise ApiError(403, "forbidden", "invalid admin token")


def _api_key_guard(request: Request) -> None:
    check_api_key(request.app.state.settings, request.headers.get("x-api-key"))


# What a DirectRoute runs in place of each dependency it may declare: a plain function of the request.
_DIRECT_GUARDS = {require_api_key: _api_key_guard}


class DirectRoute(APIRoute):
    """An APIRoute whose endpoint takes the ``Request`` alone and is called without FastAPI's
    dependency solver, which cost about a quarter of the event loop's CPU per /classify request
    (docs/benchmarks.md). Its OpenAPI is FastAPI's, from the declared ``dependencies``,
    ``openapi_extra`` and ``response_model``; the endpoint reads the registry and metrics from
    ``request.state`` and the settings from ``request.app.state``. A declared
    dependency runs here as its entry in ``_DIRECT_GUARDS``; any other dependency or parameter is
    refused (TypeError) when the route is built — for a dependency that ``include_router`` adds,
    when FastAPI first resolves the included route — so nothing declared is ever silently skipped."""

    def get_route_handler(self):
        # under include_router, FastAPI builds the handler with the route's effective context
        # (the router's own dependencies added): check that one, as APIRoute does
        context = getattr(fastapi.routing, "_effective_route_context_var", None)
        effective = context.get() if context is not None else None
        route = effective if effective is not None and effective.original_route is self else self
        dependant = route.dependant
        extra = [p.name for p in dependant.path_params + dependant.query_params + dependant.header_params]
        extra += [p.name for p in dependant.cookie_params + dependant.body_params]
        unknown = [d.call for d in dependant.dependencies if d.call not in _DIRECT_GUARDS]
        if extra or unknown:
            raise TypeError(
                f"DirectRoute {self.path}: the endpoint takes the Request alone and runs no dependency "
                f"but {sorted(g.__name__ for g in _DIRECT_GUARDS)}; found {extra + unknown}"
            )
        guards = tuple(_DIRECT_GUARDS[d.call] for d in dependant.dependencies)
        endpoint = self.endpoint

        async def handler(request: Request):
            for guard in guards:
                guard(request)
            return await endpoint(request)

        self._handler = handler
        return handler

    async def direct(self, scope, receive, send) -> None:
        """Serve a request for this route as an ASGI app of its own, without Starlette's router
        and FastAPI's exception and exit-stack layers (service.middleware calls it for the
        route's exact method and path): what those layers would do for this endpoint is done
        here — the route in the scope, the app's exception handlers for what the endpoint
        raises (an exception without one propagates, as it would through them)."""
        scope["route"], scope["endpoint"], scope["path_params"] = self, self.endpoint, {}
        request = Request(scope, receive, send)
        try:
            response = await self._handler(request)
        except Exception as exc:
            handlers = scope["app"].exception_handlers
            handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)
