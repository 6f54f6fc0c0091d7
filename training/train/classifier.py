"""``atop train classifier``: standard (or PGD adversarial) training of the CIFAR ResNet.

The standard model becomes the frozen classifier f of the defense. ``--adversarial`` trains
the adversarial-training (AT) baseline that the evaluation compares AToP against, with every
image of every batch adversarial: ``fgsm`` is fast AT (FGSM from a random start, step 1.25·ε,
Wong et al. 2020), ``pgd`` is PGD-k AT (Madry et al.). Adversarial runs hold ``--robust-check``
images out of the training split, measure PGD-10 accuracy on them after every epoch
(``robust_acc``, see training/train/robust_check.py), keep the best epoch as
``best.safetensors`` (the most robust, up to the check's noise; within that, the most accurate)
and stop when robustness collapses (catastrophic overfitting), so ``best.safetensors`` is the
AT model to use.

``--precision bf16`` (the default) runs the training step, attack included, under bf16
autocast; the per-epoch checks stay fp32.

``--purifier P`` adapts a classifier to the purifier's outputs: a fraction of every batch is
replaced by g(t(x)), one fresh RT draw per image through the (frozen, pre-trained) purifier P,
the rest stays clean. The classifier is then frozen again for the AToP fine-tune; only the
purifier's pre-training never sees it. Each epoch also logs the accuracy of f(g(t(x))) on the
test set (``test_acc_purified``, one fixed draw per image, as ``atop train purifier`` reports
its ``pipeline_acc``).

``--teacher T`` distils a trained classifier T (typically the standard ensemble f) into the
network being trained: the loss becomes (1 - a) * CE(y, logits) + a * tau^2 * KL(p_T || p_S), with
both distributions softened by the temperature tau and p_T = T's prediction on the *clean*
image, also where the student sees g(t(x)) instead. The student so learns T's knowledge of the
classes and to answer the same on the purified image as T does on the clean one. p_T is
computed once per training image before the first step, on the image as stored (T, like f,
averages over the mirror image; the random crop is not seen by T): running T on every batch
would cost three times the student's own step. The split then carries p_T as its soft targets,
so each batch brings its images' p_T beside their labels.

``run`` reads top to bottom: data, model, step, loop (training/train/loop.py does the loop,
the checkpoints and the best epoch).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, replace

import torch
from torch.nn import functional as F
from tqdm import tqdm

from training.attacks import fgsm_rs, pgd
from training.checkpoint import run_config
from training.classifier import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ClassifierConfig,
    build_classifier,
    load_classifier,
    require_classes,
)
from training.data import CIFAR10_CLASSES, Batch, Split, batches, channel_stats, load_split
from training.metrics import accuracy
from training.purifier import load_purifier, purify
from training.train import cli, robust_check
from training.train.cli import add_precision_argument, add_run_flags, config_from_args
from training.train.distributed import DistInfo, wrap_ddp
from training.train.loop import LoopConfig, Run
from training.train.robust_check import HeldOut, RobustCheck
from training.train.step import WeightAverage, WeightPerturbation, autocast, one_cycle_lr, step_generator
from training.transforms import sample_rt

log = logging.getLogger("atop.train.classifier")


@dataclass(frozen=True)
class TrainClassifierConfig:
    data: str  # the data set: folder tree, its tar.gz, or CIFAR-10's archive (DATA_HELP)
    out: str  # the run folder
    arch: str = "resnet"  # resnet | fast
    depth: int = 3  # residual blocks per stage (3 = ResNet-20)
    width: int = 16  # channels of the first stage
    image_size: int = 32  # pixels a side: every image is brought to this square (the service's rule)
    epochs: int = 40  # passes over the training split
    batch_size: int = 128  # images per step and process
    lr: float = 0.1  # peak SGD learning rate (per step) of the one-cycle schedule
    momentum: float = 0.9  # Nesterov momentum (share of the previous update kept)
    weight_decay: float = 5e-4  # L2 coefficient on conv and linear weights
    label_smoothing: float = 0.0  # probability mass spread over the other classes
    warmup: float = 0.05  # share of the run's steps spent warming up
    adversarial: str = "none"  # none | fgsm | pgd
    adv_eps: float = 8 / 255  # l-inf radius of the training attack, in [0,1] pixel units
    adv_steps: int = 7  # attack iterations per batch (pgd only)
    adv_alpha: float = 0.0  # attack step in [0,1] pixel units; 0 = pgd 2/255, fgsm 1.25 * eps
    ema: float = 0.0  # per-step decay of the weight average that is checked and saved (0 = none)
    awp: float = 0.0  # AT: adversarial weight perturbation, relative size gamma (0 = none; 5e-3 typical)
    robust_check: int = 256  # adversarial runs: training images held out for the per-epoch PGD check
    # which images those are: fixed and independent of --seed, so that a warm restart with a new
    # seed checks on the images its parent held out too, not on images the parent trained on
    robust_check_seed: int = 0
    precision: str = "bf16"  # bf16 | fp32: autocast of the training step
    seed: int = 0  # data order, augmentation, attacks and (main) the initial weights
    init: str = ""  # checkpoint path: start from its weights (fresh optimizer and schedule)
    purifier: str = ""  # checkpoint path: adapt to this purifier's outputs (see the docstring)
    purified_fraction: float = 0.5  # share of each batch replaced by g(t(x)) when --purifier
    purified_test: int = 1000  # test images for test_acc_purified (0 = all)
    teacher: str = ""  # checkpoint path: distil its clean-image predictions (see the docstring)
    distill_weight: float = 0.5  # a: share of the loss given to the teacher's soft targets
    distill_temperature: float = 4.0  # tau: divisor of both networks' logits
    limit_train: int = 0  # training images used (0 = whole split); tests use a handful
    limit_test: int = 0  # test images used (0 = whole split)
    checkpoint_every_s: float = 300.0  # seconds between periodic saves of last.safetensors
    max_steps: int = 0  # steps after which to stop early (0 = all epochs; tests, time-boxed runs)

    def classifier(self, train: Split) -> ClassifierConfig:
        """The network for ``train``'s classes: as many outputs, their names, and the input
        normalisation of its pixels (CIFAR-10's customary figures for CIFAR-10 itself)."""
        if train.classes == CIFAR10_CLASSES and self.image_size == 32:
            mean, std = CIFAR10_MEAN, CIFAR10_STD
        else:
            mean, std = channel_stats(train)
        return ClassifierConfig(
            depth=self.depth,
            width=self.width,
            arch=self.arch,
            num_classes=len(train.classes),
            classes=train.classes,
            image_size=self.image_size,
            mean=mean,
            std=std,
        )

    def alpha(self) -> float:
        if self.adv_alpha > 0:
            return self.adv_alpha
        return 1.25 * self.adv_eps if self.adversarial == "fgsm" else 2 / 255


def run(
    cfg: TrainClassifierConfig, *, resume: bool = False, overwrite: bool = False, threads: int | None = None
) -> dict:
    _refuse_contradictions(cfg)
    session = Run(
        "classifier", cfg.out, precision=cfg.precision, resume=resume, overwrite=overwrite, threads=threads
    )
    device = session.info.device
    # Data: the splits; adversarial runs hold images out of training for the robust check.
    train, test = _load_splits(cfg)
    model_cfg = cfg.classifier(train)
    check = RobustCheck(images=cfg.robust_check, eps=cfg.adv_eps, seed=cfg.robust_check_seed)
    held = None
    if cfg.adversarial != "none" and check.images:
        train, held = robust_check.hold_out(train, check)
    # Model: the network and its optimizer; with --ema the weight average is the model that is
    # checked and saved as "classifier", the trained network rides along in last.safetensors.
    model = build_classifier(model_cfg).to(device, memory_format=torch.channels_last)
    opt = _sgd(model, cfg)
    average = WeightAverage(model, cfg.ema) if cfg.ema else None
    served = average.model if average else model
    session.saves(
        run_config("classifier", train=asdict(cfg), model=model_cfg.to_dict()),
        models={"classifier": served},
        optimizers={"classifier": opt},
        last_only={"trained": model} if average else None,
    )
    if not session.resume() and cfg.init:
        _warm_start(cfg, model_cfg, model, average)
    purifier, spec = _frozen_purifier(cfg, device)
    if cfg.teacher:
        train = _with_teacher(cfg, train, model_cfg.classes, device)
    # Step, then the loop.
    step = ClassifierStep(cfg, session.info, model, opt, average, purifier, spec, test)
    if held is not None:
        session.keep_best(HeldOut(check, held, lambda: served))
    return session.train(LoopConfig.of(cfg), train, step, step.checks, replicas=[model])


def _refuse_contradictions(cfg: TrainClassifierConfig) -> None:
    if cfg.purifier and cfg.adversarial != "none":
        raise ValueError("--purifier and --adversarial cannot be combined")
    if not 0.0 < cfg.purified_fraction <= 1.0:
        raise ValueError(f"--purified-fraction must be in (0, 1], got {cfg.purified_fraction}")
    if cfg.teacher and not (0.0 < cfg.distill_weight <= 1.0 and cfg.distill_temperature > 0):
        raise ValueError("--distill-weight must be in (0, 1] and --distill-temperature > 0")
    if cfg.adversarial not in ("none", "fgsm", "pgd"):
        raise ValueError(f"--adversarial must be none, fgsm or pgd, not {cfg.adversarial!r}")
    if cfg.awp and cfg.adversarial == "none":
        raise ValueError("--awp perturbs the weights against the adversarial loss: it needs --adversarial")


def _load_splits(cfg: TrainClassifierConfig) -> tuple[Split, Split]:
    """(training split, test split in the training classes' order), each cut to its --limit."""
    train = load_split(cfg.data, "train", size=cfg.image_size)
    test = load_split(cfg.data, "test", size=cfg.image_size, classes=train.classes)
    log.info("%d classes: %s", len(train.classes), ", ".join(train.classes))
    if cfg.limit_train:
        train = train.subset(cfg.limit_train, seed=cfg.seed)
    if cfg.limit_test:
        test = test.subset(cfg.limit_test, seed=cfg.seed)
    return train, test


def _sgd(model: torch.nn.Module, cfg: TrainClassifierConfig) -> torch.optim.SGD:
    """Nesterov SGD, weight decay on conv and linear weights only (not on biases and BN)."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )


def _warm_start(cfg: TrainClassifierConfig, model_cfg: ClassifierConfig, model, average) -> None:
    """--init: the weights (and the average's) from a classifier of the same shape and classes."""
    init = load_classifier(cfg.init)
    shape = ("arch", "depth", "width", "num_classes", "flip_tta")
    if any(getattr(init.cfg, k) != getattr(model_cfg, k) for k in shape):
        raise ValueError(
            f"{cfg.init}: not a {cfg.arch} classifier checkpoint with depth {cfg.depth}, width"
            f" {cfg.width} and {model_cfg.num_classes} classes"
        )
    if init.cfg.classes and init.cfg.classes != model_cfg.classes:
        raise ValueError(
            f"{cfg.init} was trained on classes {', '.join(init.cfg.classes)}; this data has"
            f" {', '.join(model_cfg.classes)}"
        )
    model.load_state_dict(init.state_dict())
    if average:
        average.model.load_state_dict(init.state_dict())
    log.info("initialised from %s", cfg.init)


def _frozen_purifier(cfg: TrainClassifierConfig, device: torch.device):
    """(--purifier's g, frozen on ``device``, and its RT spec), or (None, None)."""
    if not cfg.purifier:
        return None, None
    purifier, spec = load_purifier(cfg.purifier)
    if spec.image_size != cfg.image_size:
        raise ValueError(
            f"--purifier {cfg.purifier} works on {spec.image_size}-px images, not --image-size {cfg.image_size}"
        )
    purifier.requires_grad_(False).to(device)
    log.info(
        "adapting to purifier %s: %.0f%% of each batch is g(t(x))", cfg.purifier, 100 * cfg.purified_fraction
    )
    return purifier, spec


def _with_teacher(cfg: TrainClassifierConfig, train: Split, classes, device: torch.device) -> Split:
    """``train`` carrying the --teacher's soft targets for its images."""
    teacher = load_classifier(cfg.teacher)
    require_classes(teacher.cfg, classes, f"--teacher {cfg.teacher}")
    soft = soft_targets(teacher.to(device), train, cfg.distill_temperature)
    log.info(
        "distilling %s (weight %g, temperature %g)", cfg.teacher, cfg.distill_weight, cfg.distill_temperature
    )
    return replace(train, soft=soft)


@torch.no_grad()
def soft_targets(teacher: torch.nn.Module, split: Split, temperature: float) -> torch.Tensor:
    """softmax(teacher(x) / temperature) for every image of ``split`` (CPU float32 [N, classes])."""
    teacher.eval()
    device = next(teacher.parameters()).device
    out = []
    for x, _ in tqdm(batches(split, 500), desc="teacher", total=-(-len(split) // 500), leave=False):
        out.append(F.softmax(teacher(x.to(device)) / temperature, dim=1).cpu())
    return torch.cat(out)


class ClassifierStep:
    """One training step (attack, purifier mix, loss, SGD update, weight average) and the
    per-epoch checks (test accuracy, alone and through the purifier)."""

    def __init__(self, cfg: TrainClassifierConfig, info: DistInfo, model, opt, average, purifier, spec, test):
        self.cfg, self.info, self.model, self.opt, self.average = cfg, info, model, opt, average
        self.served = average.model if average else model
        self.ddp = wrap_ddp(model, info)
        self.purifier, self.spec, self.test = purifier, spec, test
        self.awp = WeightPerturbation(model, cfg.awp) if cfg.awp else None

    def __call__(self, batch: Batch, step: int, total: int) -> dict:
        cfg, model, ddp, opt = self.cfg, self.model, self.ddp, self.opt
        x, y = batch.x.contiguous(memory_format=torch.channels_last), batch.y
        ddp.train()
        with autocast(self.info.device, cfg.precision):
            gen = step_generator(cfg.seed, step)
            if cfg.adversarial == "pgd":
                x = pgd(model, x, y, eps=cfg.adv_eps, steps=cfg.adv_steps, alpha=cfg.alpha(), gen=gen)
            elif cfg.adversarial == "fgsm":
                x = fgsm_rs(ddp, x, y, eps=cfg.adv_eps, alpha=cfg.alpha(), gen=gen)
            if self.purifier is not None:
                x = self._purify_head(x, gen)
            for g in opt.param_groups:
                g["lr"] = one_cycle_lr(step, total, cfg.lr, cfg.warmup)
            if self.awp is not None:  # the update's gradient is taken at the worst nearby weights
                self.awp.perturb(F.cross_entropy(model(x).float(), y))
            logits = ddp(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if batch.soft is not None:
                tau, a = cfg.distill_temperature, cfg.distill_weight
                kl = F.kl_div(F.log_softmax(logits.float() / tau, dim=1), batch.soft, reduction="batchmean")
                loss = (1 - a) * loss + a * tau * tau * kl
        opt.zero_grad(set_to_none=True)
        try:
            loss.backward()
        finally:
            if self.awp is not None:
                self.awp.restore()
        opt.step()
        if self.average:
            self.average.update(model, step)
        return {"loss": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item()}

    def _purify_head(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x`` with its first ``purified_fraction`` replaced by g(t(x)), fresh RT draws."""
        k = max(1, round(self.cfg.purified_fraction * x.shape[0]))
        s = sample_rt(self.spec, k, gen, self.info.device)
        with torch.no_grad():
            restored = purify(self.purifier, x[:k], s.noise, s.masks, self.spec.applied_noise_std)
        return torch.cat([restored.float().contiguous(memory_format=torch.channels_last), x[k:]])

    def checks(self) -> dict:
        """The epoch's figures: test accuracy, alone and through the purifier (rank 0)."""
        self.model.eval()
        self.served.eval()
        main = self.info.main
        metrics = {"test_acc": accuracy(self.served, self.test)["acc"] if main else None}
        if self.purifier is not None and main:
            split = self.test.subset(self.cfg.purified_test) if self.cfg.purified_test else self.test
            metrics["test_acc_purified"] = accuracy(
                self.served, split, purifier=self.purifier, spec=self.spec
            )["acc"]
        return metrics


ARGS = [  # (field, help); defaults come from the config
    ("depth", "residual blocks per stage (resnet: 3 = ResNet-20; fast: conv units, 1)"),
    ("width", "channels of the first stage"),
    (
        "image_size",
        "side of the square images the model takes: every training and test image is"
        " centre-cropped to a square and resized to it, as the service does with requests",
    ),
    ("epochs", "training epochs"),
    ("batch_size", "batch size per process"),
    ("lr", "peak learning rate (one-cycle: warm-up then cosine)"),
    ("momentum", "SGD Nesterov momentum"),
    ("weight_decay", "L2 weight decay on conv/linear weights"),
    ("label_smoothing", "cross-entropy label smoothing"),
    ("warmup", "fraction of steps spent warming up"),
    ("adv_eps", "AT: l-inf radius of the training attack"),
    ("adv_steps", "PGD-AT: attack steps"),
    ("adv_alpha", "AT: attack step size (0 = pgd 2/255, fgsm 1.25 x eps)"),
    (
        "ema",
        "decay of a moving average of the weights, which is then what each epoch checks and"
        " every checkpoint saves as the classifier (e.g. 0.999; 0 = none)",
    ),
    (
        "awp",
        "AT: adversarial weight perturbation (Wu et al. 2020): each step's gradient is taken at"
        " weights moved by this fraction of each layer's norm towards higher adversarial loss;"
        " costs one more pass per step, counters robust overfitting (0 = off; 5e-3 typical)",
    ),
    ("robust_check", "AT: training images held out for the per-epoch PGD-10 check (0 = none)"),
    (
        "robust_check_seed",
        "AT: picks those held-out images; independent of --seed, so a warm restart (--init) with a"
        " new --seed holds out the same images as its parent did (keep the parent's value)",
    ),
    ("purified_fraction", "with --purifier: share of each batch replaced by g(t(x))"),
    ("purified_test", "with --purifier: test images for test_acc_purified (0 = all)"),
    ("distill_weight", "with --teacher: share of the loss given to the teacher's soft targets"),
    ("distill_temperature", "with --teacher: temperature softening teacher and student"),
    ("seed", "seed for data order, augmentation and init"),
    ("limit_train", "use only this many training images (0 = all)"),
    ("limit_test", "evaluate on this many test images (0 = all)"),
    ("checkpoint_every_s", "save last.safetensors at least this often (seconds)"),
    ("max_steps", "stop after this many steps (0 = run all epochs)"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_flags(p, TrainClassifierConfig(data="", out=""), ARGS, fmt="g")
    p.add_argument(
        "--init", default="", help="start from this classifier checkpoint's weights (warm restart)"
    )
    p.add_argument(
        "--purifier",
        default="",
        help="adapt the classifier to this pre-trained purifier: part of each batch becomes"
        " g(t(x)) with fresh RT draws (the purifier stays frozen)",
    )
    p.add_argument(
        "--teacher",
        default="",
        help="distil this trained classifier (e.g. the standard ensemble): its prediction on the"
        " clean image becomes a soft target, also for the purified copy",
    )
    p.add_argument(
        "--arch",
        choices=["resnet", "fast"],
        default="resnet",
        help="resnet: He et al.'s CIFAR ResNet; fast: a shallow, wide residual net, ~3x faster per"
        " image on a CPU than a width-32 ResNet (see training/classifier.py) (default resnet)",
    )
    p.add_argument(
        "--adversarial",
        choices=["none", "fgsm", "pgd"],
        default="none",
        help="adversarial training with every image adversarial: 'fgsm' = FGSM from a random"
        " start (fast AT, Wong et al. 2020), 'pgd' = PGD-k (Madry et al.) (default none)",
    )
    add_precision_argument(p)


def main(args: argparse.Namespace) -> int:
    return cli.main(run, config_from_args(TrainClassifierConfig, args), args)
