"""The page that shows what the defense does: ``/ui`` (``/`` redirects there), its static files
under ``/ui/static/`` and the facts it starts from, ``/ui/info``.

Plain HTML, CSS and JavaScript from the package (service/static/ui/): no build step, no CDN, no
external font; a Content-Security-Policy of 'self' makes the browser refuse anything else. The
page talks to ``POST /inspect`` only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, Field
from starlette.staticfiles import StaticFiles

from service.deps import RegistryDep, SettingsDep
from service.views import MASK_COLOUR, VersionCard, slot_card

STATIC = Path(__file__).resolve().parents[1] / "static" / "ui"
STATIC_PREFIX = "/ui/static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["page"])


class UiInfo(BaseModel):
    ready: bool = Field(description="a model version is loaded (false: the page waits and retries)")
    card: VersionCard | None = Field(description="the active version; null until one is loaded")
    max_samples: int
    max_top_k: int
    max_body_bytes: int
    api_key_required: bool = Field(description="POST /inspect needs X-API-Key (the page asks for it)")
    examples: list[str] = Field(description="example images shipped with the page, under /ui/static/samples/")
    mask_colour: str = Field(description="the colour of missing pixels in the t(x) pictures")


def examples() -> list[str]:
    return sorted(p.name for p in (STATIC / "samples").glob("*.png"))


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC)


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("ui", status_code=307)


@router.get("/ui", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/ui/info", response_model=UiInfo, summary="What the page needs: the active version, the caps")
async def info(registry: RegistryDep, settings: SettingsDep) -> UiInfo:
    slot = registry.active
    return UiInfo(
        ready=slot is not None,
        card=None if slot is None else slot_card(slot),
        max_samples=settings.max_samples,
        max_top_k=settings.max_top_k,
        max_body_bytes=settings.max_body_bytes,
        api_key_required=settings.api_key is not None,
        examples=examples(),
        mask_colour="#{:02x}{:02x}{:02x}".format(*MASK_COLOUR),
    )
