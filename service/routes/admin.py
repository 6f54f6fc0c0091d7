"""Admin: reload from the store, activate (pin / roll back) a version, list versions.

Behind ``Authorization: Bearer <admin_token>`` when the server has a token.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query

from service.deps import RegistryDep, require_admin
from service.errors import ApiError
from service.routes.ops import describe
from service.schemas import ERROR_RESPONSES, ModelsResponse, Outcome

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={k: ERROR_RESPONSES[k] for k in (401, 403)},
)


@router.get("/versions", response_model=ModelsResponse, summary="List versions (as /v1/models)")
async def versions(registry: RegistryDep) -> ModelsResponse:
    return await describe(registry)


@router.post(
    "/reload", response_model=Outcome, summary="Scan the store now and swap to the newest valid version"
)
async def reload(
    registry: RegistryDep,
    unpin: bool = Query(False, description="drop a pin first, so the newest valid version is taken"),
) -> Outcome:
    """``refused`` means a candidate failed verification or its self-test; the old version keeps
    serving. The robustness gate applies here (not to an explicit activate)."""
    return await registry.reload(unpin=unpin)


@router.post(
    "/versions/{version}/activate",
    response_model=Outcome,
    responses={
        404: ERROR_RESPONSES[400] | {"description": "no such version"},
        409: ERROR_RESPONSES[400] | {"description": "the version was refused; the old one keeps serving"},
    },
    summary="Serve this version and pin it (roll back or forward)",
)
async def activate(
    registry: RegistryDep,
    version: int = Path(ge=1),
    accept_contract_change: bool = Query(
        False,
        description="serve it even though its class list (names, order, count) or input size"
        " differs from the active version's: clients reading labels must be ready for that",
    ),
) -> Outcome:
    """Refused (409) if the version fails verification or self-test, or changes the class list or
    input size without ``accept_contract_change=true``; the old version keeps serving."""
    try:
        outcome = await registry.activate(version, accept_contract_change=accept_contract_change)
    except KeyError:
        raise ApiError(
            404, "version_not_found", f"no version {version} of {registry.name!r} in the store"
        ) from None
    if outcome.result == "refused":
        raise ApiError(409, "version_refused", f"v{version} refused: {outcome.message}")
    return outcome
