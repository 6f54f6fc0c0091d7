"""Helpers for the /inspect and /ui tests: a version as exported before the graph had image
outputs, and PNG pictures decoded back to arrays."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

import model_store
from atop import contract
from model_store import ModelVersion
from tests import service_fixtures as sf


def strip_views(mv: ModelVersion, root: Path, name: str = sf.MODEL) -> ModelVersion:
    """``mv`` published into ``root`` as a version exported before the image outputs existed:
    the same ONNX graph without them (no TorchScript file), the manifest declaring two outputs."""
    model = onnx.load(str(mv.path / "model.onnx"))
    keep = [o for o in model.graph.output if o.name not in contract.VIEW_OUTPUTS]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    root.mkdir(parents=True, exist_ok=True)
    old = root / "model.onnx"
    onnx.save(model, str(old))
    draft = json.loads(json.dumps(mv.manifest))
    draft["graph"] = {"onnx": draft["graph"]["onnx"] | {"outputs": draft["graph"]["onnx"]["outputs"][:2]}}
    return model_store.publish(root / "store", name, {"model.onnx": old}, draft)


def picture(b64: str) -> np.ndarray:
    """A base64 PNG from /inspect as uint8 [H, W, 3]."""
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert im.format == "PNG" and im.mode == "RGB"
    return np.asarray(im)


def expected_picture(chw: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """What /inspect should draw for float [C?, 3, H, W] (masks [C, 1, H, W]: magenta holes,
    copies side by side)."""
    if masks is None:
        chw, masks = chw[None], np.zeros((1, 1, *chw.shape[-2:]), np.float32)
    rgb = np.clip(np.rint(np.moveaxis(chw, 1, -1) * 255), 0, 255).astype(np.uint8)  # [C, H, W, 3]
    rgb[masks[:, 0] > 0.5] = (255, 0, 255)
    return np.concatenate(list(rgb), axis=1)
