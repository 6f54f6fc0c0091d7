"""The manifest schema ``atop-manifest/1``: pydantic models, canonical JSON and its digest.

The manifest is the contract of one model version (docs/model-store.md documents every field).
It is validated with pydantic in JSON mode, strictly (no "3" for 3), and ``extra="forbid"``
wherever a typo would silently change the meaning; ``provenance``, ``evaluation`` and the graph
entries accept extra keys, because what is worth recording there grows over time.

Integrity: ``files`` holds the sha256 of every model file, and ``manifest_sha256`` the sha256 of
the manifest itself (its canonical compact JSON without that one key). The file on disk must be
exactly ``canonical_bytes(manifest)``, so flipping any byte of manifest.json is detected too:
it breaks the JSON, the canonical layout or the digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atop.contract import (
    INPUT_IMAGE,
    INPUT_MASKS,
    INPUT_NOISE,
    MANIFEST_SCHEMA,
    OUTPUT_LOGITS,
    OUTPUT_RAW_LOGITS,
    RT_SAMPLER,
    rt_copies,
    view_shapes,
)

MANIFEST_FILE = "manifest.json"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
FILE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"  # flat names only: no folders, no dot-files


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class FileEntry(_Closed):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class InputSpec(_Closed):
    shape: list[int] = Field(min_length=3, max_length=3)
    dtype: Literal["float32"]
    range: list[float] = Field(min_length=2, max_length=2)
    layout: Literal["NCHW"]


class RTEntry(_Closed):
    """The RT spec (training.transforms.RTSpec) plus the sampler that draws its randomness."""

    kind: Literal["rt1", "rt2", "rt3"]
    noise_std: float = Field(ge=0)
    block: int = Field(ge=1)
    missing: float = Field(ge=0, lt=1)
    num_masks: int = Field(ge=1)
    image_size: int = Field(ge=1)
    sampler: Literal[RT_SAMPLER]

    @model_validator(mode="after")
    def _consistent(self) -> RTEntry:
        if self.image_size % self.block:
            raise ValueError(f"block {self.block} does not divide image_size {self.image_size}")
        if self.kind == "rt3" and ((self.image_size // self.block) ** 2) % self.num_masks:
            raise ValueError(f"num_masks {self.num_masks} does not divide the blocks evenly")
        return self


class TensorSpec(_Closed):
    name: str
    shape: list[int | Literal["B"]]
    dtype: Literal["float32"]
    description: str = ""


class OnnxGraph(_Open):
    file: str
    opset: int = Field(ge=17)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class TorchScriptGraph(_Open):
    file: str


class Graph(_Closed):
    onnx: OnnxGraph
    torchscript: TorchScriptGraph | None = None
    parity: dict | None = None  # the export's parity check: tolerance, seed, max differences


class DataRef(_Open):
    source: str
    checksum: str


class Provenance(_Open):
    data: DataRef | None
    recipe: dict
    git_commit: str
    seeds: dict


class RobustResult(_Open):
    """One robust-accuracy figure with the exact protocol it was measured under."""

    attack: str
    norm: str = "Linf"
    eps: float = Field(ge=0)
    steps: int = Field(ge=0)
    eot: int = Field(ge=1)
    n_images: int = Field(ge=1)
    accuracy: float = Field(ge=0, le=1)


class Evaluation(_Open):
    clean_accuracy: float | None = Field(default=None, ge=0, le=1)
    n_images: int | None = Field(default=None, ge=1)
    robust: list[RobustResult] = []


class Serving(_Closed):
    """How the service answers with this version when a request leaves the option out."""

    samples: int = Field(1, ge=1, le=256)  # RT draws averaged per answer (softmax mean)


class Manifest(_Closed):
    schema_: Literal[MANIFEST_SCHEMA] = Field(alias="schema")
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    created: str
    classes: list[str] = Field(min_length=2)
    input: InputSpec
    rt: RTEntry
    graph: Graph
    files: dict[str, FileEntry] = Field(min_length=1)
    provenance: Provenance
    evaluation: Evaluation
    serving: Serving | None = None  # absent = the service's own defaults (samples 1)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("created")
    @classmethod
    def _iso_utc(cls, v: str) -> str:
        t = datetime.fromisoformat(v)  # ValueError -> a validation error naming the field
        if t.utcoffset() is None or t.utcoffset().total_seconds() != 0:
            raise ValueError("must be an ISO 8601 time in UTC, e.g. 2025-01-31T12:00:00Z")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: names must be unique")
        for f in self.files:
            if f == MANIFEST_FILE or not _matches(FILE_PATTERN, f):
                raise ValueError(f"files: {f!r} is not a plain file name (no folders, no dot-files)")
        for fmt, g in (("onnx", self.graph.onnx), ("torchscript", self.graph.torchscript)):
            if g is not None and g.file not in self.files:
                raise ValueError(f"graph.{fmt}.file {g.file!r} is not listed in files")
        s = self.rt.image_size
        if self.input.shape != [3, s, s]:
            raise ValueError(f"input.shape {self.input.shape} does not match rt.image_size {s}")
        ins = {t.name: t for t in self.graph.onnx.inputs}
        if sorted(ins) != sorted([INPUT_IMAGE, INPUT_NOISE, INPUT_MASKS]):
            raise ValueError(f"graph.onnx.inputs must be image, noise, masks, not {sorted(ins)}")
        want_masks = ["B", rt_copies(self.rt.model_dump()), 1, s, s]
        if ins[INPUT_MASKS].shape != want_masks:
            raise ValueError(f"graph.onnx.inputs masks shape must be {want_masks} for rt {self.rt.kind}")
        outs = {t.name: t for t in self.graph.onnx.outputs}
        for name in (OUTPUT_LOGITS, OUTPUT_RAW_LOGITS):
            if name not in outs or outs[name].shape != ["B", len(self.classes)]:
                raise ValueError(f"graph.onnx.outputs needs {name} of shape ['B', {len(self.classes)}]")
        for name, shape in view_shapes(self.rt.model_dump()).items():  # optional image outputs
            if name in outs and outs[name].shape != shape:
                raise ValueError(f"graph.onnx.outputs {name} must have shape {shape} for rt {self.rt.kind}")
        return self


def _matches(pattern: str, s: str) -> bool:
    return re.fullmatch(pattern, s) is not None


def serving_samples(manifest: dict) -> int:
    """RT draws per answer for a request that does not say: ``serving.samples``, else 1."""
    return int((manifest.get("serving") or {}).get("samples", 1))


def clean_figure(evaluation: dict, samples: int) -> float | None:
    """The recorded clean accuracy of answers of ``samples`` draws: ``clean_accuracy`` for one,
    ``clean_accuracy_answer`` when it was measured for that many; None if not measured."""
    if samples == 1:
        return evaluation.get("clean_accuracy")
    answer = evaluation.get("clean_accuracy_answer") or {}
    return answer.get("accuracy") if answer.get("samples") == samples else None


def canonical_bytes(manifest: dict) -> bytes:
    """The one byte layout a stored manifest.json may have (sorted keys, 2-space indent)."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the compact canonical JSON of ``manifest`` without ``manifest_sha256``."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def validate(manifest: dict) -> None:
    """Raise ValueError with one readable line if ``manifest`` breaks the schema."""
    if not isinstance(manifest, dict):
        raise ValueError("a manifest must be a JSON object")
    schema = manifest.get("schema")
    if schema != MANIFEST_SCHEMA:
        raise ValueError(f"unknown schema {schema!r} (this version reads {MANIFEST_SCHEMA!r})")
    try:
        Manifest.model_validate_json(json.dumps(manifest))
    except ValidationError as e:
        raise ValueError(f"invalid manifest: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    errs = e.errors(include_url=False)
    err = errs[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {err['msg']}{more}"
