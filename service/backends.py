"""Inference backends: numpy batch + sampled randomness in, (logits, raw_logits) out.

Both run the exported pipeline with the RT randomness as explicit inputs (atop.contract), so
the service samples it and seeded requests reproduce. ``run`` is blocking and is called from the
batcher's single worker thread, never from the event loop.

* ONNX Runtime (default, no torch): CUDAExecutionProvider when available (device auto|cuda),
  CPU otherwise; intra/inter-op threads and spinning come from the settings.
* TorchScript (optional, needs torch): ``forward_with(x, noise, masks)`` gives defended logits;
  raw logits come from the exported ``raw_logits(x)`` method when the file has one, else they
  are None and the attack-suspicion signal is reported as unavailable.

``run_views`` returns (logits, raw_logits, transformed, purified): also the graph's image
outputs t(x) [B,C,3,H,W] and g(t(x)) [B,3,H,W] (atop.contract). A backend whose file predates
them has ``has_views = False`` and returns None for both; the batcher and the self-test read
``has_views`` with getattr, so a backend without image outputs need not define either.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from atop import contract

log = logging.getLogger("atop.service")


class BackendError(RuntimeError):
    """The model file cannot be loaded or does not honour the serving contract."""


class Backend(Protocol):
    name: str
    device: str
    has_raw: bool

    def run(
        self, image: np.ndarray, noise: np.ndarray, masks: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]: ...

    def close(self) -> None: ...


class OnnxBackend:
    name = "onnx"

    def __init__(
        self,
        path: Path,
        *,
        device: str = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        spinning: bool = True,
    ):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = inter_op_threads
        so.log_severity_level = 3
        spin = "1" if spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        available = ort.get_available_providers()
        cuda = "CUDAExecutionProvider" in available
        if device == "cuda" and not cuda:
            raise BackendError("device=cuda but onnxruntime has no CUDAExecutionProvider")
        providers = ["CPUExecutionProvider"]
        if cuda and device in ("auto", "cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own exception types for bad files
            raise BackendError(f"{path.name}: ONNX Runtime cannot load it: {e}") from e
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and self.device != "cuda":
            # The provider is installed but could not start (driver, CUDA or cuDNN mismatch); ORT
            # then silently falls back to the CPU. Asked for a GPU: refuse instead of crawling.
            raise BackendError(
                f"{path.name}: device=cuda but the CUDA provider did not start "
                f"(session providers {self.session.get_providers()}); check the CUDA/cuDNN install"
            )
        if device == "auto" and cuda and self.device != "cuda":
            log.warning("CUDA provider available but not used for %s; running on the CPU", path.name)
        inputs = {i.name for i in self.session.get_inputs()}
        wanted = {contract.INPUT_IMAGE, contract.INPUT_NOISE, contract.INPUT_MASKS}
        if inputs != wanted:
            raise BackendError(f"{path.name}: graph inputs are {sorted(inputs)}, expected {sorted(wanted)}")
        outputs = [o.name for o in self.session.get_outputs()]
        if contract.OUTPUT_LOGITS not in outputs:
            raise BackendError(f"{path.name}: graph has no '{contract.OUTPUT_LOGITS}' output")
        self.has_raw = contract.OUTPUT_RAW_LOGITS in outputs
        self.has_views = set(contract.VIEW_OUTPUTS) <= set(outputs)
        self._outputs = [contract.OUTPUT_LOGITS] + ([contract.OUTPUT_RAW_LOGITS] if self.has_raw else [])

    def run(self, image, noise, masks):
        feeds = {contract.INPUT_IMAGE: image, contract.INPUT_NOISE: noise, contract.INPUT_MASKS: masks}
        out = self.session.run(self._outputs, feeds)
        return out[0], (out[1] if self.has_raw else None)

    def run_views(self, image, noise, masks):
        if not self.has_views:
            return (*self.run(image, noise, masks), None, None)
        feeds = {contract.INPUT_IMAGE: image, contract.INPUT_NOISE: noise, contract.INPUT_MASKS: masks}
        out = self.session.run(self._outputs + list(contract.VIEW_OUTPUTS), feeds)
        return out[0], (out[1] if self.has_raw else None), out[-2], out[-1]

    def close(self) -> None:
        self.session = None


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, path: Path, *, device: str = "auto", intra_op_threads: int = 0, **_ignored):
        try:
            import torch
        except ImportError as e:
            raise BackendError(
                "the torchscript backend needs torch (pip install 'atop-defense[torchscript]')"
            ) from e
        self._torch = torch
        if intra_op_threads:
            torch.set_num_threads(intra_op_threads)
        cuda = torch.cuda.is_available()
        if device == "cuda" and not cuda:
            raise BackendError("device=cuda but torch has no CUDA")
        self.device = "cuda" if cuda and device in ("auto", "cuda") else "cpu"
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit; it still works
                warnings.filterwarnings(
                    "ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning
                )
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as e:
            raise BackendError(f"{path.name}: torch.jit.load failed: {e}") from e
        if not hasattr(self.module, "forward_with"):
            raise BackendError(f"{path.name}: TorchScript module has no forward_with(x, noise, masks)")
        self.has_raw = hasattr(self.module, "raw_logits")
        self.has_views = hasattr(self.module, "views_with")

    def run(self, image, noise, masks):
        torch, dev = self._torch, self.device
        with torch.inference_mode():
            x = torch.from_numpy(image).to(dev)
            logits = self.module.forward_with(
                x, torch.from_numpy(noise).to(dev), torch.from_numpy(masks).to(dev)
            )
            raw = self.module.raw_logits(x).float().cpu().numpy() if self.has_raw else None
        return logits.float().cpu().numpy(), raw

    def run_views(self, image, noise, masks):
        if not self.has_views:
            return (*self.run(image, noise, masks), None, None)
        torch, dev = self._torch, self.device
        with torch.inference_mode():
            x = torch.from_numpy(image).to(dev)
            out = self.module.views_with(x, torch.from_numpy(noise).to(dev), torch.from_numpy(masks).to(dev))
            raw = self.module.raw_logits(x) if self.has_raw else None
            logits, transformed, purified = (t.float().cpu().numpy() for t in out)
        return logits, None if raw is None else raw.float().cpu().numpy(), transformed, purified

    def close(self) -> None:
        self.module = None


def graph_file(version_path: Path, manifest: dict, backend: str) -> Path:
    """The file of ``backend`` named by the manifest, inside the version folder."""
    key = "onnx" if backend == "onnx" else "torchscript"
    entry = (manifest.get("graph") or {}).get(key)
    if not entry or not entry.get("file"):
        raise BackendError(f"manifest.json: version has no {key} graph")
    path = version_path / entry["file"]
    if path.parent != version_path:
        raise BackendError(f"manifest.json: graph file {entry['file']!r} must be inside the version folder")
    return path


def load_backend(version_path: Path, manifest: dict, settings) -> Backend:
    """Create the backend chosen by the settings for one store version (blocking)."""
    path = graph_file(version_path, manifest, settings.backend)
    cls = OnnxBackend if settings.backend == "onnx" else TorchScriptBackend
    return cls(
        path,
        device=settings.device,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        spinning=settings.spinning,
    )
