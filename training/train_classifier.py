"""``atop train classifier``: standard (or PGD adversarial) training of the CIFAR ResNet.

The standard model becomes the frozen classifier f of the defense. ``--adversarial`` trains
the adversarial-training (AT) baseline that the evaluation compares AToP against, with every
image of every batch adversarial: ``fgsm`` is fast AT (FGSM from a random start, step 1.25·ε,
Wong et al. 2020), ``pgd`` is PGD-k AT (Madry et al.). Adversarial runs hold ``--robust-check``
images out of the training split, measure PGD-10 accuracy on them after every epoch
(``robust_acc``, see training/robust_check.py), keep the best epoch as ``best.safetensors`` (the
most robust, up to the check's noise; within that, the most accurate) and stop when robustness
collapses (catastrophic overfitting), so ``best.safetensors`` is the AT model to use.

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
would cost three times the student's own step.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from training import common, robust_check
from training.attacks import fgsm_rs, pgd
from training.checkpoint import load_checkpoint, save_checkpoint
from training.classifier import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ClassifierConfig,
    build_classifier,
    load_classifier,
    require_classes,
)
from training.data import (
    CIFAR10_CLASSES,
    DATA_HELP,
    Split,
    batches,
    channel_stats,
    load_split,
    steps_per_epoch,
)
from training.purifier import load_purifier, purify
from training.robust_check import BestEpoch, RobustCheck, robust_accuracy
from training.train_purifier import evaluate as evaluate_purified
from training.transforms import sample_rt

log = logging.getLogger("atop.train.classifier")


@dataclass(frozen=True)
class TrainClassifierConfig:
    data: str
    out: str
    arch: str = "resnet"  # resnet | fast
    depth: int = 3  # residual blocks per stage (3 = ResNet-20)
    width: int = 16  # channels of the first stage
    image_size: int = 32  # training images are brought to this square size (the service's rule)
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.1  # peak learning rate of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup: float = 0.05  # fraction of the run spent warming up
    adversarial: str = "none"  # none | fgsm | pgd
    adv_eps: float = 8 / 255
    adv_steps: int = 7  # pgd only
    adv_alpha: float = 0.0  # step size; 0 = the method's own: pgd 2/255, fgsm 1.25 * eps
    ema: float = 0.0  # decay of the weight average that is checked and saved (0 = none)
    robust_check: int = 256  # adversarial runs: training images held out for the per-epoch PGD check
    precision: str = "bf16"  # bf16 | fp32: autocast of the training step
    seed: int = 0
    init: str = ""  # start from this checkpoint's weights (fresh optimizer and schedule)
    purifier: str = ""  # adapt to this purifier's outputs (see the module docstring)
    purified_fraction: float = 0.5  # share of each batch replaced by g(t(x)) when --purifier
    purified_test: int = 1000  # test images for test_acc_purified (0 = all)
    teacher: str = ""  # distil this classifier's clean-image predictions (see the docstring)
    distill_weight: float = 0.5  # a: share of the loss given to the teacher's soft targets
    distill_temperature: float = 4.0  # tau: softening of both distributions
    limit_train: int = 0  # 0 = whole split; tests use a handful of images
    limit_test: int = 0
    checkpoint_every_s: float = 300.0
    max_steps: int = 0  # stop early after this many steps (tests, time-boxed runs)

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
    if cfg.purifier and cfg.adversarial != "none":
        raise ValueError("--purifier and --adversarial cannot be combined")
    if not 0.0 < cfg.purified_fraction <= 1.0:
        raise ValueError(f"--purified-fraction must be in (0, 1], got {cfg.purified_fraction}")
    if cfg.teacher and not (0.0 < cfg.distill_weight <= 1.0 and cfg.distill_temperature > 0):
        raise ValueError("--distill-weight must be in (0, 1] and --distill-temperature > 0")
    common.check_precision(cfg.precision)
    if cfg.adversarial not in ("none", "fgsm", "pgd"):
        raise ValueError(f"--adversarial must be none, fgsm or pgd, not {cfg.adversarial!r}")
    info = common.init_distributed(threads)
    out = Path(cfg.out)
    common.claim_out(out, resume=resume, overwrite=overwrite)
    train = load_split(cfg.data, "train", size=cfg.image_size)
    test = load_split(cfg.data, "test", size=cfg.image_size, classes=train.classes)
    log.info("%d classes: %s", len(train.classes), ", ".join(train.classes))
    if cfg.limit_train:
        train = train.subset(cfg.limit_train, seed=cfg.seed)
    model_cfg = cfg.classifier(train)
    check = RobustCheck(images=cfg.robust_check, eps=cfg.adv_eps, seed=cfg.seed)
    held = None
    if cfg.adversarial != "none" and check.images:
        train, held = robust_check.hold_out(train, check)
    best = BestEpoch(out, check)
    if cfg.limit_test:
        test = test.subset(cfg.limit_test, seed=cfg.seed)
    model = build_classifier(model_cfg).to(info.device, memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    # With --ema the weight average is the model: checked each epoch, saved as "classifier" in
    # every checkpoint; the trained network rides along in last.safetensors as "trained".
    average = common.WeightAverage(model, cfg.ema) if cfg.ema else None
    served = average.model if average else model
    step = 0
    if resume and (out / "last.safetensors").is_file():
        ck = load_checkpoint(out / "last.safetensors")
        served.load_state_dict(ck.state_dict("classifier"))
        if average:
            model.load_state_dict(ck.state_dict("trained"))
        ck.load_optimizer("classifier", opt)
        step = ck.header["step"]
        log.info("resumed from %s at step %d", ck.path, step)
    elif cfg.init:  # warm restart: weights only, a new one-cycle schedule
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
            served.load_state_dict(init.state_dict())
        log.info("initialised from %s", cfg.init)
    purifier, spec = load_purifier(cfg.purifier) if cfg.purifier else (None, None)
    if spec is not None and spec.image_size != cfg.image_size:
        raise ValueError(
            f"--purifier {cfg.purifier} works on {spec.image_size}-px images, not --image-size {cfg.image_size}"
        )
    if purifier is not None:
        purifier.requires_grad_(False).to(info.device)
        log.info(
            "adapting to purifier %s: %.0f%% of each batch is g(t(x))",
            cfg.purifier,
            100 * cfg.purified_fraction,
        )
    soft, labels = None, train.labels
    if cfg.teacher:
        teacher = load_classifier(cfg.teacher)
        require_classes(teacher.cfg, model_cfg.classes, f"--teacher {cfg.teacher}")
        soft = soft_targets(teacher.to(info.device), train, cfg.distill_temperature)
        # The loop hands each step its images' positions in place of their labels, so the step
        # can look up both the label and the soft target.
        train = Split(train.images, torch.arange(len(train)), train.classes, train.source, train.checksum)
        log.info(
            "distilling %s (weight %g, temperature %g)",
            cfg.teacher,
            cfg.distill_weight,
            cfg.distill_temperature,
        )
    ddp = common.wrap_ddp(model, info)
    saved_config = {"kind": "classifier", "train": asdict(cfg), "model": model_cfg.to_dict()}

    def save(name: str, step: int, epoch: int, metrics: dict | None) -> None:
        last = name == "last.safetensors"
        save_checkpoint(
            out / name,
            models={"classifier": served} | ({"trained": model} if average and last else {}),
            optimizers={"classifier": opt} if last else None,
            config=saved_config,
            step=step,
            epoch=epoch,
            metrics=metrics,
        )

    def train_step(x: torch.Tensor, y: torch.Tensor, step: int, total: int) -> dict:
        x = x.contiguous(memory_format=torch.channels_last)
        if soft is not None:
            idx = y.cpu()
            y, target = labels[idx].to(x.device), soft[idx].to(x.device)
        ddp.train()
        with common.autocast(info.device, cfg.precision):
            gen = common.step_generator(cfg.seed, step)
            if cfg.adversarial == "pgd":
                x = pgd(model, x, y, eps=cfg.adv_eps, steps=cfg.adv_steps, alpha=cfg.alpha(), gen=gen)
            elif cfg.adversarial == "fgsm":
                x = fgsm_rs(ddp, x, y, eps=cfg.adv_eps, alpha=cfg.alpha(), gen=gen)
            if purifier is not None:
                k = max(1, round(cfg.purified_fraction * x.shape[0]))
                s = sample_rt(spec, k, gen, info.device)
                with torch.no_grad():
                    restored = purify(purifier, x[:k], s.noise, s.masks, spec.applied_noise_std)
                x = torch.cat([restored.float().contiguous(memory_format=torch.channels_last), x[k:]])
            for g in opt.param_groups:
                g["lr"] = common.one_cycle_lr(step, total, cfg.lr, cfg.warmup)
            logits = ddp(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if soft is not None:
                tau, a = cfg.distill_temperature, cfg.distill_weight
                kl = F.kl_div(F.log_softmax(logits.float() / tau, dim=1), target, reduction="batchmean")
                loss = (1 - a) * loss + a * tau * tau * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if average:
            average.update(model, step)
        return {"loss": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item()}

    def epoch_end(step: int, means: dict) -> dict:
        common.sync_buffers(model, info)
        model.eval()
        served.eval()
        acc = common.evaluate_accuracy(served, test) if info.main else None
        metrics = {"train_loss": means.get("loss"), "train_acc": means.get("acc"), "test_acc": acc}
        if purifier is not None and info.main:
            split = test.subset(cfg.purified_test) if cfg.purified_test else test
            metrics["test_acc_purified"] = evaluate_purified(purifier, served, spec, split)["pipeline_acc"]
        if held is not None and info.main:
            epoch = step // steps_per_epoch(train, cfg.batch_size, info.world_size)
            metrics = best.record_and_keep(
                robust_accuracy(served, held, check),
                len(held),
                metrics,
                lambda m: save("best.safetensors", step, epoch, m),
            )
        return metrics

    loop = common.LoopSpec(
        cfg.batch_size, cfg.epochs, cfg.seed, cfg.max_steps, cfg.checkpoint_every_s, "classifier"
    )
    metrics = common.train_loop(
        loop,
        info,
        train,
        common.RunLog(out, info),
        start_step=step,
        step_fn=train_step,
        epoch_end_fn=epoch_end,
        save_fn=save,
        models=[model],
    )
    common.finish_distributed(info)
    return metrics


@torch.no_grad()
def soft_targets(teacher: torch.nn.Module, split: Split, temperature: float) -> torch.Tensor:
    """softmax(teacher(x) / temperature) for every image of ``split`` (CPU float32 [N, classes])."""
    teacher.eval()
    device = next(teacher.parameters()).device
    out = []
    for x, _ in tqdm(batches(split, 500), desc="teacher", total=-(-len(split) // 500), leave=False):
        out.append(F.softmax(teacher(x.to(device)) / temperature, dim=1).cpu())
    return torch.cat(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in fields(TrainClassifierConfig)}
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="run folder: checkpoints and metrics.jsonl")
    for name, help_ in [
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
        ("robust_check", "AT: training images held out for the per-epoch PGD-10 check (0 = none)"),
        ("purified_fraction", "with --purifier: share of each batch replaced by g(t(x))"),
        ("purified_test", "with --purifier: test images for test_acc_purified (0 = all)"),
        ("distill_weight", "with --teacher: share of the loss given to the teacher's soft targets"),
        ("distill_temperature", "with --teacher: temperature softening teacher and student"),
        ("seed", "seed for data order, augmentation and init"),
        ("limit_train", "use only this many training images (0 = all)"),
        ("limit_test", "evaluate on this many test images (0 = all)"),
        ("checkpoint_every_s", "save last.safetensors at least this often (seconds)"),
        ("max_steps", "stop after this many steps (0 = run all epochs)"),
    ]:
        d = defaults[name]
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(d),
            default=d,
            help=f"{help_} (default {d:g})" if not isinstance(d, str) else help_,
        )
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
    common.add_precision_argument(p)


def config_from_args(args: argparse.Namespace) -> TrainClassifierConfig:
    return TrainClassifierConfig(**{f.name: getattr(args, f.name) for f in fields(TrainClassifierConfig)})


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    torch.manual_seed(cfg.seed)  # model init only; data and attacks use their own generators
    metrics = run(cfg, resume=args.resume, overwrite=args.overwrite, threads=args.threads)
    log.info("done: %s", metrics)
    return 0
