"""The robust check of adversarial training: PGD on a fixed held-out set after every epoch.

Adversarial training can fail silently: fast (FGSM) training may overfit catastrophically
(robust accuracy under PGD collapses within an epoch while training accuracy rises), and a
purifier's fine-tune may stop helping. So every adversarial trainer measures, after each epoch,
the accuracy under PGD-``steps`` × EOT-``eot`` on the same held-out images, logs it as
``robust_acc`` and keeps the epoch where it peaked as ``best.safetensors``. The check runs in
fp32 (no autocast), with a generator seeded once, so every epoch sees the same images and the
same random starts; for a randomized model the answer is scored by a fresh forward pass, not by
the draws the attack used.

The held-out images come out of the training split (``Split.hold_out``), never out of the test
set: choosing the epoch on test images would be selection on the test set.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from training.attacks import Model, eval_mode, pgd
from training.data import Split, batches

log = logging.getLogger("atop.train.robust")


@dataclass(frozen=True)
class RobustCheck:
    images: int = 256  # held out from the training split; 0 = no check
    steps: int = 10
    eot: int = 1
    eps: float = 8 / 255
    seed: int = 0
    collapse: float = 0.5  # stop when robust accuracy falls below this share of the best


@dataclass(frozen=True)
class HeldOut:
    """What the check runs on after each epoch: the held-out ``split`` and ``target()``, the
    model to attack (called every epoch: a pipeline may want a freshly seeded generator)."""

    check: RobustCheck
    split: Split
    target: Callable[[], Model]


def hold_out(train: Split, check: RobustCheck) -> tuple[Split, Split]:
    """(the training images, the check's held-out ones); refused when the check would take more
    than a quarter of the data (tiny data sets: pass a smaller --robust-check)."""
    if check.images > len(train) // 4:
        raise ValueError(
            f"--robust-check {check.images} would hold out more than a quarter of the"
            f" {len(train)} training images; pass a smaller --robust-check (0 = no check)"
        )
    train, held = train.hold_out(check.images, seed=check.seed)
    log.info(
        "robust check: PGD-%d x EOT-%d on %d held-out training images after every epoch",
        check.steps,
        check.eot,
        len(held),
    )
    return train, held


@torch.no_grad()
def robust_accuracy(model: Model, split: Split, check: RobustCheck, batch_size: int = 256) -> dict:
    """{'clean_acc', 'robust_acc'} of ``model`` on ``split`` under the check's PGD (fp32)."""
    gen = torch.Generator().manual_seed(check.seed)
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    clean = robust = total = 0
    with torch.autocast(device.type, enabled=False), eval_mode(model):
        for x, y in batches(split, batch_size):
            x, y = x.to(device), y.to(device)
            clean += int((model(x).argmax(1) == y).sum())
            adv = pgd(
                model,
                x,
                y,
                eps=check.eps,
                steps=check.steps,
                alpha=2.5 * check.eps / check.steps,
                eot=check.eot,
                gen=gen,
            )
            robust += int((model(adv).argmax(1) == y).sum())
            total += len(y)
    return {"clean_acc": clean / max(total, 1), "robust_acc": robust / max(total, 1)}


class BestEpoch:
    """Which epoch ``best.safetensors`` holds: the most robust one, up to the check's noise.

    The check measures a proportion on a few hundred images, so two epochs whose robust accuracy
    differs by one image are not distinguishable. Among the epochs within one standard error
    (sqrt(p(1-p)/n), p = the highest robust accuracy so far) of the most robust, the one with
    the higher held-out clean accuracy is kept; an epoch that is more robust than the band
    replaces the kept one outright. (With 256 images the band is about 3 points; a greedy
    choice: only the current epoch can replace the kept one.) Survives a resume through
    ``best.json``.
    """

    def __init__(self, out: Path, check: RobustCheck):
        self.check = check
        self.top = -1.0  # the highest robust accuracy seen
        self.kept: tuple[float, float] | None = None  # (robust, clean) of the kept epoch
        side = out / "best.json"
        if side.is_file():
            m = json.loads(side.read_text())["metrics"]
            self.kept = (float(m.get("robust_acc", -1.0)), float(m.get("holdout_acc", -1.0)))
            self.top = float(m.get("top_robust_acc", self.kept[0]))

    @property
    def best(self) -> float:
        """Robust accuracy of the kept epoch."""
        return self.kept[0] if self.kept else -1.0

    def band(self, n: int) -> float:
        p = min(max(self.top, 0.0), 1.0)
        return math.sqrt(p * (1 - p) / max(n, 1))

    def record(self, check: dict, n: int) -> tuple[dict, bool]:
        """The epoch's metrics from a ``robust_accuracy`` result, and whether to keep the epoch."""
        keep, collapsed = self.update(check["robust_acc"], check["clean_acc"], n)
        metrics = {"holdout_acc": check["clean_acc"], "robust_acc": check["robust_acc"]}
        return metrics | {"top_robust_acc": self.top, "collapsed": collapsed}, keep

    def record_and_keep(self, check: dict, n: int, metrics: dict, save_best) -> dict:
        """``metrics`` with the check's (``record``); ``save_best(those metrics)`` writes
        best.safetensors when the rule keeps this epoch."""
        found, keep = self.record(check, n)
        metrics = metrics | found
        if keep:
            save_best(metrics)
        return metrics

    def update(self, robust: float, clean: float = 0.0, n: int | None = None) -> tuple[bool, bool]:
        """(keep this epoch as the best, has robustness collapsed: stop training)."""
        self.top = max(self.top, robust)
        low = self.top - self.band(n or self.check.images)
        collapsed = robust < self.check.collapse * self.top
        if self.kept is None or self.kept[0] < low:
            keep = robust >= low
        else:
            keep = robust >= low and (
                clean > self.kept[1] or (clean == self.kept[1] and robust > self.kept[0])
            )
        if keep:
            self.kept = (robust, clean)
        if collapsed:
            log.warning(
                "robust accuracy %.1f%% fell below %.0f%% of the best epoch's %.1f%%: catastrophic"
                " overfitting; stopping, best.safetensors holds the best epoch",
                100 * robust,
                100 * self.check.collapse,
                100 * self.top,
            )
        return keep, collapsed
