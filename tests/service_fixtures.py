"""Helpers for the service tests: a tiny exported model store, images in every mode and format,
and a real ``atop serve`` process on a free loopback port.

The store is made the real way: tiny random checkpoints -> ``training.export`` (ONNX +
TorchScript, parity-checked) -> ``model_store.publish``. Exporting costs a few seconds, so it
runs once per session (tests/conftest.py) and further versions re-publish the same files.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import model_store
from bench.serve_process import ServeProcess
from model_store import ModelVersion

REPO = Path(__file__).resolve().parents[1]
MODEL = "cifar10-atop"
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ADMIN_TOKEN = "admin-secret-token"
API_KEY = "client-api-key-1"


def export_tiny(root: Path, work: Path, *, kind: str = "rt2", seed: int = 0) -> ModelVersion:
    """Tiny random classifier + purifier checkpoints, exported into ``root`` as MODEL."""
    from tests.tiny_models import make_checkpoints
    from training import export

    c, p = make_checkpoints(work, kind, num_classes=len(CIFAR10), seed=seed)
    return export.run(export.ExportConfig(str(c), str(p), str(root), name=MODEL, classes=CIFAR10))


def republish(
    root: Path,
    src: ModelVersion,
    *,
    evaluation: dict | None = None,
    only_onnx: bool = False,
    serving: dict | None = None,
) -> ModelVersion:
    """The files of ``src`` published again as the next version in ``root`` (cheap)."""
    draft = dict(src.manifest)  # publish fills schema, name, version, created, files, digest
    files = {f: src.path / f for f in src.manifest["files"]}
    if only_onnx:
        files = {"model.onnx": files["model.onnx"]}
        draft["graph"] = {k: v for k, v in draft["graph"].items() if k != "torchscript"}
    if evaluation is not None:
        draft["evaluation"] = evaluation
    if serving is not None:
        draft["serving"] = serving
    return model_store.publish(root, MODEL, files, draft)


def corrupt(mv: ModelVersion, fname: str = "model.onnx") -> None:
    """Flip one byte in the middle of a published file (they are read-only once published)."""
    f = mv.path / fname
    os.chmod(f, 0o644)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_image(w: int = 32, h: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def png(w: int = 32, h: int = 32, seed: int = 0) -> bytes:
    return encode(noise_image(w, h, seed), "PNG")


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixel data is a 1x1 image's): refusing it
    with 413, not 400, shows the limit was checked before decoding."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), then width, height
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13]))
    data[ihdr + 8 + 13 : ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


class ServiceProcess(ServeProcess):
    """``atop serve`` in a child process run from the repository root; its log goes to a file."""

    def __init__(self, log_path: Path, *args: str):
        super().__init__(log_path, *args, cwd=REPO)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def histogram_buckets(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of an unlabelled histogram: {upper bound: count}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(f'{name}_bucket{{le="'):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out
