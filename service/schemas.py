"""Typed response bodies (the OpenAPI schema at /docs is generated from these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    name: str
    version: int


class ClassScore(BaseModel):
    label: str
    class_index: int
    probability: float


class Suspicion(BaseModel):
    """Does the undefended classifier see something the defended pipeline does not?"""

    suspicious: bool = Field(description="the undefended and defended top classes differ")
    score: float = Field(
        description="total variation distance between the undefended and defended class "
        "probabilities, 0 (identical) to 1 (disjoint)"
    )
    undefended_label: str
    undefended_class_index: int
    undefended_probability: float


class ImageResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    label: str
    class_index: int
    probability: float = Field(description="defended probability of the label, averaged over samples")
    top_k: list[ClassScore]
    suspicion: Suspicion | None = Field(description="null when the backend cannot give undefended logits")


class Timing(BaseModel):
    queue_ms: float = Field(description="waiting for the first batch")
    inference_ms: float = Field(description="model time of the batches this request was in")
    total_ms: float
    batch_rows: list[int] = Field(description="size of each batch this request took part in")


class ClassifyResponse(BaseModel):
    request_id: str
    model: ModelRef
    samples: int = Field(
        description="RT draws averaged per image: the request's `samples`, else the version's default;"
        " 1 for a version whose RT is the identity (every draw would give the same answer)"
    )
    seed: int | None
    results: list[ImageResult]
    timing: Timing


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str | None


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    model: ModelRef


class Outcome(BaseModel):
    """The result of a reload or activation (also kept by the registry as its last outcome)."""

    result: Literal["loaded", "swapped", "unchanged", "refused"] = Field(
        description="loaded: the first version served (nothing was replaced); swapped: a new"
        " version replaced the active one; unchanged: nothing to do; refused: the candidate failed"
        " and the active version (if any) keeps serving"
    )
    active_version: int | None
    candidate: int | None = None
    message: str = ""


class VersionInfo(BaseModel):
    version: int
    status: Literal["active", "available", "refused"]
    reason: str | None = None
    evaluated: bool | None = Field(
        None,
        description="whether the manifest records measured robust accuracy (false: its robustness is unmeasured)",
    )
    classes: int | None = Field(None, description="number of classes it answers")


class ActiveModel(BaseModel):
    version: int
    backend: str
    device: str
    raw_logits: bool
    loaded_at: float = Field(description="unix time the version started serving")
    selftest: dict
    manifest: dict


class ModelsResponse(BaseModel):
    name: str
    store: str
    active: ActiveModel | None
    pinned: int | None
    versions: list[VersionInfo]
    last_reload: Outcome | None


ERROR_RESPONSES: dict = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "undecodable image or malformed body",
        401: "credentials missing",
        403: "credentials wrong",
        413: "body, image or image count too large",
        415: "unsupported content type or image format",
        422: "invalid options",
        429: "queue full (see Retry-After)",
        503: "no model ready (see Retry-After)",
        504: "deadline passed",
    }.items()
}
