"""The model store without torch: publish is atomic and never overwrites, verify catches any
flipped byte and names the file, the manifest schema round-trips, and the CLI reports in one
line. Model files here are opaque bytes; tests/test_export.py publishes real exports."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import model_store
from atop.cli import main as atop
from atop.contract import MANIFEST_SCHEMA, RT_SAMPLER
from model_store import store as store_mod
from model_store.manifest import Manifest, canonical_bytes, manifest_digest, validate

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "frog"]


def draft(kind: str = "rt2", classes: list[str] = CLASSES, torchscript: bool = True) -> dict:
    """A manifest draft as ``atop export`` builds it (everything but what publish fills in)."""
    c = 4 if kind == "rt3" else 1

    def t(name, shape):
        return {"name": name, "shape": shape, "dtype": "float32", "description": name}

    graph = {
        "onnx": {
            "file": "model.onnx",
            "opset": 18,
            "inputs": [
                t("image", ["B", 3, 32, 32]),
                t("noise", ["B", 3, 32, 32]),
                t("masks", ["B", c, 1, 32, 32]),
            ],
            "outputs": [t("logits", ["B", len(classes)]), t("raw_logits", ["B", len(classes)])],
        }
    }
    if torchscript:
        graph["torchscript"] = {"file": "model.pt"}
    return {
        "classes": list(classes),
        "input": {"shape": [3, 32, 32], "dtype": "float32", "range": [0.0, 1.0], "layout": "NCHW"},
        "rt": {
            "kind": kind,
            "noise_std": 0.0625,
            "block": 4,
            "missing": 0.25,
            "num_masks": 4,
            "image_size": 32,
            "sampler": RT_SAMPLER,
        },
        "graph": graph,
        "provenance": {
            "data": None,
            "recipe": {"classifier": {}, "purifier": {}},
            "git_commit": "x",
            "seeds": {},
        },
        "evaluation": {
            "clean_accuracy": 0.875,
            "n_images": 10000,
            "robust": [
                {
                    "attack": "apgd-ce",
                    "eps": 8 / 255,
                    "steps": 100,
                    "eot": 20,
                    "n_images": 512,
                    "accuracy": 0.5,
                }
            ],
        },
    }


@pytest.fixture
def model_files(tmp_path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    files = {"model.onnx": src / "model.onnx", "model.pt": src / "model.pt"}
    for i, p in enumerate(files.values()):
        p.write_bytes(bytes(range(256)) * 8 + bytes([i]))
    return files


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "store"


def _flip(path: Path, pos: int, mask: int = 0x01) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


def test_publish_then_verify(root, model_files):
    mv = model_store.publish(root, "m", model_files, draft())
    assert (mv.name, mv.version, mv.path) == ("m", 1, root / "m" / "1")
    m = model_store.verify(mv.path)
    assert m == mv.manifest
    assert m["schema"] == MANIFEST_SCHEMA and m["created"].endswith("Z")
    assert m["files"]["model.onnx"]["size"] == model_files["model.onnx"].stat().st_size
    assert sorted(p.name for p in mv.path.iterdir()) == ["manifest.json", "model.onnx", "model.pt"]
    assert not any(p.name.startswith(".") for p in (root / "m").iterdir())  # temp folder gone
    assert [(v.name, v.version) for v in model_store.list_versions(root)] == [("m", 1)]


def test_versions_are_immutable(root, model_files):
    first = model_store.publish(root, "m", model_files, draft())
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    second = model_store.publish(root, "m", model_files, draft())
    assert second.version == 2
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    assert all(p.stat().st_mode & 0o222 == 0 for p in first.path.iterdir())  # read-only files
    assert model_store.get_version(root, "m").version == 2


@pytest.mark.parametrize("fname", ["model.onnx", "model.pt", "manifest.json"])
def test_flipping_any_byte_is_caught_and_named(root, model_files, fname):
    mv = model_store.publish(root, "m", model_files, draft())
    path = mv.path / fname
    original = path.read_bytes()
    n = len(original)
    positions = sorted({0, 1, n // 2, n - 2, n - 1} | set(range(0, n, max(1, n // 97))))
    for pos in positions:
        for mask in (0x01, 0x80):
            _flip(path, pos, mask)
            with pytest.raises(model_store.StoreError) as e:
                model_store.verify(mv.path)
            assert str(path) in str(e.value), (pos, mask, str(e.value))
            path.write_bytes(original)
    model_store.verify(mv.path)


def test_extra_missing_and_misplaced_files_are_refused(root, model_files):
    mv = model_store.publish(root, "m", model_files, draft())
    extra = mv.path / "notes.txt"
    extra.write_text("hi")
    with pytest.raises(model_store.StoreError, match="notes.txt: not listed"):
        model_store.verify(mv.path)
    extra.unlink()
    (mv.path / "model.pt").unlink()
    with pytest.raises(model_store.StoreError, match="model.pt: listed in the manifest but missing"):
        model_store.verify(mv.path)
    (mv.path / "manifest.json").unlink()
    with pytest.raises(model_store.StoreError, match="manifest.json: missing"):
        model_store.verify(mv.path)
    good = model_store.publish(root, "m", model_files, draft())
    os.rename(good.path, root / "m" / "7")  # a copied folder must not pass as another version
    with pytest.raises(model_store.StoreError, match="says m/2 but lies in m/7"):
        model_store.verify(root / "m" / "7")


def _rewrite(path: Path, manifest: dict) -> None:
    """Write a modified manifest with a valid digest and layout (a careful tamperer)."""
    manifest["manifest_sha256"] = manifest_digest(manifest)
    mf = path / "manifest.json"
    os.chmod(mf, 0o644)
    mf.write_bytes(canonical_bytes(manifest))


def test_unknown_schema_and_invalid_manifests_are_refused(root, model_files):
    mv = model_store.publish(root, "m", model_files, draft())
    for change, message in [
        (lambda m: m.update(schema="atop-manifest/2"), "unknown schema 'atop-manifest/2'"),
        (lambda m: m.pop("schema"), "unknown schema None"),
        (lambda m: m.pop("classes"), "classes: Field required"),
        (lambda m: m.update(version="1"), "version: Input should be a valid integer"),
        (lambda m: m["graph"]["onnx"].update(opset=16), "graph.onnx.opset"),
        (lambda m: m["rt"].update(kind="rt9"), "rt.kind"),
        (lambda m: m["rt"].update(kind="rt3"), "masks shape must be"),
        (lambda m: m.update(surprise=1), "surprise: Extra inputs are not permitted"),
        (lambda m: m.update(created="yesterday"), "created"),
        (lambda m: m["evaluation"]["robust"][0].update(accuracy=1.5), "evaluation.robust.0.accuracy"),
        (lambda m: m["files"].update({"../x": m["files"]["model.pt"]}), "not a plain file name"),
        (lambda m: m.update(serving={"samples": 0}), "serving.samples"),
        (lambda m: m.update(serving={"samples": 2, "vote": True}), "serving.vote: Extra inputs"),
    ]:
        m = copy.deepcopy(mv.manifest)
        change(m)
        _rewrite(mv.path, m)
        with pytest.raises(model_store.StoreError) as e:
            model_store.verify(mv.path)
        assert "manifest.json" in str(e.value) and message in str(e.value), str(e.value)
    _rewrite(mv.path, copy.deepcopy(mv.manifest))
    model_store.verify(mv.path)


def test_manifest_schema_round_trip(root, model_files):
    mv = model_store.publish(root, "m", model_files, draft("rt3"))
    raw = (mv.path / "manifest.json").read_bytes()
    loaded = model_store.load_manifest(mv.path)
    assert loaded == mv.manifest and canonical_bytes(loaded) == raw
    assert json.loads(json.dumps(loaded)) == loaded
    parsed = Manifest.model_validate_json(raw)
    again = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert again == loaded  # pydantic reads and writes back exactly what was stored
    validate(again)
    assert manifest_digest(again) == loaded["manifest_sha256"]


def test_invalid_draft_publishes_nothing(root, model_files):
    bad = draft()
    bad["classes"] = ["only-one"]
    with pytest.raises(model_store.StoreError, match="classes"):
        model_store.publish(root, "m", model_files, bad)
    with pytest.raises(model_store.StoreError, match="unknown schema"):
        model_store.publish(root, "m", model_files, draft() | {"schema": "other/1"})
    with pytest.raises(model_store.StoreError, match="model name"):
        model_store.publish(root, "../evil", model_files, draft())
    with pytest.raises(model_store.StoreError, match="not a plain file name"):
        model_store.publish(root, "m", {"sub/model.onnx": model_files["model.onnx"]}, draft())
    assert model_store.list_versions(root) == []
    assert list((root / "m").iterdir()) == []


def test_failure_after_temp_folder_written_leaves_no_version(root, model_files, monkeypatch):
    def broken_rename(src, dst):
        assert Path(src).name.startswith(".tmp-") and (Path(src) / "manifest.json").is_file()
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(store_mod.os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk on fire"):
        model_store.publish(root, "m", model_files, draft())
    assert model_store.list_versions(root) == [] and list((root / "m").iterdir()) == []


KILLED_PUBLISHER = """
import sys, time
from pathlib import Path
from model_store import store
real = store._copy_file
def slow_copy(src, dst):
    entry = real(src, dst)
    Path(sys.argv[2]).write_text("copying")
    time.sleep(60)
    return entry
store._copy_file = slow_copy
files = {"model.onnx": Path(sys.argv[3]), "model.pt": Path(sys.argv[4])}
store.publish(Path(sys.argv[1]), "m", files, {})
"""


def test_killed_publish_leaves_no_visible_version(root, model_files, tmp_path):
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [str(root), str(marker), str(model_files["model.onnx"]), str(model_files["model.pt"])]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISHER, *args], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, "publisher exited early"
            assert time.monotonic() < deadline, "publisher never started copying"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list((root / "m").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")
    assert model_store.list_versions(root) == [] and model_store.version_dirs(root) == []
    assert model_store.cleanup(root, max_age_s=3600) == []  # too young: might still be running
    assert model_store.cleanup(root, max_age_s=0) == leftovers
    assert model_store.publish(root, "m", model_files, draft()).version == 1


def test_racing_publishers_get_distinct_versions(root, model_files, monkeypatch):
    model_store.publish(root, "m", model_files, draft())
    monkeypatch.setattr(store_mod, "_next_version", lambda d: 1)  # everybody thinks 1 is free
    assert model_store.publish(root, "m", model_files, draft()).version == 2
    monkeypatch.undo()
    results, barrier = [], threading.Barrier(4)

    def worker():
        barrier.wait()
        results.append(model_store.publish(root, "m", model_files, draft()).version)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [3, 4, 5, 6]
    assert [v.version for v in model_store.list_versions(root, "m")] == [1, 2, 3, 4, 5, 6]
    for v in model_store.list_versions(root, "m"):
        model_store.verify(v.path)


def test_list_versions_layout_rules(root, model_files, caplog):
    for name in ("b", "a", "a"):
        model_store.publish(root, name, model_files, draft())
    for junk in ("a/01", "a/0", "a/latest", "a/.tmp-123", ".hidden/1", "__pycache__/1"):
        (root / junk).mkdir(parents=True)
    (root / "a" / "3").write_text("a file, not a folder")
    for _ in range(7):  # 4..10 ("3" is taken by a file); numeric order: 10 after 2
        model_store.publish(root, "a", model_files, draft())
    broken = root / "a" / "11"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    with caplog.at_level(logging.WARNING):
        listed = [(v.name, v.version) for v in model_store.list_versions(root)]
    assert listed == [("a", v) for v in (1, 2, 4, 5, 6, 7, 8, 9, 10)] + [("b", 1)]
    assert "a/11" in caplog.text and "not valid JSON" in caplog.text
    assert model_store.get_version(root, "a").version == 10
    assert model_store.default_store() == Path(model_store.__file__).resolve().parent


def test_cli_list_show_verify_publish(root, model_files, tmp_path, capsys, caplog):
    folder = tmp_path / "draft"
    folder.mkdir()
    for name, p in model_files.items():
        (folder / name).write_bytes(p.read_bytes())
    (folder / "manifest.json").write_text(json.dumps(draft() | {"name": "cli-model"}))
    assert atop(["store", "--store", str(root), "publish", str(folder)]) == 0
    assert "published cli-model version 1" in capsys.readouterr().out
    assert atop(["store", "verify", "--store", str(root)]) == 0
    assert "OK cli-model/1" in capsys.readouterr().out
    assert atop(["store", "--store", str(root), "show", "cli-model"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert atop(["store", "--store", str(root), "list"]) == 0
    out = capsys.readouterr().out
    assert "cli-model" in out and "87.5%" in out and "onnx,torchscript" in out
    served = draft() | {"name": "cli-model", "serving": {"samples": 2}}
    served["evaluation"]["clean_accuracy_answer"] = {"accuracy": 0.88, "samples": 2, "n_images": 100}
    (folder / "manifest.json").write_text(json.dumps(served))
    assert atop(["store", "--store", str(root), "publish", str(folder)]) == 0
    capsys.readouterr()
    assert atop(["store", "--store", str(root), "list", "cli-model"]) == 0
    row2 = capsys.readouterr().out.splitlines()[-1].split()
    assert row2[:2] == ["cli-model", "2"] and row2[4:8] == ["2", "88.0%", "(87.5%", "at"]
    _flip(root / "cli-model" / "1" / "model.onnx", 100)
    with caplog.at_level(logging.ERROR):
        assert atop(["store", "--store", str(root), "verify", "cli-model", "1"]) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "model.onnx" in lines[0] and "\n" not in lines[0]
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert atop(["store", "--store", str(root), "show", "nope"]) == 2  # user error, no traceback
    assert "no valid version of model 'nope'" in caplog.text
    assert atop(["store", "--store", str(root), "publish", str(tmp_path / "missing")]) == 2
