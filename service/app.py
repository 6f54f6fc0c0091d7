"""The FastAPI app factory. Nothing is loaded at import: the model loads in the lifespan."""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from atop import __version__
from service.backends import load_backend
from service.deps import DirectRoute
from service.errors import install_handlers
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.registry import Registry
from service.routes import admin, classify, docs, inspect, ops, ui
from service.settings import Settings, get_settings

log = logging.getLogger("atop.service")

DESCRIPTION = """Image classification behind the AToP defense: random transform, purifier,
frozen classifier. Every answer names the model version that served it and carries an
attack-suspicion signal (the undefended classifier disagrees with the defended pipeline).
`POST /inspect` also returns the pictures (t(x), g(t(x))); the page at `/ui` shows them."""


def create_app(settings: Settings | None = None, *, loader=load_backend) -> FastAPI:
    """Build the app. ``settings`` default to the environment (``ATOP_*``); ``loader`` makes
    the backend for a store version (tests pass a fake)."""
    settings = settings or get_settings()
    metrics = Metrics(settings.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = Registry(settings, metrics, loader=loader)
        try:
            await registry.start()
        except Exception as e:
            log.error("startup failed: %s", e)
            await registry.aclose()
            raise
        registry.start_watching()
        # What startup built (modules, the app, the model's objects) lives as long as the
        # process: out of the collector's reach, a full collection under load walks only what
        # requests allocate, not the ~10^5 objects of the libraries (shorter pauses, the p99).
        gc.collect()
        gc.freeze()
        try:
            yield {"registry": registry, "metrics": metrics}
        finally:
            gc.unfreeze()  # an app built again in this process (tests) starts from a normal heap
            await registry.aclose()

    app = FastAPI(
        title="AToP defense service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # FastAPI's loads Swagger UI from a CDN: ours is routes/docs.py
        redoc_url=None,  # from a CDN too, and with nothing to serve it from here
        # FastAPI's OpenTelemetry bridge looked up the tracer provider on every request (~7% of
        # the event loop's time under load); the service's own figures are at /metrics.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings  # the SettingsDep of every route (service/deps.py)
    install_handlers(app)
    # served from the middleware at their own paths: the router is included below without a prefix
    direct = [r for r in classify.router.routes if isinstance(r, DirectRoute)]
    app.add_middleware(RequestContextMiddleware, metrics=metrics, direct=direct)
    app.include_router(classify.router)
    app.include_router(inspect.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(ui.router)
    app.include_router(docs.router)
    app.mount(ui.STATIC_PREFIX, ui.static_files(), name="ui-static")
    return app


def worker_app() -> FastAPI:
    """The factory for ``--workers N``: each worker process rebuilds settings and logging from
    the environment the parent exported."""
    from service.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)
