"""White-box attacks as plain functions over a model callable ([0,1] NCHW in, logits out).

* ``fgsm`` and ``pgd`` (ℓ∞ and ℓ2, random start) project onto the ε-ball and clamp to [0,1]
  after every step. ``fgsm_rs`` is the training-time attack of fast adversarial training
  (FGSM from a uniform random start, Wong et al. 2020).
* ``eot`` > 1 averages the gradient over that many forward passes, each of which draws fresh
  randomness inside the model (Expectation over Transformation), so a randomized defense is
  attacked through its expectation rather than through one lucky draw.

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


def prob_margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The margin of the softmax probabilities, best wrong minus true, with the gradient
    direction of ``p_other - p_true`` computed without underflow: per example it is
    ``p_other · ∇(log p_other - r · log p_true)`` with r = p_true / p_other held constant, and
    a sign step ignores the positive factor. The value returned is ``p_other - p_true``.

    Why not the margin of the logits: on a model whose output is the log of a *mean* of
    softmaxes (training/ensemble.py, flip averaging), the logit margin's gradient is dominated by
    the member already fooled (its best wrong class can never exceed half of the mixture), while
    the member still right is saturated and gets no weight; the attack stalls. CE weights each
    member by how much it still votes for the true class; so does this margin."""
    lp = logits.double().log_softmax(1)
    true = lp.gather(1, y[:, None]).squeeze(1)
    other = lp.masked_fill(F.one_hot(y, lp.shape[1]).bool(), float("-inf")).amax(1)
    r = (true - other).exp().detach()
    surrogate = other - r * true
    value = (other.exp() - true.exp()).detach()
    return (surrogate + (value - surrogate).detach()).to(logits.dtype)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": lambda z, y: F.cross_entropy(z, y, reduction="none"),
    "cw": margin_loss,
    "cw-prob": prob_margin_loss,
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


def fgsm_rs(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """FGSM from a uniform random start in the ℓ∞ ε-ball, one step of ``alpha`` (Wong et al.
    2020 use α = 1.25·ε), projected back onto the ball and into [0,1].

    Unlike the evaluation attacks it leaves the model's mode alone: fast adversarial training
    makes x' with the network in training mode (batch statistics), as the update then sees it.
    The caller's autocast, if any, applies (training runs it in bf16).
    """
    start = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1).to(x.device)
    xi = project(x + eps * start, x, eps, "linf").detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y), xi)
    return project(xi.detach() + alpha * g.sign(), x, eps, "linf").detach()


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
    best: bool = False,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al.), untargeted, maximising ``loss``.

    ``alpha`` defaults to 2.5·ε/steps. Returns the final iterate, or with ``best=True`` the
    best iterate per image (``pgd_iterates``). Either way a randomized model must be scored
    afterwards, with fresh draws, by the rule the deployed system answers with.
    """
    best_x, last = pgd_iterates(
        model,
        x,
        y,
        eps=eps,
        steps=steps,
        alpha=alpha,
        norm=norm,
        eot=eot,
        random_start=random_start,
        loss=loss,
        gen=gen,
        track_best=best,
    )
    return best_x if best else last


def iterate_key(logits: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """How good an iterate is for the attacker, from EOT-averaged logits: (misclassified by
    those logits, loss). Iterates compare by the first, then by the second: a high CE does not
    always mean misclassified, and a misclassified point is what the attacker wants."""
    return (logits.argmax(1) != y).float(), LOSSES[loss](logits, y).detach()


def better_iterate(
    key: tuple[torch.Tensor, torch.Tensor], best: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    return (key[0] > best[0]) | ((key[0] == best[0]) & (key[1] > best[1]))


class BestIterate:
    """Per image, the best iterate offered so far in ``iterate_key`` order (the first offer
    seeds it): what ``pgd_iterates`` and the flow attack keep."""

    def __init__(self, y: torch.Tensor, loss: str):
        self.y, self.loss = y, loss
        self.x: torch.Tensor | None = None
        self.key: tuple[torch.Tensor, torch.Tensor] | None = None

    def offer(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        key = iterate_key(logits, self.y, self.loss)
        if self.x is None or self.key is None:
            self.x, self.key = x, key
            return
        pick = better_iterate(key, self.key)
        self.x = torch.where(pick.view(-1, 1, 1, 1), x, self.x)
        self.key = (torch.where(pick, key[0], self.key[0]), torch.where(pick, key[1], self.key[1]))


def pgd_iterates(
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
    track_best: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD returning (best iterate, final iterate) per image.

    The best iterate is the one (random start included) with the highest ``iterate_key``
    under the attack's own draws: the EOT-averaged logits ``eot_gradient`` returns at every
    iterate anyway, plus one EOT evaluation (``eot`` forward passes) of the final iterate. Those
    draws are the attacker's, independent of any draws that later score the result, so keeping
    the best iterate is an attack choice, not selection on the score. A sign step of fixed size
    can overshoot, leave the adversarial region and end on a worse point than one it visited;
    the final iterate alone under-rates the attack. ``track_best=False`` skips the extra
    evaluation and returns the final iterate twice.
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
    best = BestIterate(y, loss)
    with eval_mode(model):
        for _ in range(steps):
            g, logits = eot_gradient(model, x_adv, y, eot=eot, loss=loss)
            if track_best:
                best.offer(x_adv, logits)
            step = g.sign() if norm == "linf" else _l2_normalize(g)
            x_adv = project(x_adv + alpha * step, x, eps, norm).detach()
        if not track_best:
            return x_adv, x_adv
        with torch.no_grad():
            best.offer(x_adv, sum(model(x_adv) for _ in range(eot)) / eot)
    return best.x.detach(), x_adv
