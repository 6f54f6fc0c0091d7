"""Tiny random classifier + purifier checkpoints in the trainers' own format, for tests that need
a pipeline to export or serve without training one."""

from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint import save_pipeline_checkpoints
from training.classifier import ClassifierConfig, build_classifier, randomize_batchnorm
from training.purifier import PurifierConfig, UNetPurifier
from training.transforms import RTSpec


def make_checkpoints(
    out: Path, kind: str = "rt2", *, num_classes: int = 10, seed: int = 0, arch: str = "resnet"
) -> tuple[Path, Path]:
    """(classifier, purifier) checkpoint paths under ``out``, as train_classifier/train_purifier
    would save them (``saved_config``), with width-4 models, classifier ``arch`` and RT ``kind``."""
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
