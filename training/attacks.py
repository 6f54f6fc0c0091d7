"""White-box attacks as plain functions over a model callable ([0,1] NCHW in, logits out).

* ``fgsm`` and ``pgd`` (ℓ∞ and ℓ2, random start) project onto the ε-ball and clamp to [0,1]
  after every step.
* ``eot`` > 1 averages the gradient over that many forward passes, each of which draws fresh
  randomness inside the model (Expectation over Transformation), so a randomized defense is
  attacked through its expectation rather than through one lucky draw.
* ``bpda`` wraps a non-differentiable function so its backward pass uses a differentiable
  stand-in (identity by default).

Randomness comes only from the ``gen`` argument (the random start); the global RNG is never
touched. If the model is an ``nn.Module`` it is put in eval mode for the attack and its mode is
restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def eval_mode(model: Model):
    """Eval mode for the attack; afterwards every submodule gets back its *own* mode.

    Restoring with ``model.train(mode)`` would be wrong: it is recursive, so a wrapper built in
    training mode around a frozen classifier in eval mode would leave that classifier's
    BatchNorm in training mode after the attack.
    """
    saved = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: best wrong logit minus the true logit (per example)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's difference-of-logits-ratio loss (scale invariant), per example."""
    srt = logits.sort(1).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    top_is_true = (logits.argmax(1) == y).float()
    best_other = srt[:, -2] * top_is_true + srt[:, -1] * (1 - top_is_true)
    return -(true - best_other) / (srt[:, -1] - srt[:, -3] + 1e-12)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": lambda z, y: F.cross_entropy(z, y, reduction="none"),
    "cw": margin_loss,
    "dlr": dlr_loss,
}


def eot_gradient(
    model: Model, x: torch.Tensor, y: torch.Tensor, *, eot: int = 1, loss: str = "ce"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean input gradient of the summed loss over ``eot`` draws; also the mean logits."""
    fn = LOSSES[loss]
    grad = torch.zeros_like(x)
    logits_sum = None
    for _ in range(eot):
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xi)
            (g,) = torch.autograd.grad(fn(logits, y).sum(), xi)
        grad += g
        logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
    return grad / eot, logits_sum / eot


def _l2_normalize(g: torch.Tensor) -> torch.Tensor:
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the ε-ball around ``x`` in ``norm`` and clamp to [0,1]."""
    d = x_adv - x
    if norm == "linf":
        d = d.clamp(-eps, eps)
    elif norm == "l2":
        n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        d = d * (eps / n.clamp_min(1e-12)).clamp(max=1.0)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', not {norm!r}")
    return (x + d).clamp(0.0, 1.0)


def fgsm(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    eot: int = 1,
    loss: str = "ce",
) -> torch.Tensor:
    """One gradient step of size ε (the fast gradient sign method; ℓ2: normalised gradient)."""
    with eval_mode(model):
        g, _ = eot_gradient(model, x, y, eot=eot, loss=loss)
    step = g.sign() if norm == "linf" else _l2_normalize(g)
    return project(x + eps * step, x, eps, norm).detach()


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    alpha: float | None = None,
    norm: str = "linf",
    eot: int = 1,
    random_start: bool = True,
    loss: str = "ce",
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al.), untargeted, maximising ``loss``.

    ``alpha`` defaults to 2.5·ε/steps. Returns the final iterate (not the best one): scoring a
    randomized model must be done afterwards, by the rule the deployed system answers with.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    alpha = alpha if alpha is not None else 2.5 * eps / steps
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        if norm == "linf":
            noise = torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1
            x_adv = x + eps * noise.to(x.device)
        else:
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            r = torch.rand(x.shape[0], generator=gen, dtype=x.dtype).to(x.device)
            x_adv = x + _l2_normalize(noise) * (eps * r).view(-1, 1, 1, 1)
        x_adv = project(x_adv, x, eps, norm)
    with eval_mode(model):
        for _ in range(steps):
            g, _ = eot_gradient(model, x_adv, y, eot=eot, loss=loss)
            step = g.sign() if norm == "linf" else _l2_normalize(g)
            x_adv = project(x_adv + alpha * step, x, eps, norm).detach()
    return x_adv


class _BPDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward, approx):
        ctx.save_for_backward(x)
        ctx.approx = approx
        with torch.no_grad():
            return forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(ctx.approx(xi), xi, grad_out)
        return g, None, None


def bpda(
    forward: Callable[[torch.Tensor], torch.Tensor],
    approx: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Backward Pass Differentiable Approximation (Athalye et al.): run ``forward`` on the way
    forward and differentiate ``approx`` (identity by default) on the way back."""
    approx = approx or (lambda t: t)
    return lambda x: _BPDA.apply(x, forward, approx)
