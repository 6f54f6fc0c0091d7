"""The conversion behind ``atop export``: a defended pipeline -> ONNX and TorchScript files, and
the parity check that gates their publication.

Two formats of the same defended pipeline f(g(t(x))):

* ONNX (the serving format). Deterministic: the randomness of t comes in as graph inputs
  ``noise`` (standard normal) and ``masks`` (1 = missing), drawn by the caller with
  ``atop.contract.sample_rt`` from the manifest's RT spec (atop/contract.py). A second output,
  ``raw_logits`` = f(x), feeds the service's attack-suspicion signal. Exported with the
  torch.export-based exporter (``dynamo=True``, the default and the maintained one since torch
  2.9; the TorchScript-based one is deprecated), dynamic batch axis, weights inside the file.
* TorchScript ``model.pt``: ``forward(x)`` draws its own randomness (torch.randn/torch.rand,
  same rules as training.transforms) and is differentiable end to end, so anyone can attack
  the deployed pipeline with ``torch.jit.load`` and their own tools. ``forward_with(x, noise,
  masks)`` takes explicit randomness. torch 2.13 warns that torch.jit is deprecated; it still
  works, and ``torch.export`` is the forward-looking replacement (docs/model-store.md).

Nothing is published unless eager torch, TorchScript and ONNX Runtime agree to ``--tolerance``
on the same inputs and the same seeded draw.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from atop import contract
from training.checkpoint import quiet_jit
from training.export.manifest import ONNX_FILE, TORCHSCRIPT_FILE
from training.purifier import DefendedPipeline, NoPurifier, purify
from training.transforms import RTSpec, apply_rt, combine_copies

log = logging.getLogger("atop.export")


class OnnxPipeline(nn.Module):
    """(image, noise, masks) -> (logits, raw_logits, transformed, purified): the graph the
    service runs (outputs as in atop/contract.py; the images cost no extra compute)."""

    def __init__(self, pipeline: DefendedPipeline):
        super().__init__()
        self.pipeline = pipeline
        # A classifier that defends on its own (``--purifier none``: no purifier, the identity
        # RT): g(t(x)) is x for every draw the RT spec can produce (no noise, no block missing),
        # so f(g(t(x))) and f(x) are one computation. The graph then runs f once and answers
        # ``raw_logits`` with the same tensor, instead of paying for f twice on every request.
        self.identity = is_identity_defense(pipeline)

    def forward(self, image, noise, masks) -> tuple[torch.Tensor, ...]:
        p = self.pipeline
        purified = purify(p.purifier, image, noise, masks, p.noise_std)
        transformed = apply_rt(image, noise, masks, p.noise_std)[:, :, :3]
        logits = p.classifier(purified)
        return logits, logits if self.identity else p.classifier(image), transformed, purified


def is_identity_defense(pipeline: DefendedPipeline) -> bool:
    """No purifier and an RT that changes nothing: the pipeline is f(x) for every draw."""
    spec = pipeline.spec
    return (
        isinstance(pipeline.purifier, NoPurifier)
        and spec.kind == "rt1"
        and spec.missing == 0.0
        and pipeline.noise_std == 0.0
    )


class ScriptedPipeline(nn.Module):
    """The pipeline for torch.jit.script; it carries the RT spec as plain numbers."""

    def __init__(self, purifier: nn.Module, classifier: nn.Module, spec: RTSpec):
        super().__init__()
        self.purifier, self.classifier = purifier, classifier
        self.noise_std = float(spec.noise_std) if spec.kind != "rt1" else 0.0
        self.block, self.grid = spec.block, spec.image_size // spec.block
        self.copies, self.partition = spec.copies, spec.kind == "rt3"
        self.num_missing = round(spec.missing * spec.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Defended logits for images in [0,1], with a fresh draw of the randomness."""
        return self.forward_with(x, torch.randn_like(x), self.sample_masks(x.shape[0], x.device))

    @torch.jit.export
    def sample_masks(self, batch: int, device: torch.device) -> torch.Tensor:
        """[B, C, 1, H, W], 1 = missing: exactly num_missing blocks (RT1/2), a partition (RT3)."""
        ranks = torch.rand(batch, self.grid * self.grid, device=device).argsort(1).argsort(1)
        if self.partition:
            groups = torch.arange(self.copies, device=device).view(1, -1, 1)
            m = (ranks.unsqueeze(1) % self.copies == groups).float()
        else:
            m = (ranks < self.num_missing).float().unsqueeze(1)
        m = m.view(batch, self.copies, 1, self.grid, self.grid)
        return m.repeat_interleave(self.block, 3).repeat_interleave(self.block, 4)

    @torch.jit.export
    def forward_with(self, x: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Defended logits for a given draw (noise standard normal, masks 1 = missing)."""
        inp = apply_rt(x, noise, masks, self.noise_std)
        b, c = inp.shape[0], inp.shape[1]
        restored = self.purifier(inp.flatten(0, 1)).view(b, c, x.shape[1], x.shape[2], x.shape[3])
        return self.classifier(combine_copies(restored, masks))

    @torch.jit.export
    def raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The undefended classifier f(x)."""
        return self.classifier(x)

    @torch.jit.export
    def views_with(
        self, x: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(defended logits, transformed t(x) [B,C,3,H,W], purified g(t(x)) [B,3,H,W]) for a
        given draw: the ONNX graph's image outputs (atop/contract.py)."""
        inp = apply_rt(x, noise, masks, self.noise_std)
        b, c = inp.shape[0], inp.shape[1]
        restored = self.purifier(inp.flatten(0, 1)).view(b, c, x.shape[1], x.shape[2], x.shape[3])
        purified = combine_copies(restored, masks)
        return self.classifier(purified), inp[:, :, :3], purified


@contextlib.contextmanager
def _quiet():
    """Silence known noise: torch.jit's deprecation warnings (we know; see the module doc), the
    exporter's axis-name and pytree warnings, and the exporter's INFO/WARNING log chatter."""
    # torch.onnx warns "torchvision is not installed. Skipping torchvision::roi_align" and such.
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    with quiet_jit(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name: B will not be used.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        for lg in loggers:
            lg.setLevel(max(lg.level, logging.ERROR if lg.name == "torch.onnx" else logging.WARNING))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def export_onnx(pipeline: DefendedPipeline, path: Path, opset: int) -> None:
    s = pipeline.spec.image_size
    args = (torch.rand(2, 3, s, s), torch.randn(2, 3, s, s), torch.zeros(2, pipeline.spec.copies, 1, s, s))
    batch = torch.export.Dim("B", min=1)
    names = [contract.INPUT_IMAGE, contract.INPUT_NOISE, contract.INPUT_MASKS]
    chatter = io.StringIO()  # the exporter prints its progress to stdout
    with _quiet(), contextlib.redirect_stdout(chatter):
        torch.onnx.export(
            OnnxPipeline(pipeline).eval(),
            args,
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=[contract.OUTPUT_LOGITS, contract.OUTPUT_RAW_LOGITS, *contract.VIEW_OUTPUTS],
            dynamic_shapes={"image": {0: batch}, "noise": {0: batch}, "masks": {0: batch}},
            external_data=False,
        )
    log.debug("onnx exporter: %s", chatter.getvalue().strip())


def export_torchscript(pipeline: DefendedPipeline, path: Path) -> None:
    module = ScriptedPipeline(pipeline.purifier, pipeline.classifier, pipeline.spec).eval()
    with _quiet():
        torch.jit.save(torch.jit.script(module), str(path))
    log.info("TorchScript written (torch.jit is deprecated in torch 2.13 but still supported)")


def check_parity(pipeline: DefendedPipeline, files: dict[str, Path], seed: int, tol: float) -> dict:
    """Max |logits difference| of each exported file against eager torch on one seeded draw
    (batches of 1 and 3, so the dynamic batch axis is exercised). Raises ValueError past tol."""
    rng = np.random.default_rng(seed)
    s = pipeline.spec.image_size
    sess = ort.InferenceSession(str(files[ONNX_FILE]), providers=["CPUExecutionProvider"])
    with _quiet():
        scripted = torch.jit.load(str(files[TORCHSCRIPT_FILE])) if TORCHSCRIPT_FILE in files else None
    views = [f"{fmt}_{name}" for fmt in ("onnx", "torchscript") for name in contract.VIEW_OUTPUTS]
    diffs = {"onnx": 0.0, "onnx_raw": 0.0} | ({"torchscript": 0.0} if scripted is not None else {})
    diffs |= {k: 0.0 for k in views if scripted is not None or k.startswith("onnx")}

    def worst(key: str, got, want) -> None:
        diffs[key] = max(diffs[key], float(np.abs(np.asarray(got) - np.asarray(want)).max()))

    references = []  # eager logits per batch: the service replays this draw as a known answer
    for b in (1, 3):
        x = rng.random((b, 3, s, s), dtype=np.float32)
        noise, masks = contract.sample_rt(pipeline.spec.to_dict(), b, rng)
        xt, nt, mt = (torch.from_numpy(a) for a in (x, noise, masks))
        with torch.no_grad():
            ref, raw = pipeline(xt, nt, mt).numpy(), pipeline.classifier(xt).numpy()
            images = {  # eager t(x) and g(t(x)) for the image outputs
                contract.OUTPUT_TRANSFORMED: apply_rt(xt, nt, mt, pipeline.noise_std)[:, :, :3].numpy(),
                contract.OUTPUT_PURIFIED: purify(pipeline.purifier, xt, nt, mt, pipeline.noise_std).numpy(),
            }
            if scripted is not None:
                worst("torchscript", scripted.forward_with(xt, nt, mt), ref)
                ts_logits, *ts_images = scripted.views_with(xt, nt, mt)
                worst("torchscript", ts_logits, ref)
                for name, got in zip(contract.VIEW_OUTPUTS, ts_images, strict=True):
                    worst(f"torchscript_{name}", got, images[name])
        out, out_raw, *out_images = sess.run(
            [contract.OUTPUT_LOGITS, contract.OUTPUT_RAW_LOGITS, *contract.VIEW_OUTPUTS],
            {contract.INPUT_IMAGE: x, contract.INPUT_NOISE: noise, contract.INPUT_MASKS: masks},
        )
        references.append(ref.tolist())
        worst("onnx", out, ref)
        worst("onnx_raw", out_raw, raw)
        for name, got in zip(contract.VIEW_OUTPUTS, out_images, strict=True):
            worst(f"onnx_{name}", got, images[name])
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    if bad:
        raise ValueError(f"parity check failed (tolerance {tol}): max abs difference {bad}; not published")
    log.info("parity vs eager torch: %s", {k: f"{v:.2e}" for k, v in diffs.items()})
    return {
        "tolerance": tol,
        "seed": seed,
        "batches": [1, 3],
        "max_abs_diff": diffs,
        "reference_logits": references,
    }
