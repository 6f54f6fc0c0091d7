"""Tiny random classifier + purifier checkpoints in the trainers' own format, for tests (and
bench/load.py make-model) that need a pipeline to export or serve without training one."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from training.checkpoint import run_config, save_checkpoint
from training.classifier import ClassifierConfig, build_classifier, load_classifier
from training.purifier import DefendedPipeline, PurifierConfig, UNetPurifier, load_purifier
from training.transforms import RTSpec


def make_checkpoints(
    out: Path, kind: str = "rt2", *, num_classes: int = 10, seed: int = 0, arch: str = "resnet"
) -> tuple[Path, Path]:
    """(classifier, purifier) checkpoint paths under ``out``, as ``atop train classifier`` and
    ``atop train purifier`` would save them (``run_config``), with width-4 models, classifier
    ``arch`` and RT ``kind``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if arch == "ensemble":  # both network kinds, mirror-averaged: every classifier op at once
        members = tuple(ClassifierConfig(1, 4, num_classes, arch=a) for a in ("resnet", "fast"))
        clf_cfg = ClassifierConfig(num_classes=num_classes, arch=arch, flip_tta=True, members=members)
    else:
        clf_cfg = ClassifierConfig(depth=1, width=4, num_classes=num_classes, arch=arch)
    clf = build_classifier(clf_cfg).eval()
    randomize_batchnorm(clf, gen)
    pur = UNetPurifier(PurifierConfig(width=4)).eval()
    # The residual head starts at zero: an untrained RT3 pipeline would then ignore its input.
    torch.nn.init.normal_(pur.head.weight, std=0.1, generator=gen)
    spec = RTSpec(kind=kind, noise_std=0.0625)
    # Distinct seeds and steps, so a test can tell the two provenances apart.
    return save_pipeline_checkpoints(
        out,
        clf,
        pur,
        spec.to_dict(),
        train={"seed": seed + 1},
        purifier_train={"seed": seed + 2},
        steps=(10, 20),
    )


def randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Give an untrained model's BatchNorm layers random statistics and scales (untrained, they
    are the identity): random-weight models for tests and timing benches then exercise them."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def save_pipeline_checkpoints(
    out: Path,
    classifier: nn.Module,
    purifier: nn.Module,
    rt: dict,
    *,
    train: dict,
    purifier_train: dict | None = None,
    steps: tuple[int, int] = (1, 1),
) -> tuple[Path, Path]:
    """(classifier, purifier) checkpoints under ``out`` for models built in memory, with the
    configs ``atop train classifier`` / ``atop train purifier`` write (``model`` from each model's
    ``cfg``, the purifier carrying the RT spec ``rt``). Tests and benchmarks use it to export
    pipelines they did not train; ``train`` (``purifier_train`` for the purifier when given) says
    where the weights came from and ``steps`` are the two checkpoints' step counters."""
    out.mkdir(parents=True, exist_ok=True)
    c = save_checkpoint(
        out / "classifier.safetensors",
        models={"classifier": classifier},
        config=run_config("classifier", train=train, model=classifier.cfg.to_dict()),
        step=steps[0],
        epoch=0,
    )
    p = save_checkpoint(
        out / "purifier.safetensors",
        models={"purifier": purifier},
        config=run_config(
            "purifier",
            train=train if purifier_train is None else purifier_train,
            model=purifier.cfg.to_dict(),
            stage="pretrain",
            rt=rt,
        ),
        step=steps[1],
        epoch=0,
    )
    return c, p


def load_pipeline(classifier_path, purifier_path, spec: RTSpec | None = None) -> DefendedPipeline:
    """f∘g∘t from two checkpoints; ``spec`` overrides the purifier's deployed RT spec."""
    purifier, saved = load_purifier(purifier_path)
    return DefendedPipeline(purifier, load_classifier(classifier_path), spec or saved).eval()
