"""POST /inspect: /classify's answer plus the pictures of what the defense did (the page /ui)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.deps import MetricsDep, RegistryDep, SettingsDep
from service.logs import current_request_id
from service.routes.classify import IMAGE_ROUTE, answers, serve
from service.schemas import ModelRef
from service.views import InspectResponse, inspect_results, slot_card

router = APIRouter(tags=["classify"])


@router.post(
    "/inspect",
    response_model=InspectResponse,
    **IMAGE_ROUTE,
    summary="Classify images and show what the defense did to them",
)
async def inspect(
    request: Request, registry: RegistryDep, settings: SettingsDep, metrics: MetricsDep
) -> InspectResponse:
    """The same request as ``/classify`` (raw, multipart or JSON; ``top_k``, ``samples``,
    ``seed``, ``deadline_ms``), the same decoding, limits, errors, batching and metrics. Each
    result adds the undefended classifier's top-k and PNG pictures (base64): the image as the
    model sees it, and per draw t(x) (missing pixels magenta) and g(t(x)). ``card`` describes the
    version that served the answer, including what it cannot show (a graph exported before the
    image outputs existed, an identity transform) and its recorded robustness."""
    served = await serve(request, registry, settings, views=True)
    results = answers(served, metrics)
    slot = served.slot
    detailed = await run_in_threadpool(
        inspect_results,
        results,
        served.job,
        samples=served.samples,
        classes=slot.facts.classes,
        top_k=served.opts.top_k,
    )
    return InspectResponse(
        request_id=current_request_id() or "",
        model=ModelRef(name=slot.name, version=slot.version),
        card=slot_card(slot),
        samples=served.samples,
        seed=served.opts.seed,
        results=detailed,
        timing=served.timing(),
    )
