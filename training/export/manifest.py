"""The manifest that ``atop export`` publishes: graph description, provenance, evaluation.

Built from plain values (an RT spec, paths, numbers), so this module needs nothing of the
command's; convert.py holds the model conversion, command.py the run. The schema itself lives
in model_store/manifest.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import ValidationError

from atop import contract
from model_store import sha256_file
from model_store.manifest import Evaluation
from training.checkpoint import git_commit, load_checkpoint
from training.transforms import RTSpec

ONNX_FILE, TORCHSCRIPT_FILE = "model.onnx", "model.pt"
NO_PURIFIER = "none"  # --purifier none: the classifier alone (e.g. the AT baseline), RT = identity


def _tensor(name: str, shape: list, description: str) -> dict:
    return {"name": name, "shape": shape, "dtype": "float32", "description": description}


def graph_entry(spec: RTSpec, opset: int, num_classes: int, front: bool = True) -> dict:
    s, c = spec.image_size, spec.copies
    views = contract.view_shapes(spec.to_dict())
    defended = "defended logits f(g(t(x)))" if front else "logits f(x): no purifier, the RT is the identity"
    noise_use = (
        "ignored for rt1"
        if spec.kind == "rt1"
        else f"the graph multiplies it by rt.noise_std={spec.noise_std}"
    )
    return {
        "file": ONNX_FILE,
        "opset": opset,
        "exporter": f"torch.onnx dynamo=True (torch {torch.__version__})",
        "inputs": [
            _tensor(contract.INPUT_IMAGE, ["B", 3, s, s], "images, RGB, values in [0,1]"),
            _tensor(contract.INPUT_NOISE, ["B", 3, s, s], f"standard normal noise; {noise_use}"),
            _tensor(
                contract.INPUT_MASKS,
                ["B", c, 1, s, s],
                f"block masks, 1 = pixel missing; sample with rt.sampler ({contract.RT_SAMPLER}: "
                "noise first, then masks, from one numpy Generator; see atop/contract.py)",
            ),
        ],
        "outputs": [
            _tensor(contract.OUTPUT_LOGITS, ["B", num_classes], defended),
            _tensor(contract.OUTPUT_RAW_LOGITS, ["B", num_classes], "undefended classifier logits f(x)"),
            _tensor(
                contract.OUTPUT_TRANSFORMED,
                views[contract.OUTPUT_TRANSFORMED],
                "t(x), the purifier's input: the noisy image in [0,1] with the missing pixels (the masks"
                " input) set to 0, one per copy" + ("" if front else "; the identity here: x"),
            ),
            _tensor(
                contract.OUTPUT_PURIFIED,
                views[contract.OUTPUT_PURIFIED],
                "g(t(x)), the image the defended classifier sees" + ("" if front else "; x here"),
            ),
        ],
    }


TORCHSCRIPT_ENTRY = {
    "file": TORCHSCRIPT_FILE,
    "load": "torch.jit.load(path); no project code needed",
    "methods": {
        "forward": "x [B,3,H,W] float32 in [0,1] -> defended logits; draws fresh randomness; differentiable",
        "forward_with": "(x, noise, masks) as the ONNX inputs -> defended logits",
        "raw_logits": "x -> undefended classifier logits",
        "sample_masks": "(batch, device) -> masks [B,C,1,H,W], 1 = missing",
        "views_with": "(x, noise, masks) -> (defended logits, transformed, purified) as the ONNX outputs",
    },
}


def dataset_ref(path: Path) -> dict:
    """Provenance of a data set: sha256 of the file, or of (name, sha256) of every file below
    a folder, without decoding anything."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digests = {str(p.relative_to(path) if p != path else p.name): sha256_file(p) for p in files}
    total = hashlib.sha256("".join(f"{d}  {n}\n" for n, d in digests.items()).encode()).hexdigest()
    ref = {"source": str(path), "checksum": f"sha256:{total}"}
    if len(digests) <= 16:
        ref["files"] = digests
    return ref


def _recipe(path: str) -> dict:
    if Path(path).is_dir():  # a published version's classifier (training.classifier_from_store)
        from model_store import verify

        manifest = verify(Path(path))
        inherited = dict((manifest.get("provenance", {}).get("recipe") or {}).get("classifier") or {})
        return inherited | {
            "from_version": {"path": str(path), "manifest_sha256": manifest["manifest_sha256"]}
        }
    ck = load_checkpoint(path)
    info = {k: ck.header.get(k) for k in ("step", "epoch", "metrics", "git_commit")}
    return {"file": Path(path).name, "sha256": sha256_file(Path(path)), **info, "config": ck.config}


def load_evaluation(path: str | None) -> dict:
    """The measured numbers for the manifest, checked against the schema before any work."""
    if not path:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"--evaluation {path} does not exist")
    try:
        evaluation = json.loads(Path(path).read_text())
        Evaluation.model_validate_json(json.dumps(evaluation))
    except json.JSONDecodeError as e:
        raise ValueError(f"--evaluation {path}: not valid JSON ({e})") from None
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise ValueError(f"--evaluation {path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return evaluation


def graph_block(
    spec: RTSpec, opset: int, num_classes: int, *, front: bool, torchscript: bool, parity: dict
) -> dict:
    """The manifest's ``graph``: the ONNX graph's contract, the parity measured, the TorchScript file."""
    graph = {"onnx": graph_entry(spec, opset, num_classes, front), "parity": parity}
    if torchscript:
        graph["torchscript"] = TORCHSCRIPT_ENTRY
    return graph


def provenance(classifier: str, purifier: str | None, data: str | None, parity_seed: int) -> dict:
    """Where the version comes from: data set, the checkpoints' recipes and seeds, the code."""
    recipe = {"classifier": _recipe(classifier), "purifier": _recipe(purifier) if purifier else None}
    seeds = {k: r["config"].get("train", {}).get("seed") for k, r in recipe.items() if r}
    return {
        "data": dataset_ref(Path(data)) if data else None,
        "recipe": recipe,
        "git_commit": git_commit(),
        "seeds": seeds | {"parity": parity_seed},
    }


def build_manifest(
    spec: RTSpec, classes: list[str], *, graph: dict, provenance: dict, evaluation: dict, samples: int
) -> dict:
    s = spec.image_size
    return {
        "classes": classes,
        "input": {"shape": [3, s, s], "dtype": "float32", "range": [0.0, 1.0], "layout": "NCHW"},
        "rt": spec.to_dict() | {"sampler": contract.RT_SAMPLER},
        "graph": graph,
        "provenance": provenance,
        "evaluation": evaluation,
        "serving": {"samples": samples},
    }
