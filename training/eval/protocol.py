"""Attack protocols for ``atop eval``: the presets and the custom one built from flags.

Attacks of one threat model (norm, ε) with ``cascade=True`` run in the listed order, each on the
points still robust after the previous ones (as AutoAttack does); ``cascade=False`` attacks run
on every clean-correct point and give a figure on their own. The worst case per threat model is
the fraction of points robust to all of its attacks, which is the same number either way.

``leekim`` — the full protocol (Lee & Kim, ICCV 2023, for the PGD settings; AutoAttack's
``rand`` version; AutoAttack's Square budget):

=====================  =========  ======  ===============  ====  ==========================
attack                 threat     steps   step size        EOT   notes
=====================  =========  ======  ===============  ====  ==========================
FGSM                   ℓ∞ 8/255   1       ε                20    alone (not in the cascade)
PGD (CE)               ℓ∞ 8/255   200     0.007            20    Lee & Kim
AutoAttack-rand        ℓ∞ 8/255   100     adaptive         20    APGD-CE → APGD-DLR
Square                 ℓ∞ 8/255   5000 q  p_init 0.8       1     gradient-free, last
PGD (CE)               ℓ2 0.5     200     0.1              20    step: our choice, see below
flow (CW margin)       ≤ 1 px     100     2.5·ε/steps      20    unseen kind, alone
=====================  =========  ======  ===============  ====  ==========================

ℓ2 step 0.1: Lee & Kim's ℓ∞ step is 0.22·ε (0.007 at 8/255); 0.1 is 0.2·ε at ε = 0.5, the
same ratio. With 200 steps the iterate can cross the ball ~40 times, so the step is small for
precision, not for reach. Deterministic targets (undefended, AT) get EOT 1 everywhere: there is
nothing to average. The ε sweep (plot and monotonicity check) uses PGD with 50 steps, EOT 8 on
``sweep_n`` images; the convergence check re-runs the ℓ∞ PGD with 2x steps and 2x EOT on
``convergence_n`` images.

``quick`` — the same shape at a development budget (20 steps, EOT 4, 300 Square queries).

Either preset (or a custom protocol) with ``--prefilter STEPSxEOT`` (``Protocol.with_prefilter``):
a cheap copy of each costly PGD and flow attack runs first, and the costly one only on its
survivors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from training.eval.attacks import FLOW_EPS, AttackSpec, Flags, from_flags

LINF_EPS = 8 / 255
L2_EPS = 0.5
LEEKIM_LINF_ALPHA = 0.007
LEEKIM_L2_ALPHA = 0.1
SWEEP_LINF = (2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255)
SWEEP_L2 = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
PRESETS = ("custom", "quick", "leekim")
PREFILTER_THREATS = ("linf", "l2", "flow")


@dataclass(frozen=True)
class Protocol:
    name: str
    attacks: tuple[AttackSpec, ...]
    sweep: tuple[AttackSpec, ...] = ()
    sweep_n: int = 0  # images for the sweep (the first ones of the subset); 0 = all
    convergence: AttackSpec | None = None  # the attack whose convergence is checked
    convergence_n: int = 0
    prefilter: tuple[int, int] | None = None  # (steps, eot) of the cheap attack before each costly one
    prefilter_threats: tuple[str, ...] = ()  # the norms it goes before; () = every one

    def deterministic(self) -> Protocol:
        """EOT 1 everywhere (nothing to average on a deterministic model)."""
        one = lambda specs: tuple(s.replace(eot=1) for s in specs)  # noqa: E731
        conv = self.convergence.replace(eot=1) if self.convergence else None
        return dataclasses.replace(self, attacks=one(self.attacks), sweep=one(self.sweep), convergence=conv)

    def without_cascade(self) -> Protocol:
        """Every attack on every clean-correct image (a figure per attack alone)."""
        alone = tuple(s.replace(cascade=False) for s in self.attacks)
        conv = self.convergence.replace(cascade=False) if self.convergence else None
        return dataclasses.replace(self, attacks=alone, convergence=conv)

    def with_prefilter(self, steps: int, eot: int, threats: tuple[str, ...] = ()) -> Protocol:
        """Before each stepped gradient attack of the main list that costs more than ``steps`` x
        ``eot`` gradient passes per image, the same attack at that budget on the same threat
        model, both in the cascade: the costly attack then runs only on the images the cheap one
        left robust, as AutoAttack runs each attack on the survivors of the one before. The worst
        case is the same quantity (an image counts as robust only if it survives both); the
        costly attack's own figure becomes cumulative (reported "after" the prefilter: the worst
        case over both, not what it alone would leave). The prefilter's step: the costly attack's, scaled to the
        fewer steps, at most eps/4 (the PGD-50 x EOT-8 runs of docs/results.md used eps/4).
        ``threats`` (norms: linf, l2, flow) limits it to those threat models' attacks: a run begun
        without a prefilter keeps the sections it finished and takes one for what remains."""
        out: list[AttackSpec] = []
        for s in self.attacks:
            costly = s.kind.stepped and not s.gradient_free and s.steps * s.eot > steps * eot
            costly = costly and (not threats or s.norm in threats)
            if costly:
                step = min((s.step_size() or 0.0) * s.steps / steps, s.eps / 4)
                cheap = s.replace(steps=steps, eot=min(eot, s.eot), alpha=step, cascade=True)
                out += [cheap, s.replace(cascade=True)]
            else:
                out.append(s)
        return dataclasses.replace(
            self, attacks=tuple(out), prefilter=(steps, eot), prefilter_threats=tuple(threats)
        )

    def prefiltered(self, spec: AttackSpec) -> bool:
        """Whether a prefilter goes before attacks of ``spec``'s threat model."""
        return self.prefilter is not None and (
            not self.prefilter_threats or spec.norm in self.prefilter_threats
        )

    def to_dict(self) -> dict:
        return {
            "preset": self.name,
            "prefilter": None
            if self.prefilter is None
            else {"steps": self.prefilter[0], "eot": self.prefilter[1]}
            | ({"threats": list(self.prefilter_threats)} if self.prefilter_threats else {}),
            "attacks": [s.__dict__ | {"step_size": s.step_size()} for s in self.attacks],
            "sweep": [s.__dict__ for s in self.sweep],
            "sweep_n": self.sweep_n,
            "convergence": None if self.convergence is None else self.convergence.__dict__,
            "convergence_n": self.convergence_n,
        }


def _sweep(steps: int, eot: int) -> tuple[AttackSpec, ...]:
    linf = [AttackSpec("pgd", "linf", e, steps, eot, cascade=False) for e in SWEEP_LINF]
    return tuple(linf + [AttackSpec("pgd", "l2", e, steps, eot, cascade=False) for e in SWEEP_L2])


def leekim(sweep_n: int = 128, convergence_n: int = 64) -> Protocol:
    pgd_linf = AttackSpec("pgd", "linf", LINF_EPS, 200, 20, LEEKIM_LINF_ALPHA)
    attacks = (
        AttackSpec("fgsm", "linf", LINF_EPS, 1, 20, cascade=False),
        pgd_linf,
        AttackSpec("autoattack-rand", "linf", LINF_EPS, 100, 20),
        AttackSpec("square", "linf", LINF_EPS, 5000, 1),
        AttackSpec("pgd", "l2", L2_EPS, 200, 20, LEEKIM_L2_ALPHA),
        AttackSpec("flow", "flow", FLOW_EPS, 100, 20, cascade=False),
    )
    return Protocol("leekim", attacks, _sweep(50, 8), sweep_n, pgd_linf, convergence_n)


def quick(sweep_n: int = 0, convergence_n: int = 16) -> Protocol:
    pgd_linf = AttackSpec("pgd", "linf", LINF_EPS, 20, 4)
    attacks = (
        AttackSpec("fgsm", "linf", LINF_EPS, 1, 4, cascade=False),
        pgd_linf,
        AttackSpec("autoattack-rand", "linf", LINF_EPS, 20, 4),
        AttackSpec("square", "linf", LINF_EPS, 300, 1),
        AttackSpec("pgd", "l2", L2_EPS, 20, 4),
        AttackSpec("flow", "flow", FLOW_EPS, 20, 4, cascade=False),
    )
    return Protocol("quick", attacks, _sweep(10, 2), sweep_n, pgd_linf, convergence_n)


def custom(
    names: tuple[str, ...],
    *,
    norm: str,
    eps: float,
    steps: int,
    eot: int,
    alpha: float,
    square_queries: int,
    cascade: bool,
    sweep: bool,
    sweep_n: int,
    convergence_n: int,
) -> Protocol:
    """The attacks named on the command line, at one threat model (flow: ``FLOW_EPS`` pixels)."""
    flags = Flags(norm, eps, steps, eot, alpha, square_queries, cascade)
    specs = [from_flags(name, flags) for name in names]
    grads = [s for s in specs if s.kind.convergence]
    conv = grads[0] if grads and convergence_n else None
    return Protocol("custom", tuple(specs), _sweep(steps, eot) if sweep else (), sweep_n, conv, convergence_n)


def estimate(
    proto: Protocol, n: int, samples: int, grad_ms: float, fwd_ms: float, survival: float = 1.0
) -> dict:
    """Wall time, gradient and forward costs per image as measured. With ``survival`` 1 (the
    default) an upper bound: every image attacked by every attack. Otherwise the first cascaded
    attack of each threat model runs on every image and the later ones on ``survival`` of them
    (the fraction the first leaves robust, e.g. from a run's partial report), as do the
    convergence variants under a prefilter (they attack only its survivors)."""
    if not 0 < survival <= 1:
        raise ValueError(f"survival must be in (0, 1], got {survival}")
    rows = []
    m = min(proto.sweep_n or n, n)
    seen: set[tuple[str, float]] = set()
    jobs = []
    for s in proto.attacks:
        threat = (s.norm, s.eps)
        later = s.cascade and threat in seen
        if s.cascade:
            seen.add(threat)
        jobs.append((s, n * survival if later else n, "main"))
    jobs += [(s, m, "sweep") for s in proto.sweep]
    if proto.convergence and proto.convergence_n:
        c = proto.convergence
        k = proto.convergence_n * (survival if proto.prefiltered(c) else 1.0)
        jobs += [(c.replace(steps=2 * c.steps), k, "convergence")]
        jobs += [(c.replace(eot=2 * c.eot), k, "convergence")]
    for spec, images, role in jobs:
        g, f = spec.kind.work(spec, samples)
        seconds = images * (g * grad_ms + f * fwd_ms) / 1000
        rows.append({"role": role, "attack": spec.key, "images": round(images), "hours": seconds / 3600})
    return {"hours": sum(r["hours"] for r in rows), "rows": rows, "survival": survival}
