"""What a training step uses: the learning-rate schedule, the per-step generator, the bf16
autocast (``--precision``), and the moving average of the weights (``--ema``)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def one_cycle_lr(step: int, total: int, peak: float, warmup: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` of the run, then cosine decay to zero."""
    w = max(1, int(total * warmup))
    if step < w:
        return peak * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for everything random in training step ``step`` (attacks, RT draws): a
    function of (seed, step) alone, so a resumed run replays exactly the same draws."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


PRECISIONS = ("bf16", "fp32")


def check_precision(precision: str) -> None:
    """Refuse an unknown --precision before a run loads anything."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, not {precision!r}")


def autocast(device: torch.device, precision: str):
    """The training step's autocast: bf16 (about 2x the fp32 throughput on a CPU with AVX-512
    BF16, and on any recent GPU) or none. Evaluation and attacks outside training stay fp32."""
    check_precision(precision)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics.

    ``model`` is a frozen copy whose every float tensor moves ``1 - d`` of the way towards the
    trained network's after each step, with ``d = min(decay, (1 + step) / (10 + step))`` so the
    first steps do not drag in the random initialisation; integer buffers are copied. Averaged
    weights generalise and resist attack better than the last iterate (Izmailov et al. 2018;
    Rebuffi et al. 2021 for adversarial training), at the cost of one lerp per tensor per step.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        mine, theirs = self.model.state_dict(), model.state_dict()
        for name, t in mine.items():
            if t.dtype.is_floating_point:
                t.lerp_(theirs[name], 1.0 - d)
            else:
                t.copy_(theirs[name])


class WeightPerturbation:
    """Adversarial weight perturbation (``--awp``; Wu, Xia and Wang, NeurIPS 2020).

    Adversarial training over-fits robustly: the training set's adversarial loss keeps falling
    while held-out robustness peaks and declines (Rice et al. 2020), and a flat loss landscape in
    *weight* space goes with the robustness that generalises. AWP trains against the worst
    nearby weights as well as the worst nearby inputs: after the attack has made x', one ascent
    step on the adversarial loss gives each conv/linear weight tensor w the direction g of
    steepest increase, the weights move to w + v with v = gamma * ||w|| * g / ||g|| (the step is
    relative to each layer's own scale), the update's gradient is taken there, and the weights
    go back to w before the optimizer applies it. Biases and BatchNorm are not perturbed.

    Under bf16 autocast the cast cache is cleared after each move, so the passes that follow see
    the moved weights. Cost: one more forward and backward pass per step (FGSM AT: 2 -> 3). The
    ascent pass runs the network in training mode like the update does, so BatchNorm's running
    statistics see the batch twice (the average is unchanged in expectation). Under DDP each
    process takes its direction from its own shard of the batch (the ascent pass is not
    all-reduced); the update's gradient is.
    """

    def __init__(self, model: nn.Module, gamma: float):
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"--awp must be in (0, 1), got {gamma}")
        self.gamma = gamma
        self.weights = [p for p in model.parameters() if p.ndim > 1 and p.requires_grad]
        self._applied: list[torch.Tensor] | None = None

    def perturb(self, loss: torch.Tensor) -> None:
        """Move the weights to w + v, v from ``loss``'s gradient at the current weights (the
        loss of the adversarial batch, computed by the caller with the unperturbed network)."""
        if self._applied is not None:
            raise RuntimeError("the weights are already perturbed: call restore() first")
        grads = torch.autograd.grad(loss, self.weights)
        applied = []
        with torch.no_grad():
            for w, g in zip(self.weights, grads, strict=True):
                g = g.float()
                v = (self.gamma * w.float().norm() / (g.norm() + 1e-12) * g).to(w.dtype)
                w.add_(v)
                applied.append(v)
        # Autocast keeps the bf16 copy of each weight it has cast until its region ends: without
        # this, the next forward would use the copies of w, not w + v.
        torch.clear_autocast_cache()
        self._applied = applied

    def restore(self) -> None:
        """Take the weights back to w (call after backward, before the optimizer's step)."""
        if self._applied is None:
            return
        with torch.no_grad():
            for w, v in zip(self.weights, self._applied, strict=True):
                w.sub_(v)
        torch.clear_autocast_cache()
        self._applied = None
