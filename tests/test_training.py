"""The three training commands on tiny data and tiny models: loss falls, resume is exact,
checkpoints hold no pickle, and two DDP processes end with identical replicas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atop.cli import main as atop
from tests.tiny_data import write_folder
from training.checkpoint import load_checkpoint, save_checkpoint
from training.classifier import load_classifier
from training.data import load_split

TINY_CLASSIFIER = "--depth 1 --width 4"
TINY_PURIFIER = "--width 4 --disc-width 4"


def atop_run(command: str) -> int:
    """Run an ``atop`` command line in-process (paths must not contain spaces)."""
    return atop(command.split())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data") / "tree", n_train=32, n_test=8)


def _train_once(tmp_path_factory, data: Path, what: str, args: str) -> Path:
    out = tmp_path_factory.mktemp(what)
    assert atop_run(f"train {what} --data {data} --out {out} {args} --batch-size 16 --threads 1") == 0
    return out / "final.safetensors"


@pytest.fixture(scope="module")
def classifier_ckpt(data, tmp_path_factory) -> Path:
    return _train_once(tmp_path_factory, data, "classifier", f"{TINY_CLASSIFIER} --epochs 2")


@pytest.fixture(scope="module")
def purifier_ckpt(data, tmp_path_factory) -> Path:
    return _train_once(tmp_path_factory, data, "purifier", f"{TINY_PURIFIER} --epochs 1")


def _epochs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_classifier_loss_falls(data, tmp_path):
    cmd = f"train classifier --data {data} --out {tmp_path} {TINY_CLASSIFIER} --epochs 6 --batch-size 16"
    assert atop_run(cmd + " --lr 0.05 --threads 1") == 0
    log = _epochs(tmp_path)
    assert len(log) == 6 and log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    ck = load_checkpoint(tmp_path / "final.safetensors")
    assert ck.config["kind"] == "classifier" and ck.header["step"] == 36


@pytest.fixture(scope="module")
def fast_ckpt(data, tmp_path_factory) -> Path:
    return _train_once(
        tmp_path_factory, data, "classifier", f"--arch fast {TINY_CLASSIFIER} --epochs 3 --lr 0.05"
    )


def test_fast_architecture_trains_and_loads(data, tmp_path, fast_ckpt, classifier_ckpt, caplog):
    log = _epochs(fast_ckpt.parent)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    model = load_classifier(fast_ckpt)
    assert type(model).__name__ == "FastNet" and model(torch.rand(2, 3, 32, 32)).shape == (
        2,
        3,
    )  # the data has 3 classes
    # A warm restart must not load a ResNet's weights into a FastNet.
    bad = f"train classifier --data {data} --out {tmp_path / 'w'} --arch fast {TINY_CLASSIFIER}"
    assert atop_run(bad + f" --epochs 1 --threads 1 --init {classifier_ckpt}") == 2
    assert "not a fast classifier checkpoint" in caplog.text


def test_ensemble_averages_its_members_over_the_mirror(
    data, tmp_path, classifier_ckpt, fast_ckpt, purifier_ckpt, caplog
):
    members = f"--member {classifier_ckpt} --member {fast_ckpt}"
    assert atop_run(f"train ensemble {members} --flip-tta --data {data} --out {tmp_path}/ens") == 0
    ck = load_checkpoint(tmp_path / "ens" / "final.safetensors")
    assert ck.config["model"]["arch"] == "ensemble" and len(ck.config["train"]["members"]) == 2
    ens, a, b = (load_classifier(p) for p in (ck.path, classifier_ckpt, fast_ckpt))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = sum(m(v).softmax(1) for m in (a, b) for v in (x, x.flip(3))) / 4
        assert torch.allclose(ens(x).softmax(1), expected, atol=1e-6)
    test = load_split(data, "test")
    with torch.no_grad():
        right = (ens(test.images.float() / 255).argmax(1) == test.labels).float().mean()
    assert ck.header["metrics"]["test_acc"] == pytest.approx(float(right))
    assert atop_run(f"train ensemble --member {purifier_ckpt} --out {tmp_path}/bad") == 2
    assert "not a classifier checkpoint" in caplog.text


def test_soup_is_one_network_with_the_mean_of_its_members_weights(
    data, tmp_path, classifier_ckpt, fast_ckpt, caplog
):
    # A second member of the same architecture: the first's weights, every float tensor moved.
    ck = load_checkpoint(classifier_ckpt)
    other = load_classifier(classifier_ckpt)
    with torch.no_grad():
        for t in other.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t).abs() * 0.1)  # positive, so BN variances stay positive
    moved = save_checkpoint(
        tmp_path / "moved.safetensors", models={"classifier": other}, config=ck.config, step=1, epoch=1
    )
    members = f"--member {classifier_ckpt} --member {moved}"
    assert atop_run(f"train ensemble --soup {members} --data {data} --out {tmp_path}/soup") == 0
    soup_ck = load_checkpoint(tmp_path / "soup" / "final.safetensors")
    assert soup_ck.config["model"] == ck.config["model"]  # one network, not an ensemble
    assert soup_ck.config["train"]["soup"] is True and len(soup_ck.config["train"]["members"]) == 2
    a, b = load_classifier(classifier_ckpt).state_dict(), other.state_dict()
    for name, t in load_classifier(soup_ck.path).state_dict().items():
        if t.is_floating_point():
            assert torch.allclose(t, (a[name] + b[name]) / 2, atol=1e-6), name
    # Its answers are those of a network holding the averaged weights, and its recorded
    # accuracy is measured on them.
    soup = load_classifier(soup_ck.path)
    test = load_split(data, "test")
    with torch.no_grad():
        right = (soup(test.images.float() / 255).argmax(1) == test.labels).float().mean()
    assert soup_ck.header["metrics"]["test_acc"] == pytest.approx(float(right))
    # A member may be a published store version (its f): the same soup, from the store alone.
    store = tmp_path / "store"
    assert atop_run(f"export --classifier {classifier_ckpt} --purifier none --store {store} --name f") == 0
    published = store / "f" / "1"
    assert atop_run(f"train ensemble --soup --member {published} --member {moved} --out {tmp_path}/s2") == 0
    again = load_classifier(tmp_path / "s2" / "final.safetensors").state_dict()
    assert all(torch.equal(again[k], v) for k, v in soup.state_dict().items() if v.is_floating_point())
    # Members of two architectures have no mean; a soup is one network, so no mirror averaging.
    assert (
        atop_run(f"train ensemble --soup --member {classifier_ckpt} --member {fast_ckpt} --out {tmp_path}/x")
        == 2
    )
    assert "a soup needs one architecture" in caplog.text
    assert atop_run(f"train ensemble --soup --flip-tta {members} --out {tmp_path}/y") == 2
    assert "does not take --flip-tta" in caplog.text


def test_pgd_adversarial_training_trains_on_attacked_images(data, tmp_path):
    cmd = f"train classifier --data {data} {TINY_CLASSIFIER} --epochs 1 --batch-size 16 --threads 1"
    # The per-epoch robust check holds out 256 training images by default; the tiny set has 96.
    assert atop_run(f"{cmd} --out {tmp_path}/at --adversarial pgd --adv-steps 2 --robust-check 16") == 0
    log = _epochs(tmp_path / "at")
    assert all(e["robust_acc"] <= e["holdout_acc"] for e in log)
    # Same seed, same data (no hold-out), with and without the flag: only the attack differs, and
    # it must reach the update: other weights, and a higher training loss on the attacked images.
    assert atop_run(f"{cmd} --out {tmp_path}/plain") == 0
    assert atop_run(f"{cmd} --out {tmp_path}/adv --adversarial pgd --adv-steps 2 --robust-check 0") == 0
    plain, adv = (load_checkpoint(tmp_path / d / "final.safetensors") for d in ("plain", "adv"))
    assert adv.config["train"]["adversarial"] == "pgd" and plain.header["step"] == adv.header["step"]
    weights = [(k, v, adv.state_dict("classifier")[k]) for k, v in plain.state_dict("classifier").items()]
    assert any(v.is_floating_point() and not torch.equal(v, w) for _, v, w in weights)
    assert _epochs(tmp_path / "adv")[0]["train_loss"] > _epochs(tmp_path / "plain")[0]["train_loss"]


def test_purifier_reconstruction_improves(data, tmp_path, classifier_ckpt):
    cmd = f"train purifier --data {data} --out {tmp_path} --width 8 --epochs 8 --batch-size 16 --lr 2e-3"
    assert atop_run(cmd + f" --classifier {classifier_ckpt} --threads 1") == 0
    log = _epochs(tmp_path)
    # The tiny images are a flat colour plus i.i.d. noise, so the floor is near the noise level
    # and the residual purifier starts close to it: a modest but steady drop is all there is.
    assert log[-1]["train_l1"] < 0.92 * log[0]["train_l1"] and log[-1]["psnr"] > log[0]["psnr"]
    assert log[-1]["pipeline_acc"] > 0.8  # f still answers through t and g (chance: 1/3)


@pytest.mark.parametrize("adv", ["fgsm", "pgd"])
def test_finetune_lowers_the_classification_loss(data, tmp_path, classifier_ckpt, purifier_ckpt, adv):
    cmd = (
        f"train finetune --data {data} --out {tmp_path} {TINY_PURIFIER} --classifier {classifier_ckpt} "
        f"--purifier {purifier_ckpt} --adv {adv} --adv-steps 2 --epochs 4 --batch-size 16 --lr 2e-3 "
        "--lam 1.0 --threads 1 --robust-check 16"
    )
    assert atop_run(cmd) == 0
    log = _epochs(tmp_path)
    assert all(e["robust_acc"] <= e["holdout_acc"] for e in log)  # the per-epoch PGD x EOT check
    assert log[-1]["train_ce"] + log[-1]["train_l1"] < log[0]["train_ce"] + log[0]["train_l1"]
    ck = load_checkpoint(tmp_path / "final.safetensors")
    assert ck.config["stage"] == "finetune" and ck.config["rt"]["kind"] == "rt2"


def test_finetune_without_checkpoints_is_a_clear_error(data, tmp_path, caplog):
    cmd = (
        f"train finetune --data {data} --out {tmp_path} --classifier {tmp_path}/none --purifier {tmp_path}/x"
    )
    assert atop_run(cmd) == 2 and "does not exist" in caplog.text


@pytest.mark.parametrize(
    "command, extra",
    [
        ("classifier", TINY_CLASSIFIER),
        ("classifier", f"{TINY_CLASSIFIER} --ema 0.9"),  # the average resumes too
        ("purifier", TINY_PURIFIER),
    ],
)
def test_resume_continues_exactly(data, tmp_path, command, extra):
    common = f"train {command} --data {data} {extra} --epochs 2 --batch-size 8 --threads 1"
    assert atop_run(f"{common} --out {tmp_path}/straight") == 0
    assert atop_run(f"{common} --out {tmp_path}/cut --max-steps 5") == 0  # stops mid-epoch
    assert load_checkpoint(tmp_path / "cut" / "last.safetensors").header["step"] == 5
    assert atop_run(f"{common} --out {tmp_path}/cut --resume") == 0
    a = load_checkpoint(tmp_path / "straight" / "final.safetensors")
    b = load_checkpoint(tmp_path / "cut" / "final.safetensors")
    assert a.header["step"] == b.header["step"] == 24
    assert a.header["epoch"] == b.header["epoch"] == 2
    for k, v in a.state_dict(command).items():
        assert torch.equal(v, b.state_dict(command)[k]), k


def test_checkpoint_is_safetensors_with_json_header(classifier_ckpt):
    raw = classifier_ckpt.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["atop"])["format"] == "atop-checkpoint/1"
    assert json.loads(classifier_ckpt.with_suffix(".json").read_text())["config"]["kind"] == "classifier"


def test_ddp_two_processes_end_with_identical_replicas(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = f"-m atop.cli train classifier --data {data} --out {tmp_path} {TINY_CLASSIFIER} --epochs 2"
    res = subprocess.run(
        [*launcher, *cmd.split(), "--batch-size", "8", "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "replica check: " in res.stderr and "identical on 2 ranks" in res.stderr
    # Each replica saw half the data: 96 images / 2 ranks / batch 8 = 6 steps per epoch.
    assert load_checkpoint(tmp_path / "final.safetensors").header["step"] == 12


def test_sigterm_saves_a_resumable_checkpoint_and_exits(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = f"-m atop.cli train classifier --data {data} --out {tmp_path} {TINY_CLASSIFIER} --epochs 400"
    proc = subprocess.Popen(
        [sys.executable, *cmd.split(), "--batch-size", "8", "--threads", "1"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "checkpoint saved, continue with --resume" in err
    step = load_checkpoint(tmp_path / "last.safetensors").header["step"]
    assert 12 <= step < 4800  # past the first epoch, well before the end
    assert not (tmp_path / "final.safetensors").exists()


def test_classifier_warm_restart_from_a_checkpoint(data, tmp_path, classifier_ckpt):
    cmd = f"train classifier --data {data} {TINY_CLASSIFIER} --epochs 1 --batch-size 16 --threads 1"
    assert atop_run(f"{cmd} --out {tmp_path}/scratch") == 0
    assert atop_run(f"{cmd} --out {tmp_path}/warm --init {classifier_ckpt}") == 0
    scratch, warm = _epochs(tmp_path / "scratch")[0], _epochs(tmp_path / "warm")[0]
    assert warm["train_loss"] < scratch["train_loss"]
    assert atop_run(f"{cmd} --out {tmp_path}/bad --init {classifier_ckpt} --width 8") == 2  # shape mismatch


def test_classifier_adapts_to_the_purifier(data, tmp_path, classifier_ckpt, purifier_ckpt, caplog):
    cmd = f"train classifier --data {data} {TINY_CLASSIFIER} --batch-size 16 --threads 1 --init {classifier_ckpt}"
    adapt = f"{cmd} --purifier {purifier_ckpt} --purified-fraction 1.0 --lr 0.05"
    assert atop_run(f"{adapt} --epochs 6 --out {tmp_path}/a") == 0
    log = _epochs(tmp_path / "a")
    assert log[-1]["test_acc_purified"] > 0.8  # f(g(t(x))) on the test set (chance: 1/3)
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    ck = load_checkpoint(tmp_path / "a" / "final.safetensors")
    assert ck.config["train"]["purifier"] == str(purifier_ckpt)
    assert atop_run(f"{cmd} --epochs 1 --out {tmp_path}/p") == 0
    assert "test_acc_purified" not in _epochs(tmp_path / "p")[0]
    assert atop_run(f"{adapt} --epochs 1 --out {tmp_path}/b --adversarial pgd") == 2
    assert "cannot be combined" in caplog.text
    assert atop_run(f"{cmd} --purifier {purifier_ckpt} --purified-fraction 0 --out {tmp_path}/c") == 2


def test_classifier_distils_a_teacher(data, tmp_path, classifier_ckpt, purifier_ckpt):
    from training.train.classifier import soft_targets

    teacher, train = load_classifier(classifier_ckpt), load_split(data, "train")
    soft = soft_targets(teacher, train, temperature=2.0)
    with torch.no_grad():
        expected = torch.softmax(teacher(train.images.float() / 255) / 2.0, dim=1)
    assert soft.shape == (len(train), 3) and torch.allclose(soft, expected, atol=1e-5)

    cmd = f"train classifier --data {data} {TINY_CLASSIFIER} --batch-size 16 --threads 1 --lr 0.05"
    kd = f"{cmd} --teacher {classifier_ckpt} --distill-weight 1.0 --distill-temperature 2"
    # The split carries the soft targets beside the labels; each batch brings both to the step.
    assert atop_run(f"{kd} --epochs 6 --out {tmp_path}/kd --purifier {purifier_ckpt}") == 0
    log = _epochs(tmp_path / "kd")
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert log[-1]["train_acc"] > 0.8  # scored against the labels
    ck = load_checkpoint(tmp_path / "kd" / "final.safetensors")
    assert ck.config["train"]["teacher"] == str(classifier_ckpt)
    assert ck.config["train"]["distill_weight"] == 1.0
    assert atop_run(f"{kd} --epochs 1 --out {tmp_path}/bad --distill-weight 0") == 2


def _flag_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from training.train.distributed import DistInfo, rank0_flag

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        # only rank 0 runs the robust check, so only rank 0 can see a collapse
        seen = rank0_flag(rank == 0, DistInfo(rank, 2))
        Path(out, f"rank{rank}").write_text(str(seen))
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_when_rank_0_sees_a_collapse(tmp_path):
    """Under DDP the collapse stop is rank 0's decision; a rank that missed it would train on
    alone and hang in the next collective."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_flag_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == "True"
    assert (tmp_path / "rank1").read_text() == "True"


def test_distillation_with_adversarial_training_scores_the_adversarial_image(monkeypatch):
    """--adversarial with --teacher (adversarially robust distillation): the step's loss is
    (1 - a) * CE(f(x'), y) + a * tau^2 * KL(teacher's soft target of the clean x || f(x') / tau),
    both terms on the student's logits for the adversarial image x', none on the clean one."""
    import copy

    from torch.nn import functional as F

    from training.classifier import ClassifierConfig, build_classifier
    from training.data import Batch
    from training.train import classifier as tc
    from training.train.distributed import DistInfo

    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(depth=1, width=4, num_classes=3))
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    soft = torch.softmax(torch.randn(8, 3), dim=1)
    x_adv = (x + 0.03 * torch.randn_like(x).sign()).clamp(0, 1)
    monkeypatch.setattr(tc, "fgsm_rs", lambda net, xs, ys, **kw: x_adv.clone())
    cfg = tc.TrainClassifierConfig(
        data="unused",
        out="unused",
        adversarial="fgsm",
        teacher="t",
        distill_weight=0.3,
        distill_temperature=2.0,
        precision="fp32",
    )
    before = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = tc.ClassifierStep(cfg, DistInfo(), model, opt, None, None, None, None)
    got = step(Batch(x, y, soft), step=0, total=10)["loss"]

    def expected(inputs):
        logits = before(inputs).float()
        kl = F.kl_div(F.log_softmax(logits / 2.0, dim=1), soft, reduction="batchmean")
        return (0.7 * F.cross_entropy(logits, y) + 0.3 * 4.0 * kl).item()

    assert got == pytest.approx(expected(x_adv), rel=1e-4)
    assert abs(got - expected(x)) > 1e-3  # the clean image's loss is a different number
