"""The evaluation's attacks, scoring rules and sanity checks on toy models (no data, < 20 s):
every attack breaks a linear model inside its ε-ball; EOT recovers the gradient of a randomized
toy where single draws are useless; the vote/single/fixed rules match known odds; a
gradient-masked toy defense is caught by the white-box <= black-box check; AutoAttack-rand runs
on a tiny stochastic pipeline with the package's rand settings; the global RNG is left alone."""

from __future__ import annotations

import pytest
import torch

from tests.eval_toys import Antithetic, Coin, Hashed, Overshoot, Quantized, toy_data
from training.attacks import eot_gradient, margin_loss
from training.eval import cascade, sanity
from training.eval.attacks import AUTOATTACK_RAND, AttackSpec, Found, check_threat_model, run_attack
from training.eval.cascade import EvalState, Scorer, clean_scores, run_attacks
from training.eval.stats import diff_independent, diff_paired, paired_difference, wilson
from training.eval.targets import Target

EPS = {"linf": 0.1, "l2": 1.0, "flow": 1.0}
CASES = [
    ("fgsm", "linf"),
    ("fgsm", "l2"),
    ("pgd", "linf"),
    ("pgd", "l2"),
    ("cw", "l2"),
    ("autoattack-rand", "linf"),
    ("autoattack-rand", "l2"),
    ("square", "linf"),
    ("square", "l2"),
    ("flow", "flow"),
]


def accuracy(model, cands, y) -> float:
    """Accuracy when the attacker keeps, per point, any candidate that fools the model."""
    with torch.no_grad():
        ok = torch.stack([model(c).argmax(1) == y for c in cands]).all(0)
    return float(ok.float().mean())


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_each_attack_breaks_a_linear_model_inside_its_ball(name, norm):
    x, y, model = toy_data(n=24)
    steps = {"square": 1000, "fgsm": 1, "autoattack-rand": 20}.get(name, 20)
    spec = AttackSpec(name, norm, EPS[norm], steps, 1)
    found = run_attack(spec, model, x, y, seed=0)
    cands = found.cands
    for c in found.all():
        check_threat_model(spec, x, c)  # raises if outside [0,1] or the ball
        d = (c - x).flatten(1)
        if norm == "linf":
            assert d.abs().amax(1).max() <= spec.eps + 1e-6
        elif norm == "l2":
            assert d.norm(dim=1).max() <= spec.eps * (1 + 1e-4) + 1e-6
    limit = 0.5 if name == "fgsm" else 0.2
    assert accuracy(model, cands, y) <= limit, f"{name}-{norm} left {accuracy(model, cands, y):.0%}"


def test_check_threat_model_rejects_a_perturbation_outside_the_ball():
    x = toy_data(n=4)[0] * 0.5
    spec = AttackSpec("pgd", "linf", 0.05)
    check_threat_model(spec, x, x + 0.05)
    with pytest.raises(RuntimeError, match="exceeds eps"):
        check_threat_model(spec, x, x + 0.06)
    with pytest.raises(RuntimeError, match=r"leave \[0,1\]"):
        check_threat_model(spec, x, x - 0.6)


def test_eot_averages_the_randomness_away():
    x, y, lin = toy_data(n=24, margin=0.5)
    model = Antithetic(lin)
    # The CW margin is linear in the logits, so two antithetic draws give the gradient of the
    # expected model exactly (cross-entropy's softmax would mix the draws non-linearly).
    g2, _ = eot_gradient(model, x, y, eot=2, loss="cw")
    xi = x.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(margin_loss(model.expected(xi), y).sum(), xi)
    assert torch.allclose(g2, exact, atol=1e-4)
    g1, _ = eot_gradient(model, x, y, eot=1, loss="cw")
    agree = (g1.sign() == exact.sign()).float().mean()
    assert agree < 0.7  # a single draw's gradient is close to a coin flip
    assert sanity.detect_randomized(model, x)[0]
    eps = 0.1
    base = AttackSpec("pgd", "linf", eps, 20)
    without = accuracy(model.expected, run_attack(base, model, x, y, seed=0).cands, y)
    with_eot = accuracy(model.expected, run_attack(base.replace(eot=2), model, x, y, seed=0).cands, y)
    assert with_eot <= 0.2 < 0.7 <= without


def test_scoring_rules_on_known_odds():
    n, k = 400, 15
    target = Target("pipeline", classifier=torch.nn.Identity(), pipeline=Coin(p=0.7), spec=Coin(0.7).spec)
    scorer = Scorer(target, samples=k, n=n, fixed_seed=1)
    x = torch.rand(n, 3, 8, 8)
    y = torch.zeros(n, dtype=torch.long)
    s = scorer.score(x, y, torch.arange(n), seed=2).means()
    assert abs(s["single"] - 0.7) < 0.05  # one draw: right 70% of the time
    assert abs(s["fixed"] - 0.7) < 0.08  # one fixed draw per image: the same odds
    assert s["vote"] > 0.9  # majority of 15 draws at 70%: right ~95% of the time
    # Candidates: per image the one with the smaller vote margin (on the selection draws).
    wrong = Target("pipeline", classifier=torch.nn.Identity(), pipeline=Coin(p=0.05), spec=Coin(0.7).spec)
    sc = Scorer(wrong, samples=k, n=n, fixed_seed=1)
    mixed = sc.score(sc.choose([x, x], y, seed=3), y, torch.arange(n), seed=2)
    assert mixed.means()["vote"] < 0.05
    # A deterministic model: the three rules coincide.
    _, _, lin = toy_data(n=4)
    det = Scorer(Target("undefended", lin), samples=k, n=4, fixed_seed=1)
    xd, yd, _ = toy_data(n=4)
    r = det.score(xd, yd, torch.arange(4), seed=0)
    assert torch.equal(r.vote, r.single) and torch.equal(r.vote, r.fixed)


def _run(model, specs, x, y):
    target = Target("undefended", model)
    scorer = Scorer(target, 1, len(y), 0)
    state = EvalState(None, {})
    clean = clean_scores(scorer, x, y, state, "t", 0, 8)
    return run_attacks(specs, target, x, y, clean, scorer, state, name="t", seed=0, batch_size=8)


def test_whitebox_vs_blackbox_flags_a_gradient_masked_defense():
    x, y, lin = toy_data(n=24, margin=0.5)
    specs = (AttackSpec("pgd", "linf", 0.15, 20), AttackSpec("square", "linf", 0.15, 500))
    masked = _run(Quantized(lin), specs, x, y)
    check = sanity.whitebox_vs_blackbox(masked, len(y))[0]
    assert check.status == sanity.FAIL and "masked" in check.detail
    assert check.values["square_extra_breaks"] > len(y) // 2
    survivors = round(check.values["whitebox_accuracy"] * len(y))
    assert f"broke {check.values['square_extra_breaks']} of the {survivors} images" in check.detail
    honest = _run(lin, specs, x, y)
    assert sanity.whitebox_vs_blackbox(honest, len(y))[0].status == sanity.PASS
    # The same finding with every attack alone (no cascade).
    alone = tuple(s.replace(cascade=False) for s in specs)
    assert sanity.whitebox_vs_blackbox(_run(Quantized(lin), alone, x, y), len(y))[0].status == sanity.FAIL


def test_other_sanity_checks():
    assert sanity.undefended_pgd(0.0, 100, 0.05).status == sanity.PASS
    assert sanity.undefended_pgd(0.3, 100, 0.05).status == sanity.FAIL
    assert sanity.undefended_pgd(None, 100, 0.05, "AT").status == sanity.SKIPPED
    good = sanity.eps_sweep({"linf": [(1, 0.6), (2, 0.3), (4, 0.01)]}, 0.9, 100, 0.05)
    assert [c.status for c in good] == [sanity.PASS, sanity.PASS]
    bad = sanity.eps_sweep({"linf": [(1, 0.3), (2, 0.6), (4, 0.2)]}, 0.9, 100, 0.05)
    assert [c.status for c in bad] == [sanity.FAIL, sanity.FAIL]
    assert sanity.convergence(0.5, 0.49, 0.5, 64, "pgd").status == sanity.PASS
    assert sanity.convergence(0.5, 0.40, 0.5, 64, "pgd").status == sanity.FAIL
    # the paired counts inform; the verdict stays the rule's
    churn = sanity.convergence(42 / 64, 42 / 64, 38 / 64, 64, "pgd", {"2x steps": (5, 5), "2x EOT": (6, 2)})
    assert churn.status == sanity.FAIL and "2x EOT broke 6 that 1x left" in churn.detail
    assert churn.values["paired"]["2x EOT"]["mcnemar_p"] == pytest.approx(0.2891, abs=1e-4)
    assert churn.values["paired"]["2x steps"]["mcnemar_p"] == 1.0


def test_exact_mcnemar_is_the_two_sided_binomial_tail():
    from training.eval.stats import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_exact(2, 6) == mcnemar_exact(6, 2) == pytest.approx(2 * (1 + 8 + 28) / 2**8)
    with pytest.raises(ValueError, match="EOT 1"):
        sanity.eot_policy([AttackSpec("pgd", eot=1)], randomized=True, force=False)
    sanity.eot_policy([AttackSpec("pgd", eot=1)], randomized=True, force=True)
    sanity.eot_policy([AttackSpec("square", eot=1)], randomized=True, force=False)


def test_autoattack_rand_on_a_tiny_stochastic_pipeline():
    from pyautoattack import AutoAttack

    from training.classifier import ClassifierConfig, ResNet
    from training.purifier import DefendedPipeline, PurifierConfig, UNetPurifier
    from training.transforms import RTSpec

    torch.manual_seed(0)
    pipe = DefendedPipeline(
        UNetPurifier(PurifierConfig(4)), ResNet(ClassifierConfig(depth=1, width=4)), RTSpec()
    ).eval()
    target = Target("ap", pipe.classifier, pipe.requires_grad_(False), RTSpec())
    x = torch.rand(6, 3, 32, 32)
    model = target.stochastic(torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    aa = AutoAttack(model, norm="Linf", eps=8 / 255, version="rand")  # the package's rand settings
    assert tuple(aa.attacks_to_run) == AUTOATTACK_RAND["attacks"]
    assert (aa.apgd.n_iter, aa.apgd.n_restarts, aa.apgd.eot_iter) == (
        AUTOATTACK_RAND["n_iter"],
        AUTOATTACK_RAND["n_restarts"],
        AUTOATTACK_RAND["eot_iter"],
    )
    rng = torch.get_rng_state()
    spec = AttackSpec("autoattack-rand", "linf", 8 / 255, 4, 2)
    calls = []
    cands = run_attack(
        spec, model, x, y, seed=3, still_robust=lambda c: calls.append(c) or torch.ones(6, dtype=torch.bool)
    ).cands
    assert torch.equal(rng, torch.get_rng_state())  # pyautoattack's reseeding stayed inside
    assert len(cands) == 4 and len(calls) == 1  # CE best/last + DLR best/last; DLR after CE
    for c in cands:
        check_threat_model(spec, x, c)
    run_attack(AttackSpec("pgd", "linf", 8 / 255, 2, 2), model, x, y, seed=0)
    assert not any(m.training for m in pipe.modules())  # BatchNorm stays in eval mode


def test_wilson_intervals_known_values():
    lo, hi = wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(1.959964**2 / (10 + 1.959964**2), abs=1e-6)  # 0.2775
    assert wilson(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson(10, 10) == pytest.approx((1 - 0.277533, 1.0), abs=1e-6)
    assert wilson(0, 512)[1] == pytest.approx(0.007447, abs=1e-6)  # 0 of 512 robust: up to 0.74%
    assert wilson(256, 512) == pytest.approx((0.456852, 0.543148), abs=1e-6)
    assert wilson(0, 0) == (0.0, 1.0)


def test_difference_intervals():
    # Newcombe (1998, Stat. Med. 17:873), method 10, his examples: 56/70 - 48/80 and 9/10 - 3/10.
    assert diff_independent(56, 70, 48, 80) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)
    assert diff_independent(9, 10, 3, 10) == pytest.approx((0.6, 0.1705, 0.8090), abs=1e-4)
    # Paired with no correlation between the pairs (ad = bc): the independent interval.
    assert diff_paired(10, 10, 10, 10) == pytest.approx(diff_independent(20, 40, 20, 40), abs=1e-12)
    # Positively correlated pairs: narrower than the independent interval, same estimate.
    d, lo, hi = diff_paired(40, 6, 1, 13)
    di, loi, hii = diff_independent(46, 60, 41, 60)
    assert d == pytest.approx(di) and loi < lo < d < hi < hii
    same = paired_difference(torch.tensor([1.0, 0, 1, 1]), torch.tensor([1.0, 0, 1, 1]))
    assert same["difference"] == 0 and same["ci95"][0] < 0 < same["ci95"][1]


def test_candidates_are_chosen_on_draws_apart_from_the_scoring_draws(monkeypatch):
    """Four candidates, each right on 70% of draws, unrelated across candidates (Hashed). Picking
    per image the candidate the scoring draws misjudge would report ~0.7^4 = 24%; choosing on
    separate draws and then scoring the choice gives ~70%, the odds of any one candidate."""
    n = 300
    pipe = Hashed(p=0.7)
    target = Target("pipeline", classifier=torch.nn.Identity(), pipeline=pipe, spec=pipe.spec)
    scorer = Scorer(target, samples=1, n=n, fixed_seed=1)
    x, y = 0.9 * torch.rand(n, 3, 8, 8), torch.zeros(n, dtype=torch.long)
    cands = [x + 0.0137 * i for i in range(4)]
    monkeypatch.setattr(cascade, "run_attack", lambda *a, **kw: Found(list(cands)))
    seen = {"choose": [], "score": []}
    choose, score = Scorer.choose, Scorer.score

    def spy_choose(self, c, yy, seed):
        seen["choose"].append(seed)
        return choose(self, c, yy, seed)

    def spy_score(self, xx, yy, idx, seed):
        seen["score"].append(seed)
        return score(self, xx, yy, idx, seed)

    monkeypatch.setattr(Scorer, "choose", spy_choose)
    monkeypatch.setattr(Scorer, "score", spy_score)
    clean = cascade.Scores(*(torch.ones(n) for _ in range(3)))
    spec = AttackSpec("square", "linf", 0.1, 10)
    kw = dict(name="t", seed=0, batch_size=n)
    (o,) = run_attacks((spec,), target, x, y, clean, scorer, EvalState(None, {}), **kw)
    assert not set(seen["choose"]) & set(seen["score"])
    assert 0.6 < float(o.after.vote.mean()) < 0.8
    biased = torch.stack([scorer.score(c, y, torch.arange(n), seed=5).vote for c in cands]).amin(0)
    assert float(biased.mean()) < 0.35  # what selecting on the scoring draws would have reported


def test_final_and_best_iterate_are_both_reported():
    model = Overshoot()
    x, y = torch.full((4, 3, 4, 4), 0.5), torch.zeros(4, dtype=torch.long)
    spec = AttackSpec("pgd", "linf", 0.1, steps=3, alpha=0.03)
    found = run_attack(spec, model, x, y, seed=0)
    assert found.final is not None and len(found.cands) == 1
    (o,) = _run(model, (spec,), x, y)
    assert float(o.after.vote.mean()) <= float(o.after_final.vote.mean())
