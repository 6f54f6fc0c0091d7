"""``/docs``: Swagger UI served from the service itself, so it works on a host without internet.

FastAPI's own ``/docs`` loads Swagger UI from a public CDN and is blank offline. Here its script,
stylesheet and icon come from the pinned ``swagger-ui-bundle-v2`` package (Swagger UI 5, which
renders the OpenAPI 3.1 that FastAPI writes), under ``/docs/assets/``; nothing else of that
package is served. ReDoc (FastAPI's ``/redoc``, also from a CDN) is turned off in ``create_app``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path

from service.errors import ApiError

ASSETS_PREFIX = "/docs/assets"
ASSETS = {  # what the page loads, and nothing else (the package also holds a demo page)
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy that strips a prefix
    assets = root + ASSETS_PREFIX
    return get_swagger_ui_html(
        openapi_url=root + request.app.openapi_url,
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon-32x32.png",
        oauth2_redirect_url=None,
    )


@router.get(ASSETS_PREFIX + "/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no asset {name!r}")
    return FileResponse(
        swagger_ui_path / name, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"}
    )
