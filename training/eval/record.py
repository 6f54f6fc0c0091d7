"""``atop eval --record``: put measured numbers into the model store, honestly.

Versions are immutable: files are read-only, the manifest carries the sha256 of every file and of
itself, and ``verify`` refuses any edit (docs/model-store.md). So recording an evaluation does
not touch the evaluated version. It publishes a NEW version of the same model with

* the very same files (copied by ``publish``, which re-hashes them; their sha256 must equal
  the evaluated version's, and the TorchScript file's must equal the one that was attacked),
* the same manifest otherwise (RT spec, graph, parity, provenance), plus
  ``provenance.derived_from`` = {version, manifest_sha256, change} naming the evaluated version,
* ``evaluation`` = the new measurements merged over the old ones (entries of another protocol
  are kept; an entry with the same attack, norm, ε, steps and EOT is replaced),
* with ``--serve-samples``, ``serving.samples`` = the evaluation's ``--samples``: requests that do
  not set the option then get the very answer rule whose clean and robust figures are recorded.

The service then sees a new newest version whose weights are identical and whose manifest shows
the numbers at ``/v1/models``; a hot swap to it changes nothing but the metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path

from model_store import ModelVersion, get_version, publish, verify

log = logging.getLogger("atop.eval.record")

# What goes into the manifest's evaluation block (the rest of the result stays in the JSON).
KEYS = (
    "clean_accuracy",
    "n_images",
    "clean_protocol",
    "clean_accuracy_answer",
    "clean_accuracy_subset",
    "robust",
    "worst_case",
    "sweep",
    "scoring",
    "protocol",
    "sanity",
    "cost",
    "wall_s",
)


def robust_key(r: dict) -> tuple:
    return r["attack"], r["norm"], round(r["eps"], 6), r["steps"], r["eot"]


def merge_robust(old: list[dict], new: list[dict]) -> list[dict]:
    keys = {robust_key(r) for r in new}
    return [r for r in old if robust_key(r) not in keys] + new


def evaluation_block(result: dict, previous: dict | None = None) -> dict:
    block = {k: result[k] for k in KEYS if k in result}
    block["robust"] = merge_robust((previous or {}).get("robust", []), result["robust"])
    block["target_role"] = result["target"]["role"]
    return block


def record(result: dict, serving_samples: int | None = None) -> ModelVersion:
    """Publish the evaluated store version again, with ``result`` as its evaluation and, when
    ``serving_samples`` is given, ``serving.samples`` set to it (it must be the evaluation's
    vote k, so that the recorded answer figures describe what a request gets by default)."""
    src = result["target"]["source"]
    if "store" not in src:
        raise ValueError(
            "--record needs a store version (--store/--model/--version): the numbers must describe "
            "exactly the files they are recorded with, and checkpoints are not those files"
        )
    mv = get_version(Path(src["store"]), src["model"], src["version"])
    manifest = verify(mv.path)
    if manifest["files"][src["file"]]["sha256"] != src["file_sha256"]:
        raise ValueError(f"{mv.path / src['file']}: differs from the file that was evaluated; not recording")
    draft = dict(manifest)  # publish fills schema, name, version, created, files and the digest
    draft["evaluation"] = evaluation_block(result, manifest.get("evaluation"))
    change = "evaluation recorded by atop eval"
    if serving_samples is not None:
        if serving_samples != result["scoring"]["samples"]:
            raise ValueError(
                f"serving.samples={serving_samples} but the vote figures were measured with "
                f"samples={result['scoring']['samples']}"
            )
        draft["serving"] = {"samples": serving_samples}
        change += f"; serving.samples set to {serving_samples}"
    draft["provenance"] = manifest["provenance"] | {
        "derived_from": {
            "version": mv.version,
            "manifest_sha256": manifest["manifest_sha256"],
            "change": f"{change}; model files identical (same sha256)",
        }
    }
    new = publish(Path(src["store"]), mv.name, {f: mv.path / f for f in manifest["files"]}, draft)
    if new.manifest["files"] != manifest["files"]:  # publish re-hashed the copies
        raise RuntimeError(f"{new.path}: copied files differ from version {mv.version}")
    log.info("recorded the evaluation of %s/%d as version %d", mv.name, mv.version, new.version)
    return new
