"""``atop train purifier`` (pre-training), the trainer that ``atop train finetune`` reuses.

Pre-training: L1 reconstruction + hinge GAN loss on RT'd *clean* images,
    L_df(x) = E[D(x)] - E[D(g(t(x)))] + |x - g(t(x))|_1.
The noise std is drawn per image from U[0, noise_max], so one purifier serves the whole σ
sweep; the deployed σ (``noise_std``) is what the saved RT spec carries.

Fine-tuning (AToP, see finetune.py) runs the same trainer with the classifier f frozen,
adversarial inputs x', and the extra term λ·CE(y, f(g(t(x')))); reconstruction still targets
the clean x.

``--precision bf16`` (the default) runs the training step's forward passes, the training-time
attack included, under bf16 autocast; the losses are taken in fp32 and the per-epoch checks
(PSNR, pipeline accuracy, the pass-through metric of ``training.purifier.pass_through``) stay
fp32.

``run`` reads top to bottom: the frozen classifier, data, models, step, loop
(training/train/loop.py does the loop, the checkpoints and the best epoch).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from training.attacks import fgsm, pgd
from training.checkpoint import load_checkpoint, model_config, run_config
from training.classifier import load_classifier, require_classes
from training.data import Batch, Split, load_split
from training.metrics import accuracy
from training.purifier import (
    DefendedPipeline,
    PatchDiscriminator,
    PurifierConfig,
    StochasticPipeline,
    UNetPurifier,
    pass_through,
    purify,
)
from training.train import cli, robust_check
from training.train.cli import add_precision_argument, add_run_flags, config_from_args
from training.train.distributed import DistInfo, wrap_ddp
from training.train.loop import LoopConfig, Run
from training.train.robust_check import HeldOut, RobustCheck
from training.train.step import autocast, one_cycle_lr, step_generator
from training.transforms import RTSpec, sample_rt

log = logging.getLogger("atop.train.purifier")

# channels_last throughout (purifier, D, the frozen classifier): 1.2-1.4x the NCHW training
# step on a CPU, fp32 and bf16 alike (one thread, batch 128, pre-training and fine-tuning).
CL = torch.channels_last


@dataclass(frozen=True)
class PurifierTrainConfig:
    data: str  # the data set: folder tree, its tar.gz, or CIFAR-10's archive (DATA_HELP)
    out: str  # the run folder
    stage: str = "pretrain"  # pretrain | finetune
    rt: str = "rt2"  # rt1 | rt2 | rt3
    noise_std: float = 0.0625  # deployed σ per pixel in [0,1] units, saved in the RT spec
    noise_max: float = 0.125  # train σ ~ U[0, noise_max] per image, same units; 0 = always noise_std
    block: int = 0  # mask block side in pixels; 0 = image size / 8 (4 at 32 px)
    image_size: int = 0  # pixels a side; 0 = the classifier's (32 without --classifier)
    missing: float = 0.25  # share of blocks removed (RT1/RT2)
    num_masks: int = 4  # RT3: partition masks, one purifier pass each
    width: int = 32  # purifier channels at full resolution
    disc_width: int = 64  # discriminator channels of the first layer
    epochs: int = 10  # passes over the training split
    batch_size: int = 128  # images per step and process
    lr: float = 2e-4  # peak Adam learning rate (per step) of the one-cycle schedule, g and D
    beta1: float = 0.5  # Adam's first-moment decay
    gan_weight: float = 0.01  # the L1 term must dominate: a 32x32 image has little texture to hallucinate
    classifier: str = ""  # classifier checkpoint path: needed to fine-tune, optional to pre-train
    init: str = ""  # purifier checkpoint path to start from (fine-tuning)
    lam: float = 0.0  # weight of CE(y, f(g(t(x')))) (AToP λ), relative to the L1 term's 1
    adv: str = "none"  # none | fgsm (bare classifier, as the reference) | pgd (whole pipeline, EOT)
    adv_eps: float = 8 / 255  # l-inf radius of x' (and of the checks), in [0,1] pixel units
    adv_steps: int = 5  # PGD iterations per batch (adv pgd)
    adv_eot: int = 2  # RT draws averaged per PGD gradient (adv pgd)
    clean_fraction: float = 0.0  # share of each batch left clean during fine-tuning
    eval_images: int = 1000  # test images for the per-epoch PSNR / accuracy check
    pass_images: int = 256  # test images for the per-epoch pass-through / denoising check
    precision: str = "bf16"  # bf16 | fp32: autocast of the training step
    robust_check: int = 0  # fine-tune: training images held out for the per-epoch PGD-10 x EOT check
    robust_eot: int = 4  # RT draws averaged per step of that check
    seed: int = 0  # data order, RT draws, attacks and (main) the initial weights
    limit_train: int = 0  # training images used (0 = whole split)
    limit_test: int = 0  # test images used (0 = eval_images)
    checkpoint_every_s: float = 300.0  # seconds between periodic saves of last.safetensors
    max_steps: int = 0  # steps after which to stop early (0 = all epochs)

    def spec(self, size: int = 32) -> RTSpec:
        """The deployed RT at ``size`` px; the default block keeps the 8 x 8 grid of 32 px / 4."""
        block = self.block or max(1, size // 8)
        return RTSpec(self.rt, self.noise_std, block, self.missing, self.num_masks, image_size=size)

    def train_spec(self, size: int = 32) -> RTSpec:
        """Masks seen in training: one hole pattern per image (RT3's copies look like RT2's)."""
        missing = 1.0 / self.num_masks if self.rt == "rt3" else self.missing
        deployed = self.spec(size)
        return RTSpec("rt2", self.noise_std, deployed.block, missing, self.num_masks, image_size=size)


def run(
    cfg: PurifierTrainConfig, *, resume: bool = False, overwrite: bool = False, threads: int | None = None
) -> dict:
    if cfg.stage == "finetune" and (not cfg.classifier or not cfg.init):
        raise ValueError("fine-tuning needs --classifier and --purifier checkpoints")
    session = Run(
        cfg.stage, cfg.out, precision=cfg.precision, resume=resume, overwrite=overwrite, threads=threads
    )
    device = session.info.device
    # The frozen classifier f (optional in pre-training) sets the image size and the classes.
    classifier = _frozen_classifier(cfg.classifier, device)
    spec = cfg.spec(_image_size(cfg, classifier))
    # Data: the splits; fine-tuning holds images out of training for the robust check.
    train, test = _load_splits(cfg, spec.image_size, classifier)
    check = RobustCheck(images=cfg.robust_check, eot=cfg.robust_eot, eps=cfg.adv_eps, seed=cfg.seed)
    held = None
    if cfg.stage == "finetune" and check.images:  # through the whole pipeline, EOT over the RT
        train, held = robust_check.hold_out(train, check)
    # Models: the purifier g and its discriminator D, an Adam optimizer each.
    G = UNetPurifier(PurifierConfig(cfg.width)).to(device, memory_format=CL)
    D = PatchDiscriminator(cfg.disc_width).to(device, memory_format=CL)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    session.saves(
        run_config(
            "purifier",
            train=asdict(cfg),
            model=G.cfg.to_dict(),
            stage=cfg.stage,
            rt=spec.to_dict(),
            classes=list(train.classes),
        ),
        models={"purifier": G, "discriminator": D},
        optimizers={"purifier": opt_g, "discriminator": opt_d},
    )
    if not session.resume() and cfg.init:
        _start_from(cfg.init, G, D)
    # Step, then the loop.
    step = PurifierStep(cfg, session.info, G, D, opt_g, opt_d, classifier, spec, test)
    if held is not None:
        session.keep_best(HeldOut(check, held, step.pipeline))
    return session.train(LoopConfig.of(cfg), train, step, step.checks, replicas=[G, D])


def _frozen_classifier(path: str, device: torch.device):
    """--classifier's f, frozen on ``device``, or None."""
    if not path:
        return None
    return load_classifier(path).to(device, memory_format=CL).requires_grad_(False)


def _image_size(cfg: PurifierTrainConfig, classifier) -> int:
    """The purifier works at its classifier's input size (the RT draws and g's output go
    straight into f); --image-size may only restate it."""
    own = classifier.cfg.image_size if classifier is not None else None
    if cfg.image_size and own and cfg.image_size != own:
        raise ValueError(f"--image-size {cfg.image_size}, but {cfg.classifier} takes {own}-px images")
    return cfg.image_size or own or 32


def _load_splits(cfg: PurifierTrainConfig, size: int, classifier) -> tuple[Split, Split]:
    """(training split, test split), each cut to its limit; the classifier must answer the
    data's classes."""
    train = load_split(cfg.data, "train", size=size)
    test = load_split(cfg.data, "test", size=size, classes=train.classes)
    if classifier is not None:
        require_classes(classifier.cfg, train.classes, f"classifier {cfg.classifier}")
    if cfg.limit_train:
        train = train.subset(cfg.limit_train, seed=cfg.seed)
    return train, test.subset(cfg.limit_test or cfg.eval_images, seed=cfg.seed)


def _start_from(path: str, G: UNetPurifier, D: PatchDiscriminator) -> None:
    """--purifier (fine-tuning): g's weights, and D's when the checkpoint has them."""
    ck = load_checkpoint(path)
    if PurifierConfig.from_dict(model_config(ck.config, "purifier", ck.path)) != G.cfg:
        raise ValueError(f"{path}: purifier width differs from --width {G.cfg.width}")
    G.load_state_dict(ck.state_dict("purifier"))
    if "model/discriminator" in ck.tensors:
        D.load_state_dict(ck.state_dict("discriminator"))
    log.info("initialised purifier from %s", path)


class PurifierStep:
    """One training step of g, then of D, and the per-epoch checks (PSNR, accuracy through the
    pipeline, pass-through).

    g: L1 to the clean x + gan_weight x the hinge GAN term (+ lam x CE(y, f(g(t(x'))))), on
    x' = x or, with --adv, adversarial; D: hinge loss, real and fake in one forward.
    """

    def __init__(self, cfg: PurifierTrainConfig, info: DistInfo, G, D, opt_g, opt_d, classifier, spec, test):
        self.cfg, self.info, self.G, self.D, self.opt_g, self.opt_d = cfg, info, G, D, opt_g, opt_d
        self.ddp_g, self.ddp_d = wrap_ddp(G, info), wrap_ddp(D, info)
        self.classifier, self.spec, self.test = classifier, spec, test
        self.tspec = cfg.train_spec(spec.image_size)

    def __call__(self, batch: Batch, step: int, total: int) -> dict:
        cfg, device, D, x, y = self.cfg, self.info.device, self.D, batch.x, batch.y
        gen = step_generator(cfg.seed, step)
        lr = one_cycle_lr(step, total, cfg.lr, 0.02)
        for g in self.opt_g.param_groups + self.opt_d.param_groups:
            g["lr"] = lr
        # Forward passes (the attack's too) under the run's autocast; losses in fp32, backward
        # outside it. The images themselves stay fp32: only the networks' arithmetic is bf16.
        with autocast(device, cfg.precision):
            x_in = self._adversarial(x, y, gen)
            s = sample_rt(self.tspec, x.shape[0], gen, device)
            sigma = torch.full((x.shape[0], 1, 1, 1), self.tspec.noise_std)
            if cfg.noise_max > 0:
                sigma = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * cfg.noise_max
            if self.spec.kind == "rt1":  # masks only
                sigma.zero_()
            restored = purify(self.ddp_g, x_in, s.noise * sigma.to(device), s.masks, 1.0).float()
            # Generator step: D frozen and in eval mode (no power iteration), gradients reach G only.
            D.requires_grad_(False)
            D.eval()
            l1 = (restored - x).abs().mean()
            gan = -D(restored).float().mean()
            loss = l1 + cfg.gan_weight * gan
            if cfg.lam > 0:
                logits = self.classifier(restored).float()
                ce = F.cross_entropy(logits, y)
                loss = loss + cfg.lam * ce
        stats = {"l1": l1.item(), "gan": gan.item()}
        if cfg.lam > 0:
            stats |= {"ce": ce.item(), "acc": (logits.argmax(1) == y).float().mean().item()}
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        loss_d = self._discriminator_step(x, restored.detach())
        if not math.isfinite(stats["l1"]):
            raise FloatingPointError(f"purifier loss diverged at step {step}")
        return stats | {"d": loss_d}

    def _adversarial(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x' for --adv: the batch with all but its first clean_fraction attacked."""
        cfg = self.cfg
        if cfg.adv == "none":
            return x
        k = int(round(x.shape[0] * cfg.clean_fraction))
        xa, ya = x[k:], y[k:]
        if cfg.adv == "fgsm":
            xa = fgsm(self.classifier, xa, ya, eps=cfg.adv_eps)
        else:
            target = StochasticPipeline(DefendedPipeline(self.G, self.classifier, self.spec), gen)
            xa = pgd(target, xa, ya, eps=cfg.adv_eps, steps=cfg.adv_steps, eot=cfg.adv_eot, gen=gen)
        return torch.cat([x[:k], xa])

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """D's hinge loss, real and fake in one forward (one DDP reduction); returns the loss."""
        self.D.requires_grad_(True)
        self.D.train()
        with autocast(self.info.device, self.cfg.precision):
            scores = self.ddp_d(torch.cat([real, fake])).float()
        loss_d = F.relu(1 - scores[: real.shape[0]]).mean() + F.relu(1 + scores[real.shape[0] :]).mean()
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        return loss_d.item()

    def pipeline(self) -> StochasticPipeline:
        """f(g(t(x))) with a fresh generator seeded the same way: the robust check's target, the
        same images, random starts and RT draws every epoch."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 77)
        return StochasticPipeline(DefendedPipeline(self.G, self.classifier, self.spec), gen)

    def checks(self) -> dict:
        """The epoch's figures (rank 0): PSNR, accuracy through the pipeline with one fixed draw
        per image, and the pass-through metric."""
        if not self.info.main:
            return {}
        cfg, G, spec, test = self.cfg, self.G, self.spec, self.test
        found = accuracy(self.classifier, test, purifier=G, spec=spec)
        res = {"psnr": found["psnr"]}
        if self.classifier is not None:
            res["pipeline_acc"] = found["acc"]
        return res | pass_through(
            G, spec, test, eps=cfg.adv_eps, images=cfg.pass_images, seed=cfg.seed + 4321
        )


ARGS = [  # (field, help); defaults come from the config (per stage)
    ("rt", "random transform: rt1 (masks), rt2 (noise + masks), rt3 (noise + partition masks)"),
    ("noise_std", "deployed Gaussian noise std per native pixel, saved in the RT spec"),
    ("noise_max", "train with σ ~ U[0, noise_max] per image (0 = always --noise-std)"),
    ("block", "mask block side in pixels (0 = image size / 8: 4 at 32 px)"),
    ("image_size", "image side; 0 = the classifier's (the purifier must work at f's input size)"),
    ("missing", "fraction of blocks removed (RT1/RT2)"),
    ("num_masks", "RT3: number of partition masks (purifier passes)"),
    ("width", "purifier width (32: CPU model, 64: GPU model)"),
    ("disc_width", "discriminator width"),
    ("epochs", "training epochs"),
    ("batch_size", "batch size per process"),
    ("lr", "peak Adam learning rate"),
    ("beta1", "Adam beta1"),
    ("gan_weight", "weight of the hinge GAN term"),
    ("eval_images", "test images for the per-epoch PSNR / accuracy check"),
    ("pass_images", "test images for the per-epoch pass-through / denoising-error check"),
    ("seed", "seed for data order, RT draws and init"),
    ("limit_train", "use only this many training images (0 = all)"),
    ("limit_test", "evaluate on this many test images (0 = --eval-images)"),
    ("checkpoint_every_s", "save last.safetensors at least this often (seconds)"),
    ("max_steps", "stop after this many steps (0 = run all epochs)"),
]
CHOICES = {"rt": ["rt1", "rt2", "rt3"], "adv": ["fgsm", "pgd"]}


def add_common_arguments(p: argparse.ArgumentParser, defaults: PurifierTrainConfig, extra=()) -> None:
    add_run_flags(p, defaults, [*ARGS, *extra], choices=CHOICES)
    add_precision_argument(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, PurifierTrainConfig(data="", out=""))
    p.add_argument(
        "--classifier", default="", help="classifier checkpoint: report pipeline accuracy per epoch"
    )


def main(args: argparse.Namespace) -> int:
    return cli.main(run, config_from_args(PurifierTrainConfig, args, stage="pretrain"), args)
