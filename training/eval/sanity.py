"""Sanity checks of a robustness evaluation (DESIGN.md, "Honest robustness evaluation").

Each check returns a ``Check`` with status pass, fail or skipped (with the reason). A failure
is never fatal: it is logged as a WARNING, printed with the table and stored in the result's
``sanity`` block, because a failed check is a finding about the evaluation that a reader must
see, not something to hide by aborting. The checks:

* ``randomness`` — the attacked model is called several times on the same images; differing
  logits mean a randomized model (as AutoAttack's ``check_randomized``). A randomized model
  attacked with EOT 1 is refused before any work (``eot_policy``) unless forced.
* ``undefended_pgd`` — PGD drives the bare (not adversarially trained) classifier to ~0% at
  ℓ∞ 8/255 (or the protocol's ℓ∞ radius when larger); otherwise the attack, not the defense, is
  broken. A protocol at a smaller radius still checks at 8/255: there a bare network may keep
  more, honestly.
* ``eps_monotone_<norm>`` / ``eps_reaches_zero_<norm>`` — accuracy does not rise with ε (beyond
  sampling slack) and is ~0% at the largest ε of the sweep.
* ``whitebox_le_blackbox_<threat>`` — Square must not break a meaningful share of points that
  every gradient attack of the same threat model left robust: if it does, gradients are masked.
* ``convergence`` — twice the steps or twice the EOT draws do not raise attack success beyond
  slack on a subset; otherwise the budget is too small and the figure over-rates robustness.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from training.eval.stats import mcnemar_exact

log = logging.getLogger("atop.eval.sanity")

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    values: dict = field(default_factory=dict)


def slack(n: int, points: int = 2, floor: float = 0.02) -> float:
    """Tolerance for comparing two accuracies on n images: ``points`` images or ``floor``."""
    return max(floor, points / max(n, 1))


@torch.no_grad()
def detect_randomized(model, x: torch.Tensor, calls: int = 4, tol: float = 1e-6) -> tuple[bool, float]:
    """(randomized?, largest logit difference) over ``calls`` forward passes on ``x``."""
    outs = [model(x) for _ in range(calls)]
    diff = max(float((o - outs[0]).abs().max()) for o in outs[1:])
    return diff > tol, diff


def randomness(declared: bool, detected: bool, diff: float) -> Check:
    values = {"declared": declared, "detected": detected, "max_logit_diff": diff}
    if declared == detected:
        what = "randomized: every gradient averages EOT draws" if detected else "deterministic: EOT 1"
        return Check("randomness", PASS, what, values)
    return Check(
        "randomness",
        FAIL,
        f"the model is {'randomized' if detected else 'deterministic'} but was declared otherwise; "
        "the evaluation follows what was detected",
        values,
    )


def eot_policy(attacks, randomized: bool, force: bool) -> None:
    """Refuse gradient attacks with EOT 1 on a randomized model (they over-rate robustness)."""
    bad = [a.name for a in attacks if randomized and a.eot == 1 and not a.gradient_free]
    if bad and not force:
        raise ValueError(
            f"the model is randomized but {', '.join(bad)} would run with EOT 1, which over-rates "
            "robustness; use --eot >= 2 (the presets use 20), or --force to do it anyway"
        )
    if bad:
        log.warning("FORCED: %s with EOT 1 on a randomized model", ", ".join(bad))


def undefended_pgd(
    acc: float | None,
    n: int,
    zero_tol: float,
    skip: str = "",
    eps: float | None = None,
    steps: int | None = None,
) -> Check:
    if skip or acc is None:
        return Check("undefended_pgd", SKIPPED, skip or "no PGD result for the bare classifier")
    ok = acc <= zero_tol
    at = f" at linf {eps * 255:.3g}/255" if eps is not None else ""
    name = f"PGD-{steps}" if steps else "PGD"
    detail = f"bare classifier under {name}{at}: {acc:.1%} on {n} images (must be <= {zero_tol:.0%})"
    values = {"accuracy": acc, "n_images": n} | ({"eps": eps} if eps is not None else {})
    values |= {"steps": steps} if steps else {}
    return Check("undefended_pgd", PASS if ok else FAIL, detail, values)


def eps_sweep(
    points: dict[str, list[tuple[float, float]]], clean: float, n: int, zero_tol: float
) -> list[Check]:
    """``points``: norm -> [(eps, accuracy)] from the sweep (same images, same attack)."""
    checks = []
    tol = slack(n)
    for norm, pts in sorted(points.items()):
        pts = sorted(pts)
        accs = [clean] + [a for _, a in pts]
        rises = [(pts[i][0], accs[i], accs[i + 1]) for i in range(len(pts)) if accs[i + 1] > accs[i] + tol]
        values = {"eps": [e for e, _ in pts], "accuracy": [a for _, a in pts], "clean": clean, "slack": tol}
        if rises:
            e, a0, a1 = rises[0]
            detail = f"accuracy rises with eps: {a0:.1%} -> {a1:.1%} at eps={e:.4g} (slack {tol:.1%})"
            checks.append(Check(f"eps_monotone_{norm}", FAIL, detail, values))
        else:
            checks.append(
                Check(f"eps_monotone_{norm}", PASS, f"non-increasing over {len(pts)} eps values", values)
            )
        last_eps, last = pts[-1]
        ok = last <= zero_tol
        detail = f"{last:.1%} at the largest eps={last_eps:.4g} (must be <= {zero_tol:.0%})"
        checks.append(
            Check(
                f"eps_reaches_zero_{norm}", PASS if ok else FAIL, detail, {"eps": last_eps, "accuracy": last}
            )
        )
    return checks


def whitebox_vs_blackbox(outcomes, n: int, tol: float | None = None) -> list[Check]:
    """Per threat model with a Square attack: the share of images Square broke although every
    gradient attack of that threat model left them robust (cascade or not, the same test)."""
    tol = slack(n, points=3, floor=0.01) if tol is None else tol
    checks = []
    for sq in (o for o in outcomes if o.spec.gradient_free):
        norm, eps = sq.spec.threat
        name = f"whitebox_le_blackbox_{norm}_{eps:.4g}"
        wb = [o for o in outcomes if o.spec.threat == sq.spec.threat and not o.spec.gradient_free]
        if not wb:
            checks.append(Check(name, SKIPPED, "no gradient attack at this threat model"))
            continue
        robust = torch.ones(n, dtype=torch.bool)
        for o in wb:
            r = torch.zeros(n, dtype=torch.bool)
            r[o.targets] = o.alone.vote > 0.5
            robust &= r
        broke = torch.zeros(n, dtype=torch.bool)
        broke[sq.targets] = sq.alone.vote < 0.5
        extra = int((broke & robust).sum())
        values = {
            "whitebox_accuracy": float(robust.float().mean()),
            "square_extra_breaks": extra,
            "square_extra_fraction": extra / n,
            "tolerance": tol,
            "whitebox": [o.label for o in wb],
        }
        bad = extra / n > tol
        detail = (
            f"Square broke {extra} of the {int(robust.sum())} images that {', '.join(values['whitebox'])}"
            f" left robust ({extra / n:.1%} of the {n}-image subset; tolerance {tol:.1%})"
            + (": gradients look masked" if bad else "")
        )
        checks.append(Check(name, FAIL if bad else PASS, detail, values))
    return checks


def convergence(
    base: float,
    more_steps: float,
    more_eot: float | None,
    n: int,
    label: str,
    paired: dict[str, tuple[int, int]] | None = None,
) -> Check:
    """The attack against itself with 2x steps and 2x EOT on the same ``n`` images: FAIL when a
    variant's accuracy is lower by more than ``slack(n)``. ``paired`` (variant -> images only the
    variant broke, images only the 1x attack broke) adds the exact McNemar p of each comparison
    to the detail and values; it informs the reader (on a randomized defense two runs of the
    same attack break different images) and never changes the verdict."""
    tol = slack(n)
    values = {
        "attack": label,
        "n_images": n,
        "base": base,
        "steps_x2": more_steps,
        "eot_x2": more_eot,
        "slack": tol,
    }
    worse = [
        (k, v)
        for k, v in (("2x steps", more_steps), ("2x EOT", more_eot))
        if v is not None and v < base - tol
    ]
    parts = f"{label} on {n} images: {base:.1%}; 2x steps {more_steps:.1%}" + (
        f"; 2x EOT {more_eot:.1%}" if more_eot is not None else ""
    )
    if paired:
        values["paired"] = {
            k: {
                "broken_by_variant_only": v,
                "broken_by_1x_only": o,
                "mcnemar_p": round(mcnemar_exact(v, o), 4),
            }
            for k, (v, o) in paired.items()
        }
        parts += (
            " (paired against 1x: "
            + "; ".join(
                f"{k} broke {d['broken_by_variant_only']} that 1x left, 1x broke {d['broken_by_1x_only']} "
                f"that it left, exact McNemar p = {d['mcnemar_p']:.2f}"
                for k, d in values["paired"].items()
            )
            + ")"
        )
    if worse:
        return Check(
            "convergence",
            FAIL,
            f"{parts}: {worse[0][0]} lowers accuracy beyond {tol:.1%}, not converged",
            values,
        )
    return Check("convergence", PASS, f"{parts} (slack {tol:.1%})", values)


def summarize(checks: list[Check]) -> dict:
    failed = [c.name for c in checks if c.status == FAIL]
    for c in checks:
        if c.status == FAIL:
            log.warning("SANITY CHECK FAILED: %s: %s", c.name, c.detail)
    return {"all_passed": not failed, "failed": failed, "checks": [asdict(c) for c in checks]}


def warning_lines(sanity: dict) -> list[str]:
    return [
        f"WARNING: SANITY CHECK FAILED: {c['name']}: {c['detail']}"
        for c in sanity.get("checks", [])
        if c["status"] == FAIL
    ]
