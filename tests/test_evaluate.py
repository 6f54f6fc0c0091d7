"""``atop eval`` core on tiny models: undefended accuracy falls under PGD, results fit the
manifest's evaluation schema, and runs for different attacks merge into one file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atop.cli import main as atop
from model_store.manifest import Evaluation
from tests.tiny_data import write_folder
from training.evaluate import EvalConfig, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("eval")
    data = write_folder(base / "data", n_train=32, n_test=16)
    assert (
        atop(
            f"train classifier --data {data} --out {base}/c --depth 1 --width 8 --epochs 4 "
            "--batch-size 16 --lr 0.05 --threads 1".split()
        )
        == 0
    )
    assert (
        atop(
            f"train purifier --data {data} --out {base}/p --width 4 --disc-width 4 --epochs 1 "
            "--batch-size 16 --threads 1".split()
        )
        == 0
    )
    return data, base / "c" / "final.safetensors", base / "p" / "final.safetensors"


def test_pgd_breaks_the_undefended_classifier(trained):
    data, clf, _ = trained
    cfg = EvalConfig(data=str(data), classifier=str(clf), n=48, clean_n=48, eps=0.25, steps=10)
    res = run(cfg)
    rob = res["robust"][0]
    assert res["clean_accuracy"] > 0.9
    assert rob["accuracy"] < 0.2 and rob["eot"] == 1 and rob["attack"] == "pgd"


def test_pipeline_results_merge_and_fit_the_manifest(trained, tmp_path):
    data, clf, pur = trained
    out = tmp_path / "eval.json"
    common = dict(
        data=str(data), classifier=str(clf), purifier=str(pur), n=8, clean_n=16, samples=2, out=str(out)
    )
    run(EvalConfig(**common, steps=2, eot=2))
    run(EvalConfig(**common, attack="fgsm", norm="l2", eps=0.5, eot=2))
    saved = json.loads(out.read_text())
    Evaluation.model_validate(saved)
    assert [(r["attack"], r["norm"]) for r in saved["robust"]] == [("pgd-eot", "Linf"), ("fgsm-eot", "L2")]
    for r in saved["robust"]:
        assert 0 <= r["accuracy"] <= 1 and r["eot"] == 2 and r["n_images"] == 8
