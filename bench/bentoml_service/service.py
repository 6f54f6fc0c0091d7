"""The BentoML peer of ``atop serve``, for bench/peer.py: the same model.onnx, the same work per image.

Runs only inside bench/.venv-bentoml (bentoml, onnxruntime, numpy, pillow; no torch, no project
install): ``bentoml serve service:AtopPeer --working-dir bench/bentoml_service --arg version_dir=...``.

Per image, what ``atop serve`` does for one JPEG with ``samples=1`` (service/decode.py,
service/predict.py, service/backends.py):

* decode: Pillow opens the upload (BentoML's image input), JPEG draft mode at the model size, then
  ``atop.imaging.model_pixels`` (EXIF orientation, to RGB, centred square, bicubic resize), float32
  NCHW in [0, 1];
* randomness: one draw per image from a fresh generator, ``atop.contract.sample_rt(spec, 1, rng)``,
  as the service does for an unseeded request of one image;
* the graph: the same outputs as ``OnnxBackend`` (``logits``, and ``raw_logits`` when present);
* the answer: softmax, top-1 label and probability, and the undefended label (the suspicion signal).

The two numpy/Pillow-only modules are imported from the checkout (never copied), so the pixel
rule and the sampler cannot drift from the service's.

Layout (bench/peer.py passes it with ``--arg``): ``workers`` processes (default 2, one per core:
BentoML's layout for CPU-bound work), each with one ORT intra-op and one inter-op thread and one
API thread, and adaptive batching (``max_batch_size`` 64, ``max_latency_ms`` 10000 = atop's
default deadline).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from atop import contract  # noqa: E402 (numpy only; needs the path above)
from atop.imaging import model_pixels  # noqa: E402 (numpy + Pillow)


class PeerArgs(BaseModel):
    """``bentoml serve --arg key=value``; frozen, read once per process."""

    model_config = ConfigDict(frozen=True)
    version_dir: str  # a store version folder: manifest.json + the ONNX graph it names
    workers: int = 2
    max_batch_size: int = 64
    max_latency_ms: int = 10000


ARGS = bentoml.use_arguments(PeerArgs)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@bentoml.service(workers=ARGS.workers, threads=1, name="atop_peer")
class AtopPeer:
    def __init__(self) -> None:
        import onnxruntime as ort

        version = Path(ARGS.version_dir)
        manifest = json.loads((version / "manifest.json").read_text())
        self.spec = manifest["rt"]
        self.size = int(self.spec["image_size"])
        self.classes = list(manifest["classes"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1  # one core per worker process; the workers are the parallelism
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        graph = version / manifest["graph"]["onnx"]["file"]
        self.session = ort.InferenceSession(str(graph), sess_options=so, providers=["CPUExecutionProvider"])
        names = [o.name for o in self.session.get_outputs()]
        self.outputs = [contract.OUTPUT_LOGITS] + (
            [contract.OUTPUT_RAW_LOGITS] if contract.OUTPUT_RAW_LOGITS in names else []
        )

    def pixels(self, im: Image.Image) -> np.ndarray:
        if im.format == "JPEG":
            im.draft("RGB", (self.size, self.size))
        im.load()
        return model_pixels(im, self.size).transpose(2, 0, 1)

    @bentoml.api(
        route="/classify",
        batchable=True,
        max_batch_size=ARGS.max_batch_size,
        max_latency_ms=ARGS.max_latency_ms,
    )
    def classify(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        x = np.stack([self.pixels(im) for im in images]).astype(np.float32) / 255.0
        draws = [contract.sample_rt(self.spec, 1, np.random.default_rng()) for _ in images]
        noise = np.concatenate([d[0] for d in draws])
        masks = np.concatenate([d[1] for d in draws])
        feeds = {contract.INPUT_IMAGE: x, contract.INPUT_NOISE: noise, contract.INPUT_MASKS: masks}
        out = self.session.run(self.outputs, feeds)
        probs = softmax(out[0])
        raw = softmax(out[1]) if len(out) > 1 else None
        answers = []
        for i, p in enumerate(probs):
            best = int(np.argmax(p))
            a = {"label": self.classes[best], "class_index": best, "probability": float(p[best])}
            if raw is not None:
                a["undefended_label"] = self.classes[int(np.argmax(raw[i]))]
            answers.append(a)
        return answers
