"""Retraining on one's own data: the classes (names, order, count) and the image size come from
the data and travel through every stage to the manifest and the answers; a run folder is never
mixed with another run; a hot swap that would change what answers mean is refused unless an
operator accepts it explicitly. Tiny models, tiny synthetic data sets, the real code."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import model_store
from atop.cli import main as atop
from service.app import create_app
from tests.service_fixtures import MODEL, encode, metric, republish
from tests.test_service_registry import robust
from tests.test_service_unit import err, make_settings, ok
from tests.tiny_models import make_checkpoints
from training import export
from training.checkpoint import load_checkpoint
from training.classifier import CIFAR10_MEAN, load_classifier
from training.data import DataError, load_split

TINY = "--depth 1 --width 4 --batch-size 8 --threads 1 --lr 0.05"
ADMIN = {"authorization": "Bearer admin-token-xyz"}


def write_classes(root: Path, classes, *, sizes=((32, 32),), n_train=4, n_test=2, skip_in_test=()) -> Path:
    """``root/{train,test}/<class>/*.png``; class i is tinted by its own colour; image j of a
    class has size ``sizes[(i + j) % len(sizes)]`` (width, height)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i, name in enumerate(classes):
            if split == "test" and name in skip_in_test:
                continue
            colour = np.array([(37 * i) % 256, (91 * i + 60) % 256, (151 * i + 120) % 256], dtype=np.float64)
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                w, h = sizes[(i + j) % len(sizes)]
                im = np.clip(colour + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(im).save(d / f"{j:03d}.png")
    return root


def run(cmd: str) -> int:
    return atop(cmd.split())


def serve(store: Path, **kw) -> TestClient:
    return TestClient(create_app(make_settings(store, **kw)))


def classify(c: TestClient, image: Image.Image, **params) -> dict:
    """The answer for one image, with the serving version under "model"."""
    body = encode(image, "PNG")
    answer = ok(c.post("/classify", params=params, content=body, headers={"content-type": "image/png"}))
    return answer["results"][0] | {"model": answer["model"]}


# --- end to end: three classes of odd sizes, 100 classes, 64 px ------------------------------


def test_three_classes_of_any_size_train_export_and_serve_with_their_names(tmp_path):
    classes = ("cat", "dog", "ship")
    data = write_classes(tmp_path / "data", classes, sizes=((40, 48), (64, 64), (30, 24)))
    run_dir = tmp_path / "run"
    assert run(f"train classifier --data {data} --out {run_dir} {TINY} --epochs 2") == 0
    ck = load_checkpoint(run_dir / "final.safetensors")
    model = ck.config["model"]
    assert model["num_classes"] == 3 and model["classes"] == list(classes) and model["image_size"] == 32
    assert tuple(model["mean"]) != CIFAR10_MEAN  # normalisation measured on this data
    store = tmp_path / "store"
    assert run(f"export --classifier {run_dir}/final.safetensors --purifier none --store {store}") == 0
    manifest = model_store.get_version(store, MODEL).manifest
    assert manifest["classes"] == list(classes)  # from the checkpoint, no --classes
    # The service answers with those names, and the one it picks is the trained model's choice
    # on the same pixels (a 48x40 image: cropped and resized by the shared rule).
    image = Image.open(data / "test" / "ship" / "000.png")
    f = load_classifier(run_dir / "final.safetensors")
    with serve(store) as c:
        answer = classify(c, image, top_k=3)
    assert {p["label"] for p in answer["top_k"]} == set(classes)
    pixels = load_split(data, "test").images[len(classes) * 2 - 2]  # ship/000.png, as training reads it
    expected = classes[int(f(pixels[None].float() / 255).argmax())]
    assert answer["label"] == expected


def test_a_hundred_classes_train_and_export(tmp_path):
    classes = tuple(f"c{i:03d}" for i in range(100))
    data = write_classes(tmp_path / "data", classes, n_train=1, n_test=1)
    assert run(f"train classifier --data {data} --out {tmp_path}/run {TINY} --epochs 1") == 0
    store = tmp_path / "store"
    assert run(f"export --classifier {tmp_path}/run/final.safetensors --purifier none --store {store}") == 0
    manifest = model_store.get_version(store, MODEL).manifest
    assert manifest["classes"] == list(classes)
    assert manifest["graph"]["onnx"]["outputs"][0]["shape"] == ["B", 100]


def test_a_64_px_model_trains_with_its_purifier_exports_and_serves(tmp_path):
    classes = ("a", "b")
    data = write_classes(tmp_path / "data", classes, sizes=((64, 64), (80, 72)))
    clf, pur = tmp_path / "clf", tmp_path / "pur"
    assert run(f"train classifier --data {data} --out {clf} {TINY} --epochs 1 --image-size 64") == 0
    cmd = f"train purifier --data {data} --out {pur} --classifier {clf}/final.safetensors"
    assert run(f"{cmd} --width 4 --disc-width 4 --batch-size 4 --epochs 1 --threads 1 --eval-images 4") == 0
    rt = load_checkpoint(pur / "final.safetensors").config["rt"]
    assert rt["image_size"] == 64 and rt["block"] == 8  # the 8 x 8 block grid of 32 px / 4
    store = tmp_path / "store"
    assert (
        run(f"export --classifier {clf}/final.safetensors --purifier {pur}/final.safetensors --store {store}")
        == 0
    )
    manifest = model_store.get_version(store, MODEL).manifest
    assert manifest["input"]["shape"] == [3, 64, 64] and manifest["classes"] == list(classes)
    with serve(store) as c:
        answer = classify(c, Image.open(data / "test" / "b" / "000.png"), top_k=2, seed=3)
    assert {p["label"] for p in answer["top_k"]} == set(classes)


def test_a_purifier_refuses_another_size_than_its_classifier(tmp_path):
    data = write_classes(tmp_path / "data", ("a", "b"))
    assert run(f"train classifier --data {data} --out {tmp_path}/clf {TINY} --epochs 1") == 0
    cmd = f"train purifier --data {data} --out {tmp_path}/pur --classifier {tmp_path}/clf/final.safetensors"
    assert run(f"{cmd} --width 4 --disc-width 4 --epochs 1 --threads 1 --image-size 64") == 2


def test_a_purifier_refuses_data_with_other_classes_than_its_classifier(tmp_path, caplog):
    data = write_classes(tmp_path / "data", ("a", "b"))
    other = write_classes(tmp_path / "other", ("a", "c"))
    assert run(f"train classifier --data {data} --out {tmp_path}/clf {TINY} --epochs 1") == 0
    cmd = f"train purifier --data {other} --out {tmp_path}/pur --classifier {tmp_path}/clf/final.safetensors"
    assert run(f"{cmd} --width 4 --disc-width 4 --epochs 1 --threads 1") == 2
    assert "the data's classes are a, c" in caplog.text


def test_adapting_to_a_purifier_of_another_size_is_refused(tmp_path, caplog):
    data = write_classes(tmp_path / "data", ("a", "b"))
    _, purifier = make_checkpoints(tmp_path / "ck", num_classes=2)  # a 32-px purifier
    cmd = f"train classifier --data {data} --out {tmp_path}/run {TINY} --epochs 1 --image-size 64"
    assert run(f"{cmd} --purifier {purifier}") == 2 and "works on 32-px images" in caplog.text


# --- data: test split against the training classes, sizes -----------------------------------


def test_eleven_classes_train(tmp_path):
    classes = tuple(f"k{i}" for i in range(11))  # CIFAR-10's head had 10: this used to crash
    data = write_classes(tmp_path / "data", classes, n_train=1, n_test=1)
    assert run(f"train classifier --data {data} --out {tmp_path}/run {TINY} --epochs 1") == 0
    assert load_checkpoint(tmp_path / "run" / "final.safetensors").config["model"]["num_classes"] == 11


def test_a_test_split_missing_a_class_keeps_the_training_order(tmp_path, caplog):
    data = write_classes(tmp_path / "data", ("a", "b", "c"), skip_in_test=("a",))
    train = load_split(data, "train", cache=False)
    alone = load_split(data, "test", cache=False)
    assert alone.classes == ("b", "c") and set(alone.labels.tolist()) == {0, 1}  # re-indexed on its own
    with caplog.at_level(logging.WARNING):
        test = load_split(data, "test", classes=train.classes, cache=False)
    assert test.classes == ("a", "b", "c") and set(test.labels.tolist()) == {1, 2}
    assert "no images of class(es) a" in caplog.text


def test_a_test_split_with_an_unknown_class_is_refused(tmp_path):
    write_classes(tmp_path / "data", ("a", "b"))
    write_classes(tmp_path / "extra", ("a", "b", "z"))
    (tmp_path / "data" / "test").rename(tmp_path / "old-test")
    (tmp_path / "extra" / "test").rename(tmp_path / "data" / "test")
    train = load_split(tmp_path / "data", "train", cache=False)
    with pytest.raises(DataError, match="z are not among the training classes"):
        load_split(tmp_path / "data", "test", classes=train.classes, cache=False)


def test_images_of_any_size_are_brought_to_the_model_size_by_the_service_rule(tmp_path):
    data = write_classes(tmp_path / "data", ("a", "b"), sizes=((48, 40), (32, 32)))
    split = load_split(data, "train", cache=False)
    assert split.images.shape[1:] == (3, 32, 32)
    big = load_split(data, "train", size=64, cache=False)
    assert big.images.shape[1:] == (3, 64, 64)
    # Same pixels as the service: its decode of the same file.
    from service.decode import decode_image

    path = data / "train" / "a" / "000.png"
    served = decode_image(path.read_bytes(), size=32, max_pixels=10**6)
    assert np.array_equal((served * 255).round().astype(np.uint8), split.images[0].numpy())


def test_class_folders_may_be_symlinks(tmp_path):
    real = write_classes(tmp_path / "real", ("a", "b"))
    linked = tmp_path / "linked"
    for split in ("train", "test"):
        (linked / split).mkdir(parents=True)
        for c in ("a", "b"):
            (linked / split / c).symlink_to(real / split / c, target_is_directory=True)
    split = load_split(linked, "train", cache=False)
    assert split.classes == ("a", "b") and len(split) == 8


# --- runs do not mix --------------------------------------------------------------------------


def test_an_existing_out_is_refused_without_resume_or_overwrite(tmp_path, caplog):
    data = write_classes(tmp_path / "data", ("a", "b"))
    cmd = f"train classifier --data {data} --out {tmp_path}/run {TINY} --epochs 1"
    assert run(cmd) == 0
    assert run(cmd) == 2 and "already holds a run" in caplog.text
    assert run(cmd + " --overwrite") == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the old run's epochs were not kept beside the new one's
    assert run(cmd + " --resume --overwrite") == 2


# --- export: names from the checkpoint, renaming only -----------------------------------------


@pytest.fixture(scope="module")
def named_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("named")
    data = write_classes(tmp / "data", ("cat", "dog", "ship"))
    assert run(f"train classifier --data {data} --out {tmp}/run {TINY} --epochs 1") == 0
    return tmp / "run" / "final.safetensors"


def test_export_classes_rename_in_order_but_refuse_reorder_and_count(named_run, tmp_path, caplog):
    base = f"export --classifier {named_run} --purifier none --store {tmp_path}/store"
    assert run(f"{base} --classes Cat,Dog,Boat") == 0
    assert model_store.get_version(tmp_path / "store", MODEL).manifest["classes"] == ["Cat", "Dog", "Boat"]
    assert "renaming classes" in caplog.text
    assert run(f"{base} --classes dog,cat,ship") == 2 and "another position" in caplog.text
    assert run(f"{base} --classes a,b") == 2 and "answers 3 classes" in caplog.text
    assert run(f"{base} --classes a,a,b") == 2
    assert len(model_store.list_versions(tmp_path / "store", MODEL)) == 1


def test_export_of_a_checkpoint_without_names(tmp_path, caplog):
    c10, p10 = make_checkpoints(tmp_path / "ten", num_classes=10)
    store = tmp_path / "store"
    with caplog.at_level(logging.WARNING):
        mv = export.run(export.ExportConfig(str(c10), str(p10), str(store)))
    assert mv.manifest["classes"][0] == "airplane" and "records no class names" in caplog.text
    c3, p3 = make_checkpoints(tmp_path / "three", num_classes=3)
    with pytest.raises(ValueError, match="records no names; pass --classes"):
        export.run(export.ExportConfig(str(c3), str(p3), str(store)))


# --- the swap guard ---------------------------------------------------------------------------


def republish_as(root: Path, src, **changes) -> model_store.ModelVersion:
    """The active version's files published again with manifest fields changed."""
    draft = json.loads(json.dumps(src.manifest)) | changes
    return model_store.publish(root, MODEL, {f: src.path / f for f in src.manifest["files"]}, draft)


def test_a_swap_that_changes_the_classes_is_refused_until_an_operator_accepts_it(service_store, caplog):
    v1 = model_store.get_version(service_store, MODEL)
    other = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with serve(service_store, admin_token="admin-token-xyz") as c:
        republish_as(service_store, v1, classes=other)  # appears while v1 serves
        with caplog.at_level(logging.WARNING, logger="atop.service"):
            out = ok(c.post("/v1/admin/reload", headers=ADMIN))
        assert out["result"] == "refused" and out["active_version"] == 1
        assert "changes what answers mean" in out["message"] and "plane, car" in out["message"]
        assert any("refused cifar10-atop v2" in r.getMessage() for r in caplog.records)
        models = ok(c.get("/v1/models"))
        v2 = [v for v in models["versions"] if v["version"] == 2][0]
        assert v2["status"] == "refused" and "accept_contract_change" in v2["reason"]
        assert metric(c.get("/metrics").text, "atop_model_reloads_total", result="refused") == 1
        assert classify(c, Image.new("RGB", (32, 32)))["model"]["version"] == 1  # still serving
        err(c.post("/v1/admin/versions/2/activate", headers=ADMIN), 409, "version_refused")
        accept = {"accept_contract_change": True}
        out = ok(c.post("/v1/admin/versions/2/activate", params=accept, headers=ADMIN))
        assert out["result"] == "swapped"
        answer = classify(c, Image.new("RGB", (32, 32)), top_k=10)
        assert answer["model"]["version"] == 2 and {p["label"] for p in answer["top_k"]} == set(other)


def test_a_reordered_class_list_or_another_input_size_is_refused(service_store):
    v1 = model_store.get_version(service_store, MODEL)
    graph = json.loads(json.dumps(v1.manifest["graph"]))
    for tensor in graph["onnx"]["inputs"] + graph["onnx"]["outputs"]:
        tensor["shape"] = [64 if d == 32 else d for d in tensor["shape"]]
    bigger = {
        "rt": v1.manifest["rt"] | {"image_size": 64},
        "input": v1.manifest["input"] | {"shape": [3, 64, 64]},
        "graph": graph,
    }
    with serve(service_store) as c:
        republish_as(service_store, v1, classes=list(reversed(v1.manifest["classes"])))
        republish_as(service_store, v1, **bigger)
        assert ok(c.post("/v1/admin/reload"))["result"] == "refused"
        reasons = {v["version"]: v.get("reason") for v in ok(c.get("/v1/models"))["versions"]}
        assert "64-px input instead of 32-px" in reasons[3]
        assert "another order" in reasons[2]
        assert ok(c.post("/v1/admin/reload"))["result"] == "unchanged"  # both are remembered as refused
        assert classify(c, Image.new("RGB", (32, 32)))["model"]["version"] == 1


def test_a_version_without_evaluation_is_flagged(service_store, tiny_version):
    republish(service_store, tiny_version, evaluation=robust(0.4))
    with serve(service_store) as c:
        flags = {v["version"]: v["evaluated"] for v in ok(c.get("/v1/models"))["versions"]}
    assert flags == {1: False, 2: True}


def test_a_published_version_exports_again_as_a_classifier(tiny_version, tmp_path):
    """``--classifier`` may be a store version folder (its f, from the TorchScript file): the
    manifest then records that version as the classifier's origin, with its recipe."""
    store = tmp_path / "store"
    mv = export.run(export.ExportConfig(str(tiny_version.path), "none", str(store)))
    recipe = mv.manifest["provenance"]["recipe"]["classifier"]
    assert recipe["from_version"]["manifest_sha256"] == tiny_version.manifest["manifest_sha256"]
    assert (
        recipe["config"]["kind"] == "classifier"
        and mv.manifest["classes"] == tiny_version.manifest["classes"]
    )


# --- what a newcomer reads: help texts and one-line errors ----------------------------------


def test_serve_names_the_models_a_store_holds(service_store):
    from service.cli import preflight

    with pytest.raises(ValueError, match=r"no valid version of model 'pets'.*it holds: cifar10-atop"):
        preflight(make_settings(service_store, model_name="pets"))


@pytest.mark.parametrize(
    "command, says",
    [
        ("export", "default cifar10-atop"),  # --name's default
        ("train classifier", "any classes"),  # --data is not only CIFAR-10
        ("train purifier", "any image size"),
        ("eval", "a NEW version"),  # --record publishes a version a running server swaps to
    ],
)
def test_help_says_it(command, says, capsys):
    with pytest.raises(SystemExit):
        atop([*command.split(), "--help"])
    assert says in " ".join(capsys.readouterr().out.split())
