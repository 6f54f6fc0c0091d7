"""``atop export`` on tiny random models: eager torch, TorchScript and ONNX Runtime agree on the
same seeded randomness (RT2 and RT3), the TorchScript file stands alone and is differentiable,
and the published version verifies and describes its graph exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import model_store
from atop import contract
from atop.cli import main as atop
from tests.tiny_models import load_pipeline, make_checkpoints
from training import export
from training.export import convert
from training.transforms import RTSpec

CLASSES = ("cat", "dog", "frog")
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """One published version per RT kind: rt2 through the CLI, rt3 through the Python API."""
    base = tmp_path_factory.mktemp("export")
    store = base / "store"
    data = base / "data"
    data.mkdir()
    (data / "train.tar.gz").write_bytes(b"pretend archive")
    (base / "eval.json").write_text(json.dumps({"clean_accuracy": 0.5, "n_images": 8, "robust": []}))
    out = {}
    c2, p2 = make_checkpoints(base / "rt2", "rt2", num_classes=len(CLASSES))
    argv = ["export", "--classifier", str(c2), "--purifier", str(p2), "--store", str(store)]
    argv += ["--name", "tiny-rt2", "--classes", ",".join(CLASSES), "--data", str(data)]
    assert atop([*argv, "--evaluation", str(base / "eval.json")]) == 0
    out["rt2"] = (model_store.get_version(store, "tiny-rt2"), c2, p2)
    # The rt3 version's classifier is a mirror-averaged ensemble of both architectures, so
    # parity covers every classifier op.
    c3, p3 = make_checkpoints(base / "rt3", "rt3", num_classes=len(CLASSES), arch="ensemble")
    cfg = export.ExportConfig(str(c3), str(p3), str(store), name="tiny-rt3", classes=CLASSES)
    out["rt3"] = (export.run(cfg), c3, p3)
    out["store"], out["cfg"] = store, cfg
    return out


@pytest.mark.parametrize("kind", ["rt2", "rt3"])
def test_parity_eager_torchscript_onnx(exported, kind):
    mv, c, p = exported[kind]
    pipeline = load_pipeline(c, p)
    assert pipeline.spec.kind == kind and mv.manifest["rt"]["kind"] == kind
    sess = ort.InferenceSession(str(mv.path / "model.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(mv.path / "model.pt"))
    rng = np.random.default_rng(123)
    for b in (1, 5):
        x = rng.random((b, 3, 32, 32), dtype=np.float32)
        noise, masks = contract.sample_rt(mv.manifest["rt"], b, rng)
        assert masks.shape == (b, contract.rt_copies(mv.manifest["rt"]), 1, 32, 32)
        xt, nt, mt = (torch.from_numpy(a) for a in (x, noise, masks))
        with torch.no_grad():
            eager, raw = pipeline(xt, nt, mt).numpy(), pipeline.classifier(xt).numpy()
            ts = scripted.forward_with(xt, nt, mt).numpy()
            ts_raw = scripted.raw_logits(xt).numpy()
        onnx, onnx_raw = sess.run(["logits", "raw_logits"], {"image": x, "noise": noise, "masks": masks})
        assert eager.shape == (b, len(CLASSES)) and np.abs(eager).max() > 1e-3
        assert np.abs(ts - eager).max() <= 1e-4
        assert np.abs(onnx - eager).max() <= 1e-4
        assert np.abs(ts_raw - raw).max() <= 1e-4 and np.abs(onnx_raw - raw).max() <= 1e-4
        assert np.abs(onnx - onnx_raw).max() > 1e-6  # the defense really sits in the graph


TORCHSCRIPT_ALONE = """
import sys, torch
m = torch.jit.load(sys.argv[1])
x = torch.rand(2, 3, 32, 32, requires_grad=True)
a = m(x)
a.sum().backward()
g = x.grad
assert a.shape == (2, 3) and g is not None and g.shape == x.shape
assert torch.isfinite(g).all() and g.abs().sum() > 0, "no gradient reached the input"
with torch.no_grad():
    assert not torch.equal(m(x), m(x)), "two calls gave identical logits: no fresh randomness"
loaded = [k for k in sys.modules if k.split(".")[0] in ("training", "atop", "model_store")]
assert not loaded, loaded
print("ok")
"""


def test_torchscript_loads_alone_is_differentiable_and_random(exported, tmp_path):
    mv = exported["rt3"][0]
    res = subprocess.run(
        [sys.executable, "-c", TORCHSCRIPT_ALONE, str(mv.path / "model.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.parametrize("kind", ["rt2", "rt3"])
def test_torchscript_samples_masks_by_the_training_rules(exported, kind):
    scripted = torch.jit.load(str(exported[kind][0].path / "model.pt"))
    spec = RTSpec.from_dict({k: v for k, v in exported[kind][0].manifest["rt"].items() if k != "sampler"})
    m = scripted.sample_masks(6, torch.device("cpu"))
    assert m.shape == (6, spec.copies, 1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    if kind == "rt3":
        assert torch.equal(m.sum(1), torch.ones(6, 1, 32, 32))  # a partition: missing exactly once
        assert (m.sum((2, 3, 4)) == 32 * 32 / spec.num_masks).all()
    else:
        want = round(spec.missing * spec.blocks) * spec.block**2
        assert (m.sum((1, 2, 3, 4)) == want).all()
    assert not torch.equal(m, scripted.sample_masks(6, torch.device("cpu")))


def test_published_version_verifies_and_describes_the_graph(exported):
    for kind in ("rt2", "rt3"):
        mv = exported[kind][0]
        m = model_store.verify(mv.path)
        assert sorted(m["files"]) == ["model.onnx", "model.pt"] and m["classes"] == list(CLASSES)
        sess = ort.InferenceSession(str(mv.path / "model.onnx"), providers=["CPUExecutionProvider"])
        declared = {t["name"]: t["shape"] for t in m["graph"]["onnx"]["inputs"]}
        actual = {i.name: i.shape for i in sess.get_inputs()}
        assert declared == actual  # dynamic batch is called "B" in both
        outs = {t["name"]: t["shape"] for t in m["graph"]["onnx"]["outputs"]}
        assert outs == {o.name: o.shape for o in sess.get_outputs()}
        assert m["graph"]["onnx"]["opset"] >= 17 and m["graph"]["parity"]["max_abs_diff"]["onnx"] <= 1e-4
        assert m["rt"]["sampler"] == contract.RT_SAMPLER and m["graph"]["torchscript"]["file"] == "model.pt"
        recipe = m["provenance"]["recipe"]
        assert recipe["purifier"]["config"]["rt"]["kind"] == kind and recipe["classifier"]["step"] == 10
        assert m["provenance"]["seeds"]["classifier"] == 1 and m["provenance"]["seeds"]["purifier"] == 2
    rt2 = exported["rt2"][0].manifest
    assert rt2["evaluation"]["clean_accuracy"] == 0.5 and rt2["serving"] == {"samples": 1}
    assert rt2["provenance"]["data"]["checksum"].startswith("sha256:")
    assert "train.tar.gz" in rt2["provenance"]["data"]["files"]
    assert exported["rt3"][0].manifest["provenance"]["data"] is None


def test_export_again_makes_a_new_version(exported):
    cfg = replace(exported["cfg"], rt="rt2", noise_std=0.0, formats=("onnx",), samples=4)
    mv = export.run(cfg)
    assert mv.manifest["serving"] == {"samples": 4}
    assert mv.version == 2 and exported["rt3"][0].version == 1
    assert sorted(mv.manifest["files"]) == ["model.onnx"] and "torchscript" not in mv.manifest["graph"]
    assert mv.manifest["rt"]["kind"] == "rt2" and mv.manifest["rt"]["noise_std"] == 0.0
    sess = ort.InferenceSession(str(mv.path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "noise", "masks"]  # noise kept, though unused
    model_store.verify(mv.path)
    model_store.verify(exported["rt3"][0].path)


def test_parity_failure_publishes_nothing(exported, monkeypatch):
    forward = convert.OnnxPipeline.forward

    def skewed(self, image, noise, masks):
        logits, *rest = forward(self, image, noise, masks)
        return logits + 1e-3, *rest

    monkeypatch.setattr(convert.OnnxPipeline, "forward", skewed)
    before = model_store.list_versions(exported["store"])
    with pytest.raises(ValueError, match="parity check failed"):
        export.run(replace(exported["cfg"], name="skewed"))
    assert model_store.list_versions(exported["store"]) == before


def test_bad_export_arguments_are_one_line_errors(exported, tmp_path):
    cfg = exported["cfg"]
    with pytest.raises(ValueError, match="must include onnx"):
        export.run(replace(cfg, formats=("torchscript",)))
    with pytest.raises(ValueError, match="3 classes"):
        export.run(replace(cfg, classes=("a", "b")))
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"clean_accuracy": 1.5}))
    with pytest.raises(ValueError, match="eval.json: clean_accuracy"):
        export.run(replace(cfg, evaluation=str(bad), name="bad-eval", formats=("onnx",)))
    assert model_store.list_versions(exported["store"], "bad-eval") == []
    argv = ["export", "--classifier", cfg.purifier, "--purifier", cfg.purifier, "--store", str(tmp_path)]
    assert atop(argv) == 2  # a purifier checkpoint given as the classifier: no traceback


def test_flipped_byte_in_an_exported_file_is_named(exported, tmp_path):
    src = exported["rt2"][0].path
    for fname in ("model.onnx", "model.pt", "manifest.json"):
        copy = tmp_path / fname / "tiny-rt2" / "1"
        shutil.copytree(src, copy)
        target = copy / fname
        target.chmod(0o644)
        data = bytearray(target.read_bytes())
        data[len(data) // 3] ^= 0x04
        target.write_bytes(bytes(data))
        with pytest.raises(model_store.StoreError) as e:
            model_store.verify(copy)
        assert str(target) in str(e.value)


def test_classifier_alone_exports_serves_and_loads_back(exported, tmp_path):
    """--purifier none: the graph is f(x) exactly (identity RT, no purifier), for any draw; the
    manifest says so; the classifier can be rebuilt from the published version alone."""
    from training.classifier import load_classifier

    _, c, _ = exported["rt2"]
    store = tmp_path / "store"
    argv = ["export", "--classifier", str(c), "--purifier", "none", "--store", str(store)]
    assert atop([*argv, "--name", "tiny-alone", "--classes", ",".join(CLASSES)]) == 0
    mv = model_store.get_version(store, "tiny-alone")
    m = mv.manifest
    assert (
        m["rt"]["kind"] == "rt1"
        and m["rt"]["missing"] == 0.0
        and m["provenance"]["recipe"]["purifier"] is None
    )
    assert "f(x)" in m["graph"]["onnx"]["outputs"][0]["description"]
    f = load_classifier(c)
    rng = np.random.default_rng(3)
    x = rng.random((3, 3, 32, 32), dtype=np.float32)
    noise, masks = contract.sample_rt(m["rt"], 3, rng)
    assert masks.sum() == 0
    sess = ort.InferenceSession(str(mv.path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, raw = sess.run(["logits", "raw_logits"], {"image": x, "noise": noise, "masks": masks})
    with torch.no_grad():
        ref = f(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    np.testing.assert_allclose(raw, ref, atol=1e-4)
    # f(g(t(x))) is f(x) for every draw, so the graph runs f once and answers raw_logits with the
    # same tensor: as many Conv nodes as f has convolutions, not twice as many.
    assert np.array_equal(raw, logits)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in f.modules())
    graph = onnx.load(str(mv.path / "model.onnx")).graph
    assert sum(n.op_type == "Conv" for n in graph.node) == convs
    rebuilt = load_classifier(mv.path)
    with torch.no_grad():
        assert torch.equal(rebuilt(torch.from_numpy(x)), torch.from_numpy(ref))
    with pytest.raises(ValueError, match="do not apply"):
        export.run(
            export.ExportConfig(str(c), "none", str(store), name="tiny-alone", rt="rt2", classes=CLASSES)
        )
