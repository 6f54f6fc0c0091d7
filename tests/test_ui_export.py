"""The graph's image outputs (atop.contract): ``transformed`` t(x) and ``purified`` g(t(x)).

ONNX Runtime, TorchScript ``views_with`` and eager torch agree on the same seeded draw (RT2 and
RT3), the manifest declares exactly what the session returns, the schema refuses a wrong shape,
a skewed image output fails the export's parity check, and a graph exported before the outputs
existed still loads (without them).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

import model_store
from atop import contract
from service.backends import OnnxBackend, TorchScriptBackend
from tests import service_fixtures as sf
from tests.tiny_models import load_pipeline, make_checkpoints
from tests.ui_fixtures import strip_views
from training import export
from training.export import convert
from training.purifier import purify
from training.transforms import apply_rt

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def rt3(tmp_path_factory):
    base = tmp_path_factory.mktemp("views-rt3")
    c, p = make_checkpoints(base / "ck", "rt3", num_classes=len(sf.CIFAR10), seed=3)
    cfg = export.ExportConfig(str(c), str(p), str(base / "store"), name=sf.MODEL, classes=sf.CIFAR10)
    return export.run(cfg), c, p, cfg


def eager_views(pipeline, x, noise, masks):
    xt, nt, mt = (torch.from_numpy(a) for a in (x, noise, masks))
    with torch.no_grad():
        transformed = apply_rt(xt, nt, mt, pipeline.noise_std)[:, :, :3]
        purified = purify(pipeline.purifier, xt, nt, mt, pipeline.noise_std)
        return pipeline(xt, nt, mt).numpy(), transformed.numpy(), purified.numpy()


def check_parity(mv, c, p):
    pipeline = load_pipeline(c, p)
    spec = mv.manifest["rt"]
    sess = ort.InferenceSession(str(mv.path / "model.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(mv.path / "model.pt"))
    rng = np.random.default_rng(99)
    for b in (1, 4):
        x = rng.random((b, 3, 32, 32), dtype=np.float32)
        noise, masks = contract.sample_rt(spec, b, rng)
        logits, transformed, purified = eager_views(pipeline, x, noise, masks)
        copies = contract.rt_copies(spec)
        assert transformed.shape == (b, copies, 3, 32, 32) and purified.shape == (b, 3, 32, 32)
        assert np.all(transformed[np.broadcast_to(masks, transformed.shape) > 0] == 0)  # holes at 0
        assert np.abs(purified - x).max() > 1e-3  # a real purification, not the input
        out = sess.run(["logits", *contract.VIEW_OUTPUTS], {"image": x, "noise": noise, "masks": masks})
        with torch.no_grad():
            ts = [t.numpy() for t in scripted.views_with(*(torch.from_numpy(a) for a in (x, noise, masks)))]
        for got in (out, ts):
            np.testing.assert_allclose(got[0], logits, atol=1e-4)
            np.testing.assert_allclose(got[1], transformed, atol=1e-5)
            np.testing.assert_allclose(got[2], purified, atol=1e-5)


def test_image_outputs_agree_onnx_torchscript_eager_rt2(tiny_version, tmp_path):
    # the session's tiny export: rebuild its checkpoints (same seed) to get the eager pipeline
    c, p = make_checkpoints(tmp_path, "rt2", num_classes=len(sf.CIFAR10), seed=0)
    check_parity(tiny_version, c, p)


def test_image_outputs_agree_onnx_torchscript_eager_rt3(rt3):
    mv, c, p, _ = rt3
    check_parity(mv, c, p)
    parity = mv.manifest["graph"]["parity"]["max_abs_diff"]
    for fmt in ("onnx", "torchscript"):
        for name in contract.VIEW_OUTPUTS:
            assert parity[f"{fmt}_{name}"] <= 1e-4  # the export checked them too


def test_manifest_declares_the_image_outputs_the_session_returns(tiny_version, rt3):
    for mv in (tiny_version, rt3[0]):
        m = model_store.verify(mv.path)
        declared = {t["name"]: t["shape"] for t in m["graph"]["onnx"]["outputs"]}
        sess = ort.InferenceSession(str(mv.path / "model.onnx"), providers=["CPUExecutionProvider"])
        assert declared == {o.name: o.shape for o in sess.get_outputs()}
        assert declared[contract.OUTPUT_TRANSFORMED] == contract.view_shapes(m["rt"])["transformed"]
        assert "views_with" in m["graph"]["torchscript"]["methods"]
    assert rt3[0].manifest["graph"]["onnx"]["outputs"][2]["shape"] == ["B", 4, 3, 32, 32]


def test_schema_refuses_a_wrong_image_output_shape(tiny_version, tmp_path):
    draft = json.loads(json.dumps(tiny_version.manifest))
    outs = draft["graph"]["onnx"]["outputs"]
    next(o for o in outs if o["name"] == "purified")["shape"] = ["B", 3, 16, 16]
    files = {f: tiny_version.path / f for f in draft["files"]}
    with pytest.raises(model_store.StoreError, match="purified must have shape"):
        model_store.publish(tmp_path, sf.MODEL, files, draft)
    draft["graph"]["onnx"]["outputs"] = outs[:2]  # an old manifest without them is valid
    assert model_store.publish(tmp_path, sf.MODEL, files, draft).version == 1


def test_a_skewed_image_output_fails_parity_and_publishes_nothing(rt3, monkeypatch):
    forward = convert.OnnxPipeline.forward

    def skewed(self, image, noise, masks):
        logits, raw, transformed, purified = forward(self, image, noise, masks)
        return logits, raw, transformed, purified * 0.99

    monkeypatch.setattr(convert.OnnxPipeline, "forward", skewed)
    cfg = replace(rt3[3], name="skewed-views", formats=("onnx",))
    with pytest.raises(ValueError, match="onnx_purified"):
        export.run(cfg)
    assert model_store.list_versions(cfg.store, "skewed-views") == []


def test_backends_return_the_views_and_an_old_graph_loads_without_them(tiny_version, tmp_path):
    onnx_be = OnnxBackend(tiny_version.path / "model.onnx", intra_op_threads=1, spinning=False)
    ts_be = TorchScriptBackend(tiny_version.path / "model.pt")
    rng = np.random.default_rng(5)
    x = rng.random((3, 3, 32, 32), dtype=np.float32)
    noise, masks = contract.sample_rt(tiny_version.manifest["rt"], 3, rng)
    a, b = onnx_be.run_views(x, noise, masks), ts_be.run_views(x, noise, masks)
    assert onnx_be.has_views and ts_be.has_views
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, atol=1e-4)
    np.testing.assert_array_equal(a[0], onnx_be.run(x, noise, masks)[0])
    old = strip_views(tiny_version, tmp_path / "old")
    model_store.verify(old.path)
    old_be = OnnxBackend(old.path / "model.onnx", intra_op_threads=1, spinning=False)
    logits, raw, transformed, purified = old_be.run_views(x, noise, masks)
    assert not old_be.has_views and transformed is None and purified is None and raw is not None
    np.testing.assert_allclose(logits, a[0], atol=1e-6)
