"""The accuracy that training logs: a classifier's top-1 on a split, alone or through the purifier.

One function for every caller: the classifier's ``test_acc`` and ``test_acc_purified``, the
purifier's ``psnr`` and ``pipeline_acc``, and ``atop train ensemble``'s ``test_acc``. Attacked
accuracy lives elsewhere: the per-epoch robust check (training/train/robust_check.py) and the
robustness evaluation (``atop eval``, training/eval/).
"""

from __future__ import annotations

import torch

from training.data import Split, batches
from training.purifier import purify
from training.transforms import RTSpec, sample_rt


@torch.no_grad()
def accuracy(
    classifier, split: Split, *, purifier=None, spec: RTSpec | None = None, seed: int = 1234
) -> dict[str, float]:
    """``{"acc": top-1}`` of ``classifier`` ([0,1] in, logits out) on every image of ``split``.

    With a ``purifier`` (and its RT ``spec``) the classifier sees g(t(x)) instead, one RT draw per
    image from a generator seeded with ``seed`` (the same draws every call), and the PSNR of
    g(t(x)) against x is added as ``"psnr"``; ``classifier`` may then be None (PSNR only).
    """
    gen = torch.Generator().manual_seed(seed)
    device = next((classifier if purifier is None else purifier).parameters()).device
    se = correct = total = 0.0
    # With a purifier the draws are taken batch by batch, so the batch size is part of what the
    # seed fixes: 250 keeps the draws (and so the figures) of the runs already logged.
    for x, y in batches(split, 500 if purifier is None else 250):
        x, y = x.to(device), y.to(device)
        if purifier is not None:
            s = sample_rt(spec, x.shape[0], gen, device)
            out = purify(purifier, x, s.noise, s.masks, spec.applied_noise_std)
            se += float(((out - x) ** 2).flatten(1).mean(1).clamp_min(1e-10).log10().sum())
            x = out
        if classifier is not None:
            correct += float((classifier(x).argmax(1) == y).sum())
        total += len(y)
    res = {"psnr": -10 * se / max(total, 1)} if purifier is not None else {}
    if classifier is not None:
        res["acc"] = correct / max(total, 1)
    return res
