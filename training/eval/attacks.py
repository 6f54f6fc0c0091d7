"""The attacks of ``atop eval``: one entry each in ``ATTACK_TABLE``, one frozen ``AttackSpec``
per use (threat model, steps, EOT), run by ``run_attack``. An entry says how its attack runs and
what protocols, cost estimate, cascade and report need to know of it, so adding an attack is
adding one entry.

Every attack gets the model as an attacker sees it (x -> logits, fresh randomness on every
call) and returns *candidate* adversarial examples inside the threat model; the evaluator scores
them afterwards by the service's rule (training/eval/cascade.py). How each handles randomness:

* ``fgsm``, ``pgd`` (cross-entropy) and ``cw`` (PGD on the Carlini-Wagner margin, taken on
  the softmax probabilities: ``attacks.prob_margin_loss``): exact
  gradients averaged over ``eot`` draws per step (training/attacks.py). They return the best
  iterate per image, chosen on the attack's own EOT-averaged logits (``pgd_iterates``), as the
  candidate, and the final iterate beside it (``Found.final``), reported for comparison.
* ``autoattack-rand``: pyautoattack's APGD-CE then APGD-DLR with the ``version='rand'``
  settings (1 restart, 100 iterations, EOT 20; see ``AUTOATTACK_RAND``). APGD sums gradients
  over ``eot_iter`` calls of the model, each a fresh draw. Its own success bookkeeping looks at
  one draw, so both its best-loss and its last-misclassified points are returned as candidates,
  and DLR runs only on the points the CE stage left robust (AutoAttack's cascade, scored by our
  rule through ``still_robust``).
* ``square``: pyautoattack's Square attack (gradient-free, the gradient-masking check), 5000
  queries in AutoAttack. With ``eot`` > 1 each query averages the logits of that many draws,
  which makes its accept/reject decisions less noisy on a randomized model.
* ``flow``: a spatial attack never used in training: each pixel is resampled (bilinear) from a
  spot displaced by at most ``eps`` pixels; the flow field follows EOT-averaged sign gradients of
  the CW margin; best and final iterate as for PGD. The "unseen" column.

pyautoattack seeds torch's global RNG for its random starts and queries; here that happens
inside ``torch.random.fork_rng``, so the caller's global RNG is left as it was.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from training.attacks import BestIterate, eot_gradient, eval_mode, fgsm, pgd_iterates

log = logging.getLogger("atop.eval.attacks")

NORM_NAMES = {"linf": "Linf", "l2": "L2", "flow": "flow"}
FLOW_EPS = 1.0  # pixels: the flow attack's threat model wherever a protocol does not set one
# AutoAttack(version='rand') as pyautoattack 0.2.0 sets it up (autoattack.py, _set_version);
# tests/test_eval_attacks.py checks these against the package.
AUTOATTACK_RAND = {"attacks": ("apgd-ce", "apgd-dlr"), "n_iter": 100, "n_restarts": 1, "eot_iter": 20}
APGD_RHO = 0.75
SQUARE_P_INIT = 0.8  # AutoAttack's Square setting (p_init=.8, resc_schedule=False)
Candidates = list[torch.Tensor]


@dataclass
class Found:
    """What an attack returns. ``cands``: candidate adversarial examples; per image the runner
    keeps one, chosen on draws of its own (never the scoring draws). ``final``: for the stepped
    attacks, the final iterate, scored and reported beside the best iterate."""

    cands: Candidates
    final: torch.Tensor | None = None

    def all(self) -> Candidates:
        return self.cands + ([] if self.final is None else [self.final])


@dataclass(frozen=True)
class AttackSpec:
    name: str  # a key of ATTACK_TABLE
    norm: str = "linf"  # linf | l2 | flow (flow: eps is the largest pixel displacement)
    eps: float = 8 / 255
    steps: int = 20  # iterations; square: queries; fgsm: 1
    eot: int = 1  # draws averaged per gradient (square: per query)
    alpha: float = 0.0  # step size; 0 = the attack's default (see step_size)
    cascade: bool = True  # False: attack every clean-correct point, not only the survivors

    def __post_init__(self) -> None:
        if self.name not in ATTACK_TABLE:
            raise ValueError(f"unknown attack {self.name!r}; choose from {', '.join(ATTACK_TABLE)}")
        if (self.name == "flow") != (self.norm == "flow"):
            raise ValueError("the flow attack has its own threat model: norm='flow' (eps in pixels)")
        if self.norm not in NORM_NAMES:
            raise ValueError(f"norm must be linf, l2 or flow, not {self.norm!r}")
        if self.steps < 1 or self.eot < 1 or self.eps < 0:
            raise ValueError(f"{self.name}: steps and eot must be >= 1 and eps >= 0")

    @property
    def kind(self) -> Attack:
        return ATTACK_TABLE[self.name]

    @property
    def gradient_free(self) -> bool:
        return self.kind.gradient_free

    @property
    def threat(self) -> tuple[str, float]:
        return self.norm, round(self.eps, 6)

    @property
    def key(self) -> str:
        mode = "c" if self.cascade else "i"
        return f"{self.name}/{self.norm}/{self.eps:.6g}/s{self.steps}/e{self.eot}/a{self.alpha:.6g}/{mode}"

    def label(self, randomized: bool) -> str:
        if not self.kind.eot_label or not randomized:
            return self.name
        return f"{self.name}-eot"

    def step_size(self) -> float | None:
        """The step size used (None: adaptive, as APGD and Square choose their own)."""
        return self.kind.step_size(self)

    def replace(self, **changes) -> AttackSpec:
        return dataclasses.replace(self, **changes)


class MeanLogits(nn.Module):
    """Logits averaged over ``k`` calls of a randomized model (Square's queries with EOT)."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(x) for _ in range(self.k)]).mean(0)


def _apgd(model, x, y, *, loss: str, norm: str, eps: float, n_iter: int, eot: int, seed: int) -> Candidates:
    from pyautoattack.autopgd_base import APGDAttack

    attack = APGDAttack(
        model,
        n_iter=n_iter,
        norm=NORM_NAMES[norm],
        n_restarts=AUTOATTACK_RAND["n_restarts"],
        eps=eps,
        seed=seed,
        loss=loss,
        eot_iter=eot,
        rho=APGD_RHO,
        device=x.device,
        logger=logging.getLogger("atop.eval.apgd"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attack.init_hyperparam(x)
        x_best, _, _, x_best_adv = attack.attack_single_run(x.clone(), y.clone())
    return [x_best.detach(), x_best_adv.detach()]


def autoattack_rand(model, x, y, *, norm, eps, n_iter, eot, seed, still_robust=None) -> Candidates:
    """APGD-CE, then APGD-DLR on the points CE left robust (all points if no ``still_robust``)."""
    ce = _apgd(model, x, y, loss="ce", norm=norm, eps=eps, n_iter=n_iter, eot=eot, seed=seed)
    idx = torch.arange(len(y))
    if still_robust is not None:
        idx = still_robust(ce).nonzero().flatten()
    dlr = [ce[0].clone(), ce[0].clone()]
    if len(idx):
        found = _apgd(
            model, x[idx], y[idx], loss="dlr", norm=norm, eps=eps, n_iter=n_iter, eot=eot, seed=seed
        )
        for d, f in zip(dlr, found, strict=True):
            d[idx] = f
    log.debug("autoattack-rand: DLR stage on %d of %d points", len(idx), len(y))
    return ce + dlr


def square(model, x, y, *, norm: str, eps: float, queries: int, eot: int, seed: int) -> Candidates:
    from pyautoattack.square import SquareAttack

    query = MeanLogits(model, eot) if eot > 1 else model
    attack = SquareAttack(
        query,
        p_init=SQUARE_P_INIT,
        n_queries=queries,
        eps=eps,
        norm=NORM_NAMES[norm],
        n_restarts=1,
        seed=seed,
        verbose=False,
        device=x.device,
        resc_schedule=False,
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        attack.init_hyperparam(x)
        _, x_best = attack.attack_single_run(x.clone(), y.clone())
    return [x_best.detach()]


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` [B,C,H,W] at pixel (i, j) + flow[b, i, j] (flow [B,H,W,2] as (dx, dy) in
    pixels), bilinear, borders repeated. A convex combination of pixels: stays in [0,1]."""
    _, _, h, w = x.shape
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device), indexing="ij"
    )
    scale = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], device=x.device)
    grid = torch.stack([xs, ys], -1)[None] + flow * scale
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def flow_attack(model, x, y, *, eps: float, steps: int, eot: int, alpha: float, gen) -> Found:
    """Spatial attack: a flow field bounded by ``eps`` pixels per pixel (ℓ∞ on the flow),
    random start, ``steps`` sign steps on the EOT-averaged CW-margin gradient. Best iterate
    (on the attack's own EOT-averaged logits, as ``pgd_iterates``) and final iterate."""
    b, _, h, w = x.shape
    flow = (torch.rand(b, h, w, 2, generator=gen) * 2 - 1).to(x.device) * eps
    best = BestIterate(y, "cw")  # over flow fields, [B, H, W, 2]
    with eval_mode(model):
        for _ in range(steps):
            g, logits = eot_gradient(lambda f: model(warp(x, f)), flow, y, eot=eot, loss="cw")
            best.offer(flow, logits)
            flow = (flow + alpha * g.sign()).clamp(-eps, eps).detach()
        with torch.no_grad():
            best.offer(flow, sum(model(warp(x, flow)) for _ in range(eot)) / eot)
    return Found([warp(x, best.x).detach()], final=warp(x, flow).detach())


@dataclass(frozen=True)
class Flags:
    """The custom protocol's settings from the command line: one threat model for every attack."""

    norm: str
    eps: float
    steps: int
    eot: int
    alpha: float
    square_queries: int
    cascade: bool


def _steps(spec: AttackSpec) -> float:
    return float(spec.steps * spec.eot)


def _fixed_step(spec: AttackSpec) -> float:
    return spec.alpha or 2.5 * spec.eps / spec.steps


@dataclass(frozen=True)
class Attack:
    """One row of the attack table: how the attack runs and what the rest of ``atop eval``
    (protocols, cost estimate, cascade, report) needs to know about it."""

    run: Callable[..., Found]  # (spec, model, x, y, *, seed, gen, still_robust) -> Found
    stepped: bool = False  # takes a fixed step size (alpha); returns its final iterate as well
    step_size: Callable[[AttackSpec], float | None] = lambda spec: None  # None: adaptive
    gradient_free: bool = False  # queries only (the gradient-masking check)
    eot_label: bool = True  # "-eot" in its label on a randomized model (not where EOT is built in)
    convergence: bool = False  # the convergence check may re-run it with 2x steps and 2x EOT
    unseen: bool = False  # a kind of attack never used in training
    candidates: int = 1  # candidate adversarial examples per image
    gradients: Callable[[AttackSpec], float] = _steps  # gradient passes per attacked image
    queries: Callable[[AttackSpec], float] = lambda spec: 0.0  # forward passes, before scoring
    # the attack as the custom protocol builds it from the flags (None: the generic rule)
    from_flags: Callable[[Flags], AttackSpec] | None = None

    def work(self, spec: AttackSpec, samples: int) -> tuple[float, float]:
        """(gradient passes, forward passes) per attacked image, upper bounds (no early stops)."""
        # scoring (+ the final iterate of stepped attacks; + selection draws over several candidates)
        score = samples * (self.candidates + 1 + (2 if self.candidates > 1 else 0))
        return self.gradients(spec), self.queries(spec) + score


def _fgsm(spec, model, x, y, *, seed, gen, still_robust) -> Found:
    return Found([fgsm(model, x, y, eps=spec.eps, norm=spec.norm, eot=spec.eot)])


def _pgd_on(loss: str):
    def run(spec, model, x, y, *, seed, gen, still_robust) -> Found:
        kw = dict(eps=spec.eps, steps=spec.steps, alpha=spec.step_size(), norm=spec.norm, eot=spec.eot)
        best, last = pgd_iterates(model, x, y, **kw, loss=loss, gen=gen)
        return Found([best], final=last)

    return run


def _flow(spec, model, x, y, *, seed, gen, still_robust) -> Found:
    return flow_attack(
        model, x, y, eps=spec.eps, steps=spec.steps, eot=spec.eot, alpha=spec.step_size(), gen=gen
    )


def _autoattack(spec, model, x, y, *, seed, gen, still_robust) -> Found:
    kw = dict(norm=spec.norm, eps=spec.eps, n_iter=spec.steps, eot=spec.eot, seed=seed)
    return Found(autoattack_rand(model, x, y, **kw, still_robust=still_robust))


def _square(spec, model, x, y, *, seed, gen, still_robust) -> Found:
    return Found(
        square(model, x, y, norm=spec.norm, eps=spec.eps, queries=spec.steps, eot=spec.eot, seed=seed)
    )


# Every attack of ``atop eval``, in the order ``--attacks`` lists them. Adding one is one entry here.
ATTACK_TABLE: dict[str, Attack] = {
    "fgsm": Attack(
        _fgsm,
        step_size=lambda spec: spec.eps,
        gradients=lambda spec: float(spec.eot),
        from_flags=lambda f: AttackSpec("fgsm", f.norm, f.eps, 1, f.eot, cascade=f.cascade),
    ),
    "pgd": Attack(_pgd_on("ce"), stepped=True, step_size=_fixed_step, convergence=True),
    # PGD on the Carlini-Wagner margin of the softmax probabilities: see attacks.prob_margin_loss
    "cw": Attack(_pgd_on("cw-prob"), stepped=True, step_size=_fixed_step, convergence=True),
    "autoattack-rand": Attack(
        _autoattack,
        eot_label=False,  # the rand version is EOT by definition
        candidates=4,
        gradients=lambda spec: 2.0 * (spec.steps + 1) * spec.eot,
    ),
    "square": Attack(
        _square,
        gradient_free=True,
        eot_label=False,
        gradients=lambda spec: 0.0,
        queries=_steps,
        from_flags=lambda f: AttackSpec("square", f.norm, f.eps, f.square_queries, 1, cascade=f.cascade),
    ),
    "flow": Attack(
        _flow,
        stepped=True,
        step_size=_fixed_step,
        unseen=True,
        from_flags=lambda f: AttackSpec("flow", "flow", FLOW_EPS, f.steps, f.eot, f.alpha, cascade=False),
    ),
}
ATTACKS = tuple(ATTACK_TABLE)


def from_flags(name: str, flags: Flags) -> AttackSpec:
    """The attack ``name`` of the custom protocol."""
    kind = ATTACK_TABLE[name]
    if kind.from_flags is not None:
        return kind.from_flags(flags)
    alpha = flags.alpha if kind.stepped else 0.0  # only where a fixed step is taken (APGD adapts its own)
    return AttackSpec(name, flags.norm, flags.eps, flags.steps, flags.eot, alpha, cascade=flags.cascade)


def run_attack(
    spec: AttackSpec,
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    still_robust: Callable[[Candidates], torch.Tensor] | None = None,
) -> Found:
    """Candidate adversarial examples for (x, y); all inside the threat model of ``spec``."""
    gen = torch.Generator().manual_seed(seed)
    return spec.kind.run(spec, model, x, y, seed=seed, gen=gen, still_robust=still_robust)


def check_threat_model(spec: AttackSpec, x: torch.Tensor, x_adv: torch.Tensor, tol: float = 1e-5) -> None:
    """Raise if ``x_adv`` leaves [0,1] or the ε-ball (a bug in an attack, never a finding)."""
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        raise RuntimeError(f"{spec.name}: adversarial examples have the wrong shape or non-finite values")
    if x_adv.min() < -tol or x_adv.max() > 1 + tol:
        raise RuntimeError(f"{spec.name}: adversarial examples leave [0,1]")
    d = (x_adv - x).flatten(1)
    size = {"linf": lambda: d.abs().amax(1), "l2": lambda: d.norm(dim=1)}.get(spec.norm)
    if size is not None and float(size().max()) > spec.eps * (1 + 1e-4) + tol:
        raise RuntimeError(f"{spec.name}: perturbation {float(size().max()):.6g} exceeds eps {spec.eps:.6g}")
