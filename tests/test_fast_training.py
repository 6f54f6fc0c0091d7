"""Fast adversarial training and bf16 training on tiny data: the --precision option of every
trainer, fgsm_rs, the per-epoch robust check with its best epoch, the held-out split, and the
purifier's pass-through metric."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from atop.cli import main as atop
from tests.tiny_data import CLASSES, make_images, write_folder
from tests.tiny_models import make_checkpoints
from training.attacks import fgsm_rs, project
from training.checkpoint import load_checkpoint
from training.data import Batch, Split, batches, load_split
from training.purifier import pass_through
from training.train import classifier as tc
from training.train import loop
from training.train.distributed import DistInfo
from training.train.robust_check import BestEpoch, RobustCheck
from training.train.step import WeightAverage, WeightPerturbation, autocast
from training.transforms import RTSpec

TINY_CLASSIFIER = "--depth 1 --width 4 --batch-size 16 --threads 1"
TINY_PURIFIER = "--width 4 --disc-width 4 --batch-size 16 --threads 1 --eval-images 24 --pass-images 24"
PASS_KEYS = ("denoise_err_in", "denoise_err_out", "pass_through")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data") / "tree", n_train=32, n_test=8)


def _epochs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict(name)


# --- precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_classifier_trains_at_either_precision(data, tmp_path, precision):
    cmd = f"train classifier --data {data} --out {tmp_path} {TINY_CLASSIFIER} --epochs 6 --lr 0.05"
    assert atop(f"{cmd} --precision {precision}".split()) == 0
    log = _epochs(tmp_path)
    assert len(log) == 6 and log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert load_checkpoint(tmp_path / "final.safetensors").config["train"]["precision"] == precision


def test_precision_changes_the_arithmetic_and_unknown_ones_are_refused(data, tmp_path):
    cfg = tc.TrainClassifierConfig(
        data=str(data), out=str(tmp_path / "bf16"), depth=1, width=4, epochs=1, batch_size=16
    )
    assert cfg.precision == "bf16"  # the default
    tc.run(cfg)
    tc.run(replace(cfg, out=str(tmp_path / "fp32"), precision="fp32"))
    a = _weights(tmp_path / "bf16" / "final.safetensors", "classifier")
    b = _weights(tmp_path / "fp32" / "final.safetensors", "classifier")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same seed and data: only bf16 differs
    with pytest.raises(ValueError, match="precision"):
        autocast(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="precision"):
        tc.run(replace(cfg, out=str(tmp_path / "x"), precision="fp16"))
    with pytest.raises(SystemExit):  # the CLI offers bf16 and fp32 only
        atop(f"train purifier --data {data} --out {tmp_path}/y --precision fp16".split())


# --- fgsm_rs --------------------------------------------------------------------------------


def _linear_problem():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    x[0] = 0.0  # an image at the edge of [0,1]: the attack must clamp
    return model, x, torch.randint(0, 3, (16,), generator=gen)


def test_fgsm_rs_stays_in_the_ball_and_raises_the_loss():
    model, x, y = _linear_problem()
    eps = 8 / 255
    model.train()
    adv = fgsm_rs(model, x, y, eps=eps, alpha=1.25 * eps, gen=torch.Generator().manual_seed(1))
    assert model.training  # fast AT makes x' in training mode: the mode is left alone
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0.0 and adv.max() <= 1.0
    # The random start, drawn as fgsm_rs draws it: the gradient step moved away from it.
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert (adv - project(x + eps * start, x, eps, "linf")).abs().max() > eps / 2
    again = fgsm_rs(model, x, y, eps=eps, alpha=1.25 * eps, gen=torch.Generator().manual_seed(1))
    other = fgsm_rs(model, x, y, eps=eps, alpha=1.25 * eps, gen=torch.Generator().manual_seed(2))
    assert torch.equal(adv, again) and not torch.equal(adv, other)
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 0.05


# --- robust check, best epoch, held-out split -----------------------------------------------


def test_best_epoch_keeps_the_peak_and_detects_collapse(tmp_path):
    best = BestEpoch(tmp_path, RobustCheck(collapse=0.5))
    # n = 10,000: the noise band (0.5 points) separates every step of this sequence.
    got = [best.update(r, 0.5, 10_000) for r in (0.3, 0.4, 0.35, 0.1)]
    assert got == [(True, False), (True, False), (False, False), (False, True)]
    assert best.best == 0.4


def test_best_epoch_prefers_clean_accuracy_within_the_noise_of_the_check(tmp_path):
    """This run's own history (at-fast64, 256 held-out images): epoch 14 is the most robust by
    one image (43.4% vs 43.0%), epoch 18 is 4 points more accurate; one standard error is ~3.1
    points, so the rule keeps epoch 18. A clearly more robust epoch still wins outright."""
    history = [
        (0.4062, 0.7031),
        (0.4336, 0.7109),
        (0.4336, 0.7031),
        (0.4062, 0.7148),
        (0.4297, 0.7344),
        (0.4297, 0.75),
    ]
    best = BestEpoch(tmp_path, RobustCheck(images=256))
    kept = [i for i, (r, c) in enumerate(history) if best.update(r, c, 256)[0]]
    assert kept == [0, 1, 3, 4, 5] and best.kept == (0.4297, 0.75)
    assert best.update(0.48, 0.70, 256) == (True, False)  # 1.6 standard errors more robust
    assert best.update(0.40, 0.80, 256) == (False, False)  # more accurate, but outside the band


def test_hold_out_splits_the_split_in_two():
    n = 20
    pixels = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    s = Split(pixels, torch.arange(n), ("a",), "mem", "")
    rest, held = s.hold_out(5, seed=3)
    assert len(held) == 5 and len(rest) == 15
    assert set(held.labels.tolist()).isdisjoint(rest.labels.tolist())
    assert sorted(held.labels.tolist() + rest.labels.tolist()) == list(range(n))
    assert torch.equal(held.images[:, 0, 0, 0].long(), held.labels)  # images travel with labels
    assert torch.equal(s.hold_out(5, seed=3)[1].labels, held.labels)
    assert not torch.equal(s.hold_out(5, seed=4)[1].labels, held.labels)
    for bad in (0, n):
        with pytest.raises(ValueError):
            s.hold_out(bad)


def _fingerprints(split: Split) -> set[str]:
    return {hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in split.images}


def test_fgsm_training_checks_every_epoch_and_keeps_the_best(data, tmp_path, monkeypatch):
    seen: dict[str, Split] = {}
    train, check = loop.Run.train, loop.robust_accuracy

    def spy_train(run, config, train_split, *args, **kwargs):
        seen["trained"] = train_split
        return train(run, config, train_split, *args, **kwargs)

    def spy_check(model, split, *args, **kwargs):
        seen["checked"] = split
        return check(model, split, *args, **kwargs)

    monkeypatch.setattr(loop.Run, "train", spy_train)
    monkeypatch.setattr(loop, "robust_accuracy", spy_check)
    cmd = f"train classifier --data {data} --out {tmp_path} {TINY_CLASSIFIER} --epochs 3 --lr 0.05"
    assert atop(f"{cmd} --adversarial fgsm --robust-check 16".split()) == 0
    log = _epochs(tmp_path)
    assert len(log) == 3 or log[-1]["collapsed"]
    assert all(e["robust_acc"] <= e["holdout_acc"] for e in log)
    assert log[0]["step"] == (96 - 16) // 16  # 16 of the 96 training images were held out
    # The 16 checked images are training images that the run never trained on.
    assert len(seen["checked"]) == 16 and len(seen["trained"]) == 80
    everything = _fingerprints(load_split(data, "train"))
    assert _fingerprints(seen["checked"]).isdisjoint(_fingerprints(seen["trained"]))
    assert _fingerprints(seen["checked"]) | _fingerprints(seen["trained"]) == everything
    # best.safetensors is the epoch the rule picks, replayed on the logged figures.
    rule, peak = BestEpoch(tmp_path / "replay", RobustCheck(images=16)), None
    for i, e in enumerate(log):
        if rule.update(e["robust_acc"], e["holdout_acc"], 16)[0]:
            peak = i
    best = load_checkpoint(tmp_path / "best.safetensors")
    assert best.header["step"] == log[peak]["step"]
    assert best.header["metrics"] and all(log[peak][k] == v for k, v in best.header["metrics"].items())
    assert best.config["train"]["adversarial"] == "fgsm"


def test_a_warm_restart_with_a_new_seed_checks_on_its_parents_held_out_images(data, tmp_path, monkeypatch):
    """The held-out images depend on --robust-check-seed, not on --seed: a restart that changes
    the data order must not check robustness on images its parent trained on."""
    checked: list[set[str]] = []
    check = loop.robust_accuracy

    def spy_check(model, split, *args, **kwargs):
        checked.append(_fingerprints(split))
        return check(model, split, *args, **kwargs)

    monkeypatch.setattr(loop, "robust_accuracy", spy_check)
    cmd = f"train classifier --data {data} {TINY_CLASSIFIER} --epochs 1 --adversarial fgsm --robust-check 16"

    def held_out(args: str) -> set[str]:
        checked.clear()
        assert atop(f"{cmd} {args}".split()) == 0 and checked
        assert all(c == checked[0] for c in checked)  # one set for the whole run
        return checked[0]

    parent = held_out(f"--out {tmp_path}/parent")
    init = f"--init {tmp_path}/parent/final.safetensors"
    restart = held_out(f"--out {tmp_path}/restart --seed 3 {init}")
    other = held_out(f"--out {tmp_path}/other --seed 3 --robust-check-seed 1 {init}")
    assert len(parent) == 16 and restart == parent
    assert other != parent  # another --robust-check-seed holds out other images
    recorded = load_checkpoint(tmp_path / "restart" / "final.safetensors").config["train"]
    assert recorded["seed"] == 3 and recorded["robust_check_seed"] == 0


# --- weight average (--ema) -----------------------------------------------------------------


def test_weight_average_moves_a_fraction_of_the_way_and_copies_counters():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = WeightAverage(net, 0.5)
    start = average.model[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked.fill_(7)
    average.update(net, step=100)  # d = min(0.5, 101/110) = 0.5: half way
    assert torch.allclose(average.model[0].weight, start + 0.5)
    assert average.model[1].num_batches_tracked.item() == 7
    average.update(net, step=0)  # early steps follow closely: d = 1/10
    assert torch.allclose(average.model[0].weight, start + 0.5 + 0.9 * 0.5)
    assert not any(p.requires_grad for p in average.model.parameters())
    with pytest.raises(ValueError, match="--ema"):
        WeightAverage(net, 1.0)


def test_ema_run_checks_and_saves_the_average(data, tmp_path, monkeypatch):
    checked: list[nn.Module] = []
    check = loop.robust_accuracy

    def spy_check(model, *args, **kwargs):
        checked.append(model)
        return check(model, *args, **kwargs)

    monkeypatch.setattr(loop, "robust_accuracy", spy_check)
    cmd = f"train classifier --data {data} --out {tmp_path} {TINY_CLASSIFIER} --epochs 2 --lr 0.05"
    assert atop(f"{cmd} --adversarial fgsm --robust-check 16 --ema 0.8".split()) == 0
    last = load_checkpoint(tmp_path / "last.safetensors")
    average, trained = last.state_dict("classifier"), last.state_dict("trained")
    assert any(not torch.equal(average[k], trained[k]) for k in average)
    final = load_checkpoint(tmp_path / "final.safetensors")
    assert all(torch.equal(final.state_dict("classifier")[k], v) for k, v in average.items())
    # The epoch check ran on the average, which is what the checkpoints call the classifier.
    assert all(torch.equal(checked[-1].state_dict()[k], v) for k, v in average.items())


# --- adversarial weight perturbation (--awp) ------------------------------------------------


def test_weight_perturbation_moves_each_layer_by_gamma_uphill_and_restores_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    awp = WeightPerturbation(net, 0.05)
    loss = F.cross_entropy(net(x), y)
    awp.perturb(loss)
    for name in ("0.weight", "2.weight"):  # each weight tensor moved by gamma of its own norm
        moved = (net.state_dict()[name] - before[name]).norm() / before[name].norm()
        assert moved.item() == pytest.approx(0.05, rel=1e-4)
    for name in ("0.bias", "2.bias"):  # biases stay
        assert torch.equal(net.state_dict()[name], before[name])
    assert F.cross_entropy(net(x), y) > loss  # uphill: the perturbed weights do worse
    with pytest.raises(RuntimeError, match="restore"):
        awp.perturb(F.cross_entropy(net(x), y))
    awp.restore()
    assert all(torch.allclose(net.state_dict()[k], v, atol=1e-7) for k, v in before.items())
    with pytest.raises(ValueError, match="--awp"):
        WeightPerturbation(net, 0.0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_awp_step_takes_the_gradient_at_the_perturbed_weights_and_updates_the_original(
    data, tmp_path, precision
):
    cfg = tc.TrainClassifierConfig(
        data=str(data), out=str(tmp_path), depth=1, width=4, adversarial="fgsm", precision=precision, lr=0.0
    )
    train = load_split(data, "train")
    batch = Batch(*next(iter(batches(train, 16))))
    steps = {}
    for awp in (0.0, 0.01):
        torch.manual_seed(3)
        model = tc.build_classifier(cfg.classifier(train))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # --lr 0: the step leaves w where it was
        step = tc.ClassifierStep(replace(cfg, awp=awp), DistInfo(), model, opt, None, None, None, None)
        step(batch, 0, 10)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        now = model.state_dict()
        assert all(
            torch.allclose(now[k], v, atol=1e-6)
            for k, v in start.items()
            if k in dict(model.named_parameters())
        )
        steps[awp] = grads
    # The same batch, draw and weights, but the gradient was taken somewhere else.
    assert any(not torch.allclose(steps[0.0][n], steps[0.01][n]) for n in steps[0.0])
    with pytest.raises(ValueError, match="--awp"):
        tc.run(replace(cfg, awp=0.01, adversarial="none"))


def test_awp_run_trains_resumes_and_records_gamma(data, tmp_path):
    cmd = f"train classifier --data {data} --out {tmp_path} {TINY_CLASSIFIER} --epochs 2 --lr 0.05"
    assert atop(f"{cmd} --adversarial fgsm --robust-check 16 --awp 0.005".split()) == 0
    assert len(_epochs(tmp_path)) == 2
    assert load_checkpoint(tmp_path / "final.safetensors").config["train"]["awp"] == 0.005


# --- pass-through metric --------------------------------------------------------------------


class _Purifier(nn.Module):
    """out = a·(holes pre-filled image) + b: a = 1 is the identity, a = 0 a constant."""

    def __init__(self, a: float, b: float = 0.0):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.a * (inp[:, :3] + 0.5 * inp[:, 3:4]) + self.b


@pytest.fixture(scope="module")
def images() -> Split:
    x, y = make_images(8, seed=5)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    return Split(x, torch.from_numpy(y), CLASSES, "mem", "")


def test_pass_through_of_identity_half_and_constant(images):
    rt1, rt2 = RTSpec("rt1"), RTSpec("rt2", noise_std=0.0625)
    ident = pass_through(_Purifier(1.0), rt1, images, images=20, batch_size=8)
    assert ident == pytest.approx({"denoise_err_in": 0.0, "denoise_err_out": 0.0, "pass_through": 1.0})
    noisy = pass_through(_Purifier(1.0), rt2, images, images=20, batch_size=8)
    assert 0.9 < noisy["pass_through"] <= 1.0  # t's clamp to [0,1] cuts a little of d
    assert noisy["denoise_err_in"] == noisy["denoise_err_out"] > 0.02  # ~σ·sqrt(2/π) = 0.05
    assert pass_through(_Purifier(0.5, 0.25), rt1, images)["pass_through"] == pytest.approx(0.5)
    const = pass_through(_Purifier(0.0, 0.5), rt2, images)
    assert const["pass_through"] == 0.0 and const["denoise_err_out"] > noisy["denoise_err_out"]
    # Seeded: the same numbers every time, other numbers for another seed.
    assert pass_through(_Purifier(1.0), rt2, images, images=20, batch_size=8) == noisy
    other = pass_through(_Purifier(1.0), rt2, images, images=20, seed=1)
    assert other["pass_through"] != noisy["pass_through"]


# --- bf16 purifier and fine-tune ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory) -> tuple[Path, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"), num_classes=len(CLASSES))


def _check_run(out: Path, precision: str, epochs: int) -> None:
    log = _epochs(out)
    assert len(log) == epochs
    for e in log:
        assert all(torch.isfinite(torch.tensor(e[k])) for k in (*PASS_KEYS, "train_l1", "train_d", "psnr"))
        assert 0.0 < e["denoise_err_in"] < 0.2 and -1.0 < e["pass_through"] < 2.0
    assert load_checkpoint(out / "final.safetensors").config["train"]["precision"] == precision


def test_purifier_trains_in_bf16_and_logs_pass_through(data, tmp_path):
    cmd = f"train purifier --data {data} {TINY_PURIFIER} --epochs 2"
    for precision in ("bf16", "fp32"):
        assert atop(f"{cmd} --out {tmp_path}/{precision} --precision {precision}".split()) == 0
        _check_run(tmp_path / precision, precision, 2)
    a = _weights(tmp_path / "bf16" / "final.safetensors", "purifier")
    b = _weights(tmp_path / "fp32" / "final.safetensors", "purifier")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    d = _weights(tmp_path / "bf16" / "final.safetensors", "discriminator")
    assert all(torch.isfinite(v).all() for v in d.values())  # the GAN step ran under autocast


@pytest.mark.parametrize("adv", ["fgsm", "pgd"])
def test_finetune_trains_in_bf16_and_logs_pass_through(data, tmp_path, tiny_ckpts, adv):
    clf, pur = tiny_ckpts
    cmd = (
        f"train finetune --data {data} --out {tmp_path} {TINY_PURIFIER} --classifier {clf} --purifier {pur}"
        f" --adv {adv} --adv-steps 1 --epochs 1 --lam 1.0 --precision bf16 --robust-check 8 --robust-eot 2"
    )
    assert atop(cmd.split()) == 0
    _check_run(tmp_path, "bf16", 1)
    first = _epochs(tmp_path)[0]
    assert "train_ce" in first and 0.0 <= first["robust_acc"] <= first["holdout_acc"] <= 1.0
    best = load_checkpoint(tmp_path / "best.safetensors")  # the only epoch is the best so far
    assert best.header["metrics"]["robust_acc"] == first["robust_acc"] and best.config["stage"] == "finetune"


def test_a_robust_check_too_large_for_the_data_is_a_clear_error(data, tmp_path):
    cfg = tc.TrainClassifierConfig(
        data=str(data), out=str(tmp_path), depth=1, width=4, epochs=1, batch_size=16, adversarial="fgsm"
    )
    with pytest.raises(ValueError, match="smaller --robust-check"):
        tc.run(cfg)  # the default holds out 256 of the 32 tiny training images
    assert not (tmp_path / "metrics.jsonl").exists()
