"""Dependencies: the settings, the lifespan's registry and metrics, and the two credentials.

They are ``async def`` on purpose: each is a few attribute reads, and a plain ``def`` dependency
costs a threadpool round trip per request. The settings are the app's (``create_app`` stores
them in ``app.state``), not a ``dependency_overrides`` entry: with any override present, FastAPI
re-inspects every dependency's signature on every request. Together these cost about 40% of the
server's CPU per /classify request (bench/load.py, docs/benchmarks.md).

* ``/classify``: when ``api_key`` is set, ``X-API-Key: <key>`` is required.
* ``/v1/admin/*``: when ``admin_token`` is set, ``Authorization: Bearer <token>`` is required.

Missing credentials are 401 (with ``WWW-Authenticate``), wrong ones 403; comparisons are
constant-time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
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


async def require_api_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header(description="required when the server sets an API key")] = None,
) -> None:
    if settings.api_key is None:
        return
    if not x_api_key:
        raise ApiError(401, "unauthorized", "missing X-API-Key header", {"WWW-Authenticate": "ApiKey"})
    if not _same(x_api_key, settings.api_key):
        raise ApiError(403, "forbidden", "invalid API key")


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
