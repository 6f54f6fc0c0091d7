"""Attacks stay in the ε-ball and [0,1], beat an undefended tiny model, and keep RNG private."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.eval_toys import Overshoot
from training.attacks import eot_gradient, fgsm, pgd, pgd_iterates


class _Normalize(nn.Module):
    """Normalisation inside the model, as in the real classifier."""

    def forward(self, x):
        return (x - 0.5) / 0.02


@pytest.fixture(scope="module")
def toy():
    """A linear model trained to ~100% on two brightness-coded classes in 8x8 images."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=gen)
    # Class means 0.04 apart per pixel: separable, but within ε = 8/255 of the boundary.
    x = (0.5 + 0.02 * (2 * y.float() - 1)).view(-1, 1, 1, 1) + 0.01 * torch.randn(256, 3, 8, 8, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(_Normalize(), nn.Flatten(), nn.Linear(3 * 64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.98
    return model, x[:64], y[:64]


def _acc(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize(
    "attack, norm, eps",
    [
        ("fgsm", "linf", 8 / 255),
        ("pgd", "linf", 8 / 255),
        ("fgsm", "l2", 1.0),
        ("pgd", "l2", 1.0),
    ],
)
def test_attack_respects_ball_and_breaks_undefended_model(toy, attack, norm, eps):
    model, x, y = toy
    gen = torch.Generator().manual_seed(1)
    if attack == "fgsm":
        adv = fgsm(model, x, y, eps=eps, norm=norm)
    else:
        adv = pgd(model, x, y, eps=eps, steps=10, norm=norm, gen=gen)
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert _acc(model, x, y) > 0.95 and _acc(model, adv, y) < 0.1


def test_pgd_is_stronger_than_its_random_start(toy):
    model, x, y = toy
    eps = 0.025  # just past the class boundary (0.02): noise alone does not cross it
    noise_only = pgd(model, x, y, eps=eps, steps=1, alpha=0.0, gen=torch.Generator().manual_seed(0))
    full = pgd(model, x, y, eps=eps, steps=10, gen=torch.Generator().manual_seed(0))
    assert _acc(model, full, y) < _acc(model, noise_only, y)


def test_attacks_leave_global_rng_and_model_mode_alone(toy):
    model, x, y = toy
    model.train()
    state = torch.get_rng_state()
    pgd(model, x, y, eps=0.03, steps=2, gen=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state()) and model.training
    model.eval()


def test_seeded_pgd_is_reproducible(toy):
    model, x, y = toy
    a = pgd(model, x, y, eps=0.03, steps=3, gen=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, eps=0.03, steps=3, gen=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_eot_averages_gradients_over_the_randomness():
    """y = s·w·x with a random sign s (P(+1)=0.75): the expected gradient is 0.5·w."""
    w = torch.randn(1, 3, 4, 4)
    gen = torch.Generator().manual_seed(0)

    def model(x):
        s = (torch.rand(x.shape[0], 1, generator=gen) < 0.75).float() * 2 - 1
        z = s * (w * x).flatten(1).sum(1, keepdim=True)
        return torch.cat([z, -z], 1)

    x, y = torch.rand(1, 3, 4, 4), torch.zeros(1, dtype=torch.long)
    one = [eot_gradient(model, x, y, eot=1, loss="cw")[0] for _ in range(20)]
    many, _ = eot_gradient(model, x, y, eot=2000, loss="cw")
    # The margin loss is -2z, so its gradient is -2·s·w; in expectation -w.
    assert torch.allclose(many, -w, atol=0.15)
    assert max((g - (-w)).abs().max().item() for g in one) > 0.5  # single draws are far off


def test_attack_restores_each_submodule_mode():
    """A wrapper in training mode around a frozen classifier in eval mode: after the attack the
    classifier (and its BatchNorm) must still be in eval mode, the wrapper in training mode."""
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    inner(torch.rand(2, 3, 8, 8))
    inner.eval()
    wrapper = nn.Sequential(inner)  # new modules start in training mode
    assert wrapper.training and not inner.training
    stats = inner[1].running_mean.clone()
    pgd(
        wrapper,
        torch.rand(4, 3, 8, 8),
        torch.zeros(4, dtype=torch.long),
        eps=0.03,
        steps=2,
        gen=torch.Generator().manual_seed(0),
    )
    assert wrapper.training and not inner.training and not inner[1].training
    assert torch.equal(stats, inner[1].running_mean)


@pytest.mark.parametrize("loss", ["ce", "cw", "cw-prob"])
def test_best_iterate_keeps_the_point_a_bouncing_pgd_walked_away_from(loss):
    """Overshoot: the sign step (0.03) is wider than the adversarial band (s in 0.05 ± 0.015),
    so PGD goes 0 -> 0.03 -> 0.06 (inside: misclassified) -> 0.03 (outside again)."""
    model = Overshoot()
    x, y = torch.full((2, 3, 4, 4), 0.5), torch.zeros(2, dtype=torch.long)
    kw = dict(eps=0.1, steps=3, alpha=0.03, random_start=False, loss=loss)
    best, last = pgd_iterates(model, x, y, **kw)
    assert (model(last).argmax(1) == y).all()  # the final iterate is correct again
    assert (model(best).argmax(1) != y).all()  # the best one is not
    assert torch.equal(pgd(model, x, y, **kw, best=True), best)
    assert torch.equal(pgd(model, x, y, **kw), last)  # the default stays the final iterate
    assert ((best - x).abs().amax() <= 0.1 + 1e-6) and best.min() >= 0 and best.max() <= 1


def test_best_iterate_is_never_worse_than_the_final_one(toy):
    model, x, y = toy
    for seed in range(3):
        kw = dict(eps=0.02, steps=5, alpha=0.02, gen=torch.Generator().manual_seed(seed))
        best, last = pgd_iterates(model, x, y, **kw)
        assert _acc(model, best, y) <= _acc(model, last, y)


@pytest.mark.parametrize("eps", [0.01, 0.02, 8 / 255])
def test_cw_breaks_an_undefended_model_at_least_as_well_as_pgd(toy, eps):
    """The margin attack, as the evaluation runs it (probability margin, best iterate), must
    not leave more images robust than PGD-CE with the same budget on an undefended model."""
    model, x, y = toy
    kw = dict(eps=eps, steps=10, best=True)
    ce = _acc(model, pgd(model, x, y, **kw, loss="ce", gen=torch.Generator().manual_seed(0)), y)
    cw = _acc(model, pgd(model, x, y, **kw, loss="cw-prob", gen=torch.Generator().manual_seed(0)), y)
    assert cw <= ce
