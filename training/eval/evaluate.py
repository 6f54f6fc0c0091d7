"""One evaluation of one target: clean accuracy, the protocol's attacks, the ε sweep, the sanity
runs (bare-classifier PGD, convergence), costs, and the result dict (the manifest's
``evaluation`` shape plus protocol, sweep, sanity and cost blocks)."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from training.attacks import eot_gradient
from training.data import batches, load_split
from training.eval import sanity
from training.eval.attacks import NORM_NAMES, AttackSpec
from training.eval.cascade import EvalState, Outcome, Scorer, Scores, clean_scores, derive_seed, run_attacks
from training.eval.protocol import LEEKIM_LINF_ALPHA, Protocol
from training.eval.stats import interval, pair_counts, paired_difference, wilson
from training.eval.targets import Target

log = logging.getLogger("atop.eval")

SCORING = {
    "vote": "argmax of the softmax averaged over {k} fresh RT draws: the service's answer with samples={k}",
    "single": "mean over the same {k} draws of one draw's correctness: a client with samples=1, in expectation",
    "fixed": "one fixed RT draw per image, the same for every attack",
}


DETERMINISTIC = {r: "argmax of the logits (a deterministic model: the three rules coincide)" for r in SCORING}
# Bumped when the meaning of the per-image results in a state file changes, so that an older
# state file is refused rather than mixed in (2: best iterate, selection draws apart from the
# scoring draws).
EVALUATOR_VERSION = 2
INTERVALS = "95% Wilson score intervals (ci95) on the images attacked; differences: Newcombe"
ITERATE = (
    "pgd, cw, flow: headline = best iterate per image (highest EOT-averaged loss, misclassified "
    "first, on the attack's own draws); accuracy_final_iterate = the last iterate, same scoring"
)


@torch.no_grad()
def clean_accuracy(target: Target, test, n: int, seed: int, device: str = "cpu", samples: int = 1) -> dict:
    """Top-1 accuracy on ``n`` test images in one pass of ``samples`` fresh draws per image:
    ``accuracy`` of the first draw alone (the mean over the randomness) and ``answer`` of the
    softmax averaged over all of them (the service's rule with ``samples``), paired."""
    split = test.subset(n, seed=seed)
    first = answer = 0.0
    for i, (x, y) in enumerate(batches(split, 500)):
        model = target.stochastic(torch.Generator().manual_seed(derive_seed(seed, "clean-n", i)))
        x = x.to(device)
        probs = model(x).softmax(1)
        first += float((probs.argmax(1).cpu() == y).sum())
        for _ in range(samples - 1):
            probs += model(x).softmax(1)
        answer += float((probs.argmax(1).cpu() == y).sum())
    n_split = len(split)
    ci = [round(v, 6) for v in wilson(first, n_split)]
    return {
        "n": n_split,
        "accuracy": first / n_split,
        "answer": answer / n_split,
        "ci95": ci,
        "answer_ci95": [round(v, 6) for v in wilson(answer, n_split)],
    }


def measure_cost(target: Target, x: torch.Tensor, y: torch.Tensor, samples: int) -> dict:
    """Milliseconds per image: one defended forward pass (one draw), and one attack gradient
    (forward + backward through the whole pipeline), median of 3, at this batch size."""
    model = target.stochastic(torch.Generator().manual_seed(0))

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times) / len(y)

    with torch.no_grad():
        fwd = timed(lambda: model(x))
    grad = timed(lambda: eot_gradient(model, x, y))
    k = samples if target.randomized else 1
    return {
        "forward_ms_per_image": round(fwd, 3),
        "answer_ms_per_image": round(fwd * k, 3),
        "answer_draws": k,
        "gradient_ms_per_image": round(grad, 3),
        "batch": len(y),
        "threads": torch.get_num_threads(),
    }


def entry(o: Outcome, n: int, randomized: bool) -> dict:
    m = o.after.means()
    s = o.spec
    row = {
        "attack": o.label,
        "name": s.name,
        "norm": NORM_NAMES[s.norm],
        "eps": s.eps,
        "steps": s.steps,
        "eot": s.eot,
        "n_images": n,
        "accuracy": m["vote"],
        "ci95": interval(o.after.vote),
        "accuracy_single_draw": m["single"],
        "accuracy_fixed_randomness": m["fixed"],
        "step_size": s.step_size(),
        "iterate": "best" if o.final is not None else None,
        "accuracy_final_iterate": None,
        "cascade_after": o.cascade_after,
        "attacked": len(o.targets),
        "broken": int((o.alone.vote < 0.5).sum()),
        "unseen_in_training": s.kind.unseen,
        "gradients": "none (queries only)"
        if s.gradient_free
        else ("exact through RT, purifier and classifier, EOT-averaged" if randomized else "exact"),
        "wall_s": o.wall_s,
    }
    if o.after_final is not None:
        row["accuracy_final_iterate"] = o.after_final.means()["vote"]
        row["ci95_final_iterate"] = interval(o.after_final.vote)
        row["final_minus_best"] = paired_difference(o.after_final.vote, o.after.vote)
    return row


def worst_cases(outcomes: list[Outcome], clean: Scores) -> list[dict]:
    out = []
    for threat in dict.fromkeys(o.spec.threat for o in outcomes):
        group = [o for o in outcomes if o.spec.threat == threat]
        w = clean
        for o in group:
            w = w.worst(o.after)
        m = w.means()
        out.append(
            {
                "norm": NORM_NAMES[threat[0]],
                "eps": group[0].spec.eps,
                "attacks": [o.label for o in group],
                "accuracy": m["vote"],
                "ci95": interval(w.vote),
                "n_images": len(w.vote),
                "accuracy_single_draw": m["single"],
                "accuracy_fixed_randomness": m["fixed"],
            }
        )
    return out


BARE_EPS = 8 / 255  # the radius the undefended-PGD check is calibrated at (must leave <= zero_tol)


def _bare_check(cfg, target, proto, x, y, state) -> sanity.Check:
    if target.adversarially_trained:
        return sanity.undefended_pgd(
            None, len(y), cfg.zero_tol, "adversarially trained classifier: not expected to fall"
        )
    linf = [s for s in proto.attacks if s.name == "pgd" and s.norm == "linf"]
    # Without an l-inf PGD in the protocol (an l2-only run, say) the check uses Lee & Kim's
    # PGD-200: a 20-step PGD leaves some bare networks above 5% (the adapted f: 8.6%).
    default = AttackSpec("pgd", "linf", BARE_EPS, 200, 1, LEEKIM_LINF_ALPHA)
    strongest = max(linf, key=lambda s: s.steps * s.eot, default=default)  # not a --prefilter's cheap PGD
    spec = strongest.replace(eot=1, cascade=False)
    if spec.eps < BARE_EPS:
        # ~0% is what a bare network must fall to at 8/255; at a smaller radius a network can
        # honestly keep more (a figure to report, not an attack failure), so the check runs at
        # 8/255 with the protocol's step scaled in proportion.
        spec = spec.replace(eps=BARE_EPS, alpha=spec.alpha * BARE_EPS / spec.eps if spec.alpha else 0.0)
    bare = target.bare()
    scorer = Scorer(bare, 1, len(y), 0)
    clean = clean_scores(scorer, x, y, state, "bare", cfg.seed, cfg.batch_size)
    (o,) = run_attacks(
        (spec,), bare, x, y, clean, scorer, state, name="bare", seed=cfg.seed, batch_size=cfg.batch_size
    )
    return sanity.undefended_pgd(
        o.after.means()["vote"], len(y), cfg.zero_tol, eps=spec.eps, steps=spec.steps
    )


def _convergence(cfg, target, proto, x, y, clean, scorer, state, main) -> sanity.Check:
    """PGD against itself with 2x steps and 2x EOT on the first ``convergence_n`` clean-correct
    images. Under ``--prefilter`` the PGD follows its cheap copy, so the comparison keeps that:
    the variants attack the images of the subset the prefilter left robust (the same per-image
    prefilter results as the main run), and an image the prefilter broke counts as broken on
    both sides; only the costly attack's budget differs."""
    base_spec = proto.convergence
    sub = (clean.vote > 0.5).nonzero().flatten()[: proto.convergence_n]
    if base_spec is None or not len(sub):
        return sanity.Check("convergence", sanity.SKIPPED, "no convergence attack or no clean-correct images")
    n = len(sub)
    runs = [base_spec.replace(steps=2 * base_spec.steps, cascade=False)]
    if target.randomized:
        runs.append(base_spec.replace(eot=2 * base_spec.eot, cascade=False))
    reuse = [o for o in main if o.spec == base_spec and not o.cascade_after]
    chain = _after_prefilter(proto, main, base_spec)
    attacked = sub
    if chain is not None:
        cheap, costly = chain
        attacked = sub[cheap.after.vote[sub] > 0.5]  # the prefilter's survivors in the subset
    elif not reuse:
        runs.insert(0, base_spec.replace(cascade=False))
    # its own state sections under a prefilter: their image indices count from a smaller subset
    name = "convergence" if chain is None else "convergence-after-prefilter"
    kw = dict(name=name, seed=cfg.seed, batch_size=cfg.batch_size)
    outs = run_attacks(
        tuple(runs),
        target,
        x[attacked],
        y[attacked],
        clean.take(attacked),
        scorer.subset(attacked),
        state,
        **kw,
    )
    # per image of the subset, robust (1) or not: an image the prefilter broke is broken on both sides
    kept = torch.isin(sub, attacked)
    per_image = []
    for o in outs:
        v = torch.zeros(n)
        v[kept] = o.after.vote
        per_image.append(v)
    if chain is not None:
        per_image.insert(0, chain[1].after.vote[sub])
    elif reuse:
        full = torch.zeros(len(y))
        full[reuse[0].targets] = reuse[0].alone.vote
        per_image.insert(0, full[sub])
    accs = [float(v.mean()) for v in per_image]
    # (images only the variant broke, images only the 1x run broke)
    paired = {
        k: pair_counts(per_image[0], v)[1:3]
        for k, v in zip(("2x steps", "2x EOT"), per_image[1:], strict=False)
    }
    label = base_spec.label(target.randomized)
    if chain is not None:
        label += (
            f" after its {proto.prefilter[0]}x{proto.prefilter[1]} prefilter ({len(attacked)} of {n} left)"
        )
    return sanity.convergence(accs[0], accs[1], accs[2] if target.randomized else None, n, label, paired)


def _after_prefilter(proto, main, spec) -> tuple | None:
    """(the prefilter's outcome, the costly attack's) when ``spec`` ran right after its
    ``--prefilter`` copy and after nothing else; None otherwise."""
    if proto.prefilter is None:
        return None
    for cheap, o in zip(main, main[1:], strict=False):
        same_attack = (cheap.spec.name, cheap.spec.threat) == (spec.name, spec.threat)
        if (
            o.spec == spec
            and len(o.cascade_after) == 1
            and same_attack
            and cheap.spec.steps == proto.prefilter[0]
        ):
            return cheap, o
    return None


@dataclass
class _Run:
    """What every report of one evaluation shares: its images, the state, the scorer, the clean scores."""

    test: object  # the test split
    x: torch.Tensor
    y: torch.Tensor
    detected: bool
    proto: Protocol
    state: EvalState
    scorer: Scorer
    checks: list

    @property
    def sweep_n(self) -> int:
        """The sweep's images: the first ``proto.sweep_n`` of the subset (0 = all)."""
        return min(self.proto.sweep_n or len(self.y), len(self.y))


def _start(cfg, target: Target, proto: Protocol, state_path: Path | None) -> _Run:
    test = load_split(cfg.data, "test", size=target.image_size, classes=target.classes or None)
    split = test.subset(cfg.n, seed=cfg.seed)
    x, y = (split.images.float() / 255).to(cfg.device), split.labels.to(cfg.device)
    detected, diff = sanity.detect_randomized(
        target.stochastic(torch.Generator().manual_seed(cfg.seed)), x[:8]
    )
    checks = [sanity.randomness(target.randomized, detected, diff)]
    if not detected:
        proto = proto.deterministic()
    sanity.eot_policy(proto.attacks + proto.sweep, detected, cfg.force)
    identity = {"source": target.source, "role": target.role, "rt": target.spec and target.spec.to_dict()}
    identity |= {k: getattr(cfg, k) for k in ("data", "n", "seed", "samples", "batch_size")}
    identity["evaluator"] = EVALUATOR_VERSION
    state = EvalState(state_path, identity, tuple(Path(r) for r in cfg.reuse))
    scorer = Scorer(target, cfg.samples, len(y), derive_seed(cfg.seed, "fixed"), cfg.device)
    return _Run(test, x, y, detected, proto, state, scorer, checks)


def _result(cfg, target: Target, run: _Run, clean: Scores, main: list, sweep: list) -> dict:
    n, detected, m = len(run.y), run.detected, run.sweep_n
    k = cfg.samples if target.randomized else 1
    return {
        "clean_accuracy_subset": clean.means() | {"n_images": n, "ci95": interval(clean.vote)},
        "target": {"role": target.role, "description": target.description, "randomized": detected}
        | {"source": target.source, "rt": target.spec.to_dict() if target.spec else None},
        "scoring": ({r: t.format(k=k) for r, t in SCORING.items()} if detected else DETERMINISTIC)
        | {"samples": k, "headline": "vote", "iterate": ITERATE, "intervals": INTERVALS},
        "protocol": run.proto.to_dict() | {"n_images": n, "subset_seed": cfg.seed},
        "robust": [entry(o, n, detected) for o in main],
        "worst_case": worst_cases(main, clean),
        "sweep": [entry(o, m, detected) for o in sweep],
    }


def _clean_block(cfg, target: Target, run: _Run) -> dict:
    """Clean accuracy on the clean set (``clean_n`` images, forward passes only)."""
    k = cfg.samples if target.randomized else 1
    big = clean_accuracy(target, run.test, cfg.clean_n, cfg.seed, cfg.device, k)
    return {
        "clean_accuracy": big["accuracy"],
        "clean_ci95": big["ci95"],
        "n_images": big["n"],
        "clean_protocol": "top-1, one fresh RT draw per image (the mean over the randomness)",
        "clean_accuracy_answer": {"accuracy": big["answer"], "samples": k, "n_images": big["n"]}
        | {"ci95": big["answer_ci95"]}
        | {"rule": SCORING["vote"].format(k=k) if run.detected else DETERMINISTIC["vote"]},
    }


def evaluate(cfg, target: Target, proto: Protocol, state_path: Path | None) -> dict:
    t0 = time.time()
    run = _start(cfg, target, proto, state_path)
    with run.state.claimed():  # one writer per state file
        return _attack(cfg, target, run, t0)


def attack_cheap(cfg, target: Target, proto: Protocol, state_path: Path) -> None:
    """``--prefilter-only``: the run's attacks that cost no more per image than its prefilter
    (the prefilter itself, and the FGSM a preset puts before it), into its state file, and
    nothing else: a costly attack and the rest of its cascade are left for the run proper, which
    resumes from the same state. What they leave is an upper bound on what the run will report
    (the partial report shows it), known in a fraction of the run's time."""
    if proto.prefilter is None:
        raise ValueError("--prefilter-only needs --prefilter (the cheap attack it runs)")
    run = _start(cfg, target, proto, state_path)
    steps, eot = proto.prefilter
    with run.state.claimed():
        clean = clean_scores(run.scorer, run.x, run.y, run.state, "main", cfg.seed, cfg.batch_size)
        kw = dict(seed=cfg.seed, batch_size=cfg.batch_size, max_cost=steps * (eot if run.detected else 1))
        run_attacks(run.proto.attacks, target, run.x, run.y, clean, run.scorer, run.state, name="main", **kw)
        run.state.save()  # sections taken whole from --reuse states leave nothing else to write it


def _attack(cfg, target: Target, run: _Run, t0: float) -> dict:
    proto, x, y, state, scorer = run.proto, run.x, run.y, run.state, run.scorer
    n = len(y)
    clean = clean_scores(scorer, x, y, state, "main", cfg.seed, cfg.batch_size)
    kw = dict(seed=cfg.seed, batch_size=cfg.batch_size)
    main = run_attacks(proto.attacks, target, x, y, clean, scorer, state, name="main", **kw)
    m = run.sweep_n
    head = torch.arange(m)
    sweep = run_attacks(
        proto.sweep,
        target,
        x[:m],
        y[:m],
        clean.take(head),
        scorer.subset(head),
        state,
        name="sweep",
        **kw,
    )
    checks = run.checks
    if cfg.sanity:
        checks.append(_bare_check(cfg, target, proto, x, y, state))
        if proto.convergence_n:
            checks.append(_convergence(cfg, target, proto, x, y, clean, scorer, state, main))
        checks += sanity.whitebox_vs_blackbox(main, n)
        pts: dict[str, list] = {}
        for o in sweep:
            pts.setdefault(o.spec.norm, []).append((o.spec.eps, o.after.means()["vote"]))
        checks += sanity.eps_sweep(pts, float(clean.vote[:m].mean()), m, cfg.zero_tol)
    return {
        **_clean_block(cfg, target, run),
        **_result(cfg, target, run, clean, main, sweep),
        "sanity": sanity.summarize(checks),
        "cost": measure_cost(target, x[: min(n, cfg.batch_size)], y[: min(n, cfg.batch_size)], cfg.samples),
        "wall_s": round(time.time() - t0, 1),
        "attack_wall_s": state.attack_wall_s(),
    }


PENDING = "the run has not ended: its sanity checks, ε sweep and cost come with its final report"


CLEAN_BLOCK = ("clean_accuracy", "clean_ci95", "n_images", "clean_protocol", "clean_accuracy_answer")


def partial_report(
    cfg, target: Target, proto: Protocol, state_path: Path, clean_block: dict | None = None
) -> dict:
    """The report of what a run's state file has finished so far, without attacking anything and
    without writing the state (the run may be going on beside it): the finished attacks, with
    intervals and their cascade, the worst case over them, and the clean accuracy on the clean
    set (forward passes only: the figure the final report gives). Marked ``partial``.
    ``clean_block``: that clean accuracy as an earlier partial report of the same target and
    clean set computed it (its ``CLEAN_BLOCK`` keys), so a refresh does not pass over the
    10,000 images again."""
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: no state file, so nothing to report (start the run first)")
    run = _start(cfg, target, proto, state_path)
    run.state.path = None  # read only: the running evaluation owns the file
    if "scores" not in run.state.peek("main/clean"):
        raise ValueError(f"{state_path}: the run has not scored its clean images yet; nothing to report")
    clean = clean_scores(run.scorer, run.x, run.y, run.state, "main", cfg.seed, cfg.batch_size)
    kw = dict(seed=cfg.seed, batch_size=cfg.batch_size, finished_only=True)
    main = run_attacks(
        run.proto.attacks, target, run.x, run.y, clean, run.scorer, run.state, name="main", **kw
    )
    left = [s.label(run.detected) + f" {s.norm} {s.steps}x{s.eot}" for s in run.proto.attacks]
    done = [o.spec for o in main]
    return {
        "partial": True,
        "pending_attacks": [t for s, t in zip(run.proto.attacks, left, strict=True) if s not in done],
        **(clean_block or _clean_block(cfg, target, run)),
        **_result(cfg, target, run, clean, main, []),
        "sanity": {"all_passed": False, "failed": [], "checks": [], "pending": PENDING},
        "cost": {},
        "wall_s": round(sum(o.wall_s for o in main), 1),
    }
