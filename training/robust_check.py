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

import logging
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
    """Remembers the best ``robust_acc`` so far (across a resume: it reads ``best.json``)."""

    def __init__(self, out: Path, check: RobustCheck):
        self.check = check
        self.best = -1.0
        side = out / "best.json"
        if side.is_file():
            import json

            self.best = float(json.loads(side.read_text())["metrics"].get("robust_acc", -1.0))

    def update(self, robust: float) -> tuple[bool, bool]:
        """(is this the best epoch so far, has robustness collapsed: stop training)."""
        improved = robust > self.best
        collapsed = self.best > 0 and robust < self.check.collapse * self.best
        if improved:
            self.best = robust
        if collapsed:
            log.warning(
                "robust accuracy %.1f%% fell below %.0f%% of the best epoch's %.1f%%: catastrophic"
                " overfitting; stopping, best.safetensors holds the best epoch",
                100 * robust,
                100 * self.check.collapse,
                100 * self.best,
            )
        return improved, collapsed
