"""Toy models for the evaluation tests: small, fast, and built so the property under test holds
by construction (a linear model any attack breaks, a defense whose gradients are masked, a
randomized model whose gradient is useless without EOT, a model with known vote odds)."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.transforms import RTSpec


def toy_data(
    n: int = 32, size: int = 8, classes: int = 4, seed: int = 0, margin: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Images in [0,1] labelled by a random linear model, keeping only points it gets right by
    a clear margin; returns (x, y, model). Any decent attack at ε = 0.1 breaks every point."""
    g = torch.Generator().manual_seed(seed)
    model = Linear(torch.randn(classes, 3 * size * size, generator=g) / size)
    x = torch.rand(20 * n, 3, size, size, generator=g)
    logits = model(x)
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1] > margin).nonzero().flatten()[:n]
    return x[keep], logits[keep].argmax(1), model


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T


class Quantized(nn.Module):
    """A gradient-masked defense: the input is rounded to a coarse grid, so every input gradient
    is exactly zero, yet the model is no more robust than the linear model behind it."""

    def __init__(self, inner: nn.Module, levels: int = 2):
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * self.levels) / self.levels)


class Antithetic(nn.Module):
    """A randomized model where EOT provably matters. Calls alternate s = +1, -1 and add
    s·A·sin(B·Vx) to the logits: tiny in value (A = 0.01), huge in gradient (A·B = 100 per unit
    of Vx). Over any even number of calls at the same x the term cancels exactly, so the EOT
    gradient is the linear model's; a single call's gradient is dominated by ±A·B·V."""

    def __init__(self, inner: Linear, seed: int = 1, a: float = 0.01, b: float = 10_000.0):
        super().__init__()
        self.inner, self.a, self.b = inner, a, b
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("v", torch.randn(inner.w.shape, generator=g))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 1.0 if self.calls % 2 == 0 else -1.0
        self.calls += 1
        return self.inner(x) + s * self.a * torch.sin(self.b * (x.flatten(1) @ self.v.T))

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Coin(nn.Module):
    """A ``(x, noise, masks) -> logits`` pipeline for the scoring rules: two classes, the right
    one (class 0) wins exactly when the draw's first noise value is above ``q``, i.e. with
    probability ``p`` per draw, independently of x."""

    def __init__(self, p: float):
        super().__init__()
        self.spec = RTSpec(kind="rt2", noise_std=0.1, image_size=8, block=4)
        self.q = math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * p)).item()  # Φ⁻¹(1 - p)

    def forward(self, x: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        right = (noise[:, 0, 0, 0] > self.q).float()
        return 20 * torch.stack([right, 1 - right], 1) + 0 * x.sum((1, 2, 3))[:, None]


class Hashed(nn.Module):
    """A ``(x, noise, masks) -> logits`` pipeline whose per-draw correctness is a coin of odds
    ``p`` that looks independent across inputs: class 0 wins when frac(1000·(noise + x)) < p at
    one pixel. Two different inputs scored on the same draws get unrelated outcomes, so picking,
    per image, the candidate those very draws misjudge drags the figure far below ``p``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.spec = RTSpec(kind="rt2", noise_std=0.1, image_size=8, block=4)

    def forward(self, x: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        u = torch.frac(1000 * (noise[:, 0, 0, 0] + x[:, 0, 0, 0]).abs())
        right = (u < self.p).float()
        return 20 * torch.stack([right, 1 - right], 1)


class Overshoot(nn.Module):
    """Two classes, true class 0, decided by s = mean(x) - 0.5: class 1 wins only in the narrow
    band |s - c| < w. Cross-entropy pulls s towards c, so PGD with a sign step larger than the
    band bounces across it; with the right parity the final iterate lands outside the band
    although an earlier iterate was inside (misclassified)."""

    def __init__(self, c: float = 0.05, w: float = 0.015):
        super().__init__()
        self.c, self.k = c, 1 / w**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).mean(1) - 0.5
        z0 = self.k * (s - self.c) ** 2
        return torch.stack([z0, torch.ones_like(z0)], 1)
