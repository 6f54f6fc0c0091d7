"""Operations: liveness, readiness, Prometheus metrics, and the model versions (public)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.deps import MetricsDep, RegistryDep
from service.metrics import CONTENT_TYPE
from service.registry import NotReady, Registry
from service.schemas import (
    ActiveModel,
    ErrorResponse,
    Health,
    ModelRef,
    ModelsResponse,
    Ready,
    VersionInfo,
)

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"model": ErrorResponse, "description": "no model loaded and warm"}},
    summary="Readiness: a model version is loaded, warmed up and self-tested",
)
async def readyz(registry: RegistryDep) -> Ready:
    slot = registry.active
    if slot is None:
        raise NotReady()  # -> 503 (service.errors)
    return Ready(status="ready", model=ModelRef(name=slot.name, version=slot.version))


@router.get("/metrics", summary="Prometheus metrics (prefix atop_)", response_class=Response)
async def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE)


async def describe(registry: Registry) -> ModelsResponse:
    """The store's versions of the model, the active one with its manifest, the last reload."""
    manifests = {mv.version: mv.manifest for mv in await registry.scan()}
    slot = registry.active
    if slot is not None:
        manifests[slot.version] = slot.manifest
    versions = []
    for v, m in sorted(manifests.items()):
        facts = {
            "evaluated": bool(((m or {}).get("evaluation") or {}).get("robust")),
            "classes": len((m or {}).get("classes") or []),
        }
        if slot is not None and v == slot.version:
            versions.append(VersionInfo(version=v, status="active", **facts))
        elif v in registry.refused:
            versions.append(VersionInfo(version=v, status="refused", reason=registry.refused[v], **facts))
        else:
            versions.append(VersionInfo(version=v, status="available", **facts))
    active = None
    if slot is not None:
        active = ActiveModel(
            version=slot.version,
            backend=slot.backend.name,
            device=slot.backend.device,
            raw_logits=slot.backend.has_raw,
            loaded_at=slot.loaded_at,
            selftest=slot.selftest,
            manifest=slot.manifest,
        )
    last = registry.last
    return ModelsResponse(
        name=registry.name,
        store=str(registry.root),
        active=active,
        pinned=registry.pinned,
        versions=versions,
        last_reload=last,
    )


@router.get("/v1/models", response_model=ModelsResponse, summary="Model versions and the active one")
async def models(registry: RegistryDep) -> ModelsResponse:
    return await describe(registry)
