"""``atop train purifier`` (pre-training) and the loop that ``atop train finetune`` reuses.

Pre-training: L1 reconstruction + hinge GAN loss on RT'd *clean* images,
    L_df(x) = E[D(x)] - E[D(g(t(x)))] + |x - g(t(x))|_1.
The noise std is drawn per image from U[0, noise_max], so one purifier serves the whole σ
sweep; the deployed σ (``noise_std``) is what the saved RT spec carries.

Fine-tuning (AToP, see finetune.py) runs the same loop with the classifier f frozen, adversarial
inputs x', and the extra term λ·CE(y, f(g(t(x')))); reconstruction still targets the clean x.

``--precision bf16`` (the default) runs the training step's forward passes, the training-time
attack included, under bf16 autocast; the losses are taken in fp32 and the per-epoch checks
(PSNR, pipeline accuracy, the pass-through metric of ``training.purifier.pass_through``) stay
fp32.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.nn import functional as F

from training import common, robust_check
from training.attacks import fgsm, pgd
from training.checkpoint import load_checkpoint, save_checkpoint
from training.classifier import load_classifier, require_classes
from training.data import DATA_HELP, batches, load_split, steps_per_epoch
from training.purifier import (
    DefendedPipeline,
    PatchDiscriminator,
    PurifierConfig,
    StochasticPipeline,
    UNetPurifier,
    pass_through,
    purify,
)
from training.robust_check import BestEpoch, RobustCheck, robust_accuracy
from training.transforms import RTSpec, sample_rt

log = logging.getLogger("atop.train.purifier")


@dataclass(frozen=True)
class PurifierTrainConfig:
    data: str
    out: str
    stage: str = "pretrain"  # pretrain | finetune
    rt: str = "rt2"
    noise_std: float = 0.0625  # deployed σ, saved in the RT spec
    noise_max: float = 0.125  # train σ ~ U[0, noise_max] per image; 0 = always noise_std
    block: int = 0  # mask block side in pixels; 0 = image size / 8 (4 at 32 px)
    image_size: int = 0  # 0 = the classifier's (32 without --classifier)
    missing: float = 0.25
    num_masks: int = 4
    width: int = 32
    disc_width: int = 64
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-4
    beta1: float = 0.5
    gan_weight: float = 0.01  # the L1 term must dominate: a 32x32 image has little texture to hallucinate
    classifier: str = ""  # classifier checkpoint: needed to fine-tune, optional to pre-train
    init: str = ""  # purifier checkpoint to start from (fine-tuning)
    lam: float = 0.0  # weight of CE(y, f(g(t(x')))) (AToP λ)
    adv: str = "none"  # none | fgsm (bare classifier, as the reference) | pgd (whole pipeline, EOT)
    adv_eps: float = 8 / 255
    adv_steps: int = 5
    adv_eot: int = 2
    clean_fraction: float = 0.0  # share of each batch left clean during fine-tuning
    eval_images: int = 1000
    pass_images: int = 256  # test images for the per-epoch pass-through / denoising check
    precision: str = "bf16"  # bf16 | fp32: autocast of the training step
    robust_check: int = 0  # fine-tune: training images held out for the per-epoch PGD-10 x EOT check
    robust_eot: int = 4  # EOT draws per step of that check
    seed: int = 0
    limit_train: int = 0
    limit_test: int = 0
    checkpoint_every_s: float = 300.0
    max_steps: int = 0

    def spec(self, size: int = 32) -> RTSpec:
        """The deployed RT at ``size`` px; the default block keeps the 8 x 8 grid of 32 px / 4."""
        block = self.block or max(1, size // 8)
        return RTSpec(self.rt, self.noise_std, block, self.missing, self.num_masks, image_size=size)

    def train_spec(self, size: int = 32) -> RTSpec:
        """Masks seen in training: one hole pattern per image (RT3's copies look like RT2's)."""
        missing = 1.0 / self.num_masks if self.rt == "rt3" else self.missing
        deployed = self.spec(size)
        return RTSpec("rt2", self.noise_std, deployed.block, missing, self.num_masks, image_size=size)


@torch.no_grad()
def evaluate(purifier, classifier, spec: RTSpec, split, seed: int = 1234) -> dict:
    """PSNR of g(t(x)) against x and, with a classifier, top-1 of f(g(t(x))), one fixed draw."""
    gen = torch.Generator().manual_seed(seed)
    se = correct = total = 0.0
    device = next(purifier.parameters()).device
    for x, y in batches(split, 250):
        x, y = x.to(device), y.to(device)
        s = sample_rt(spec, x.shape[0], gen, device)
        out = purify(purifier, x, s.noise, s.masks, spec.applied_noise_std)
        se += float(((out - x) ** 2).flatten(1).mean(1).clamp_min(1e-10).log10().sum())
        if classifier is not None:
            correct += float((classifier(out).argmax(1) == y).sum())
        total += len(y)
    res = {"psnr": -10 * se / total}
    if classifier is not None:
        res["pipeline_acc"] = correct / total
    return res


def run(
    cfg: PurifierTrainConfig, *, resume: bool = False, overwrite: bool = False, threads: int | None = None
) -> dict:
    common.check_precision(cfg.precision)
    if cfg.stage == "finetune" and (not cfg.classifier or not cfg.init):
        raise ValueError("fine-tuning needs --classifier and --purifier checkpoints")
    info = common.init_distributed(threads)
    out = Path(cfg.out)
    common.claim_out(out, resume=resume, overwrite=overwrite)
    # channels_last throughout (purifier, D, the frozen classifier): 1.2-1.4x the NCHW training
    # step on a CPU, fp32 and bf16 alike (one thread, batch 128, pre-training and fine-tuning).
    cl = torch.channels_last
    classifier = load_classifier(cfg.classifier).to(info.device, memory_format=cl) if cfg.classifier else None
    if classifier is not None:
        classifier.requires_grad_(False)
    size = _image_size(cfg, classifier)
    train = load_split(cfg.data, "train", size=size)
    test = load_split(cfg.data, "test", size=size, classes=train.classes)
    if classifier is not None:
        require_classes(classifier.cfg, train.classes, f"classifier {cfg.classifier}")
    if cfg.limit_train:
        train = train.subset(cfg.limit_train, seed=cfg.seed)
    test = test.subset(cfg.limit_test or cfg.eval_images, seed=cfg.seed)
    spec, tspec = cfg.spec(size), cfg.train_spec(size)
    check = RobustCheck(images=cfg.robust_check, eot=cfg.robust_eot, eps=cfg.adv_eps, seed=cfg.seed)
    held = None
    if cfg.stage == "finetune" and check.images:  # through the whole pipeline, EOT over the RT
        train, held = robust_check.hold_out(train, check)
    best = BestEpoch(out, check)

    G = UNetPurifier(PurifierConfig(cfg.width)).to(info.device, memory_format=cl)
    D = PatchDiscriminator(cfg.disc_width).to(info.device, memory_format=cl)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    step = 0
    if resume and (out / "last.safetensors").is_file():
        ck = load_checkpoint(out / "last.safetensors")
        G.load_state_dict(ck.state_dict("purifier"))
        D.load_state_dict(ck.state_dict("discriminator"))
        ck.load_optimizer("purifier", opt_g)
        ck.load_optimizer("discriminator", opt_d)
        step = ck.header["step"]
        log.info("resumed from %s at step %d", ck.path, step)
    elif cfg.init:
        ck = load_checkpoint(cfg.init)
        if PurifierConfig.from_dict(ck.config["model"]) != PurifierConfig(cfg.width):
            raise ValueError(f"{cfg.init}: purifier width differs from --width {cfg.width}")
        G.load_state_dict(ck.state_dict("purifier"))
        if "model/discriminator" in ck.tensors:
            D.load_state_dict(ck.state_dict("discriminator"))
        log.info("initialised purifier from %s", cfg.init)
    ddp_g, ddp_d = common.wrap_ddp(G, info), common.wrap_ddp(D, info)
    saved_config = {
        "kind": "purifier",
        "stage": cfg.stage,
        "train": asdict(cfg),
        "model": PurifierConfig(cfg.width).to_dict(),
        "rt": spec.to_dict(),
        "classes": list(train.classes),
    }

    def save(name: str, step: int, epoch: int, metrics: dict | None) -> None:
        last = name == "last.safetensors"
        save_checkpoint(
            out / name,
            models={"purifier": G, "discriminator": D},
            optimizers={"purifier": opt_g, "discriminator": opt_d} if last else None,
            config=saved_config,
            step=step,
            epoch=epoch,
            metrics=metrics,
        )

    def adversarial(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if cfg.adv == "none":
            return x
        k = int(round(x.shape[0] * cfg.clean_fraction))
        xa, ya = x[k:], y[k:]
        if cfg.adv == "fgsm":
            xa = fgsm(classifier, xa, ya, eps=cfg.adv_eps)
        else:
            target = StochasticPipeline(DefendedPipeline(G, classifier, spec), gen)
            xa = pgd(target, xa, ya, eps=cfg.adv_eps, steps=cfg.adv_steps, eot=cfg.adv_eot, gen=gen)
        return torch.cat([x[:k], xa])

    def train_step(x: torch.Tensor, y: torch.Tensor, step: int, total: int) -> dict:
        gen = common.step_generator(cfg.seed, step)
        lr = common.one_cycle_lr(step, total, cfg.lr, 0.02)
        for g in opt_g.param_groups + opt_d.param_groups:
            g["lr"] = lr
        # Forward passes (the attack's too) under the run's autocast; losses in fp32, backward
        # outside it. The images themselves stay fp32: only the networks' arithmetic is bf16.
        with common.autocast(info.device, cfg.precision):
            x_in = adversarial(x, y, gen)
            s = sample_rt(tspec, x.shape[0], gen, info.device)
            sigma = torch.full((x.shape[0], 1, 1, 1), tspec.noise_std)
            if cfg.noise_max > 0:
                sigma = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * cfg.noise_max
            if spec.kind == "rt1":  # masks only
                sigma.zero_()
            restored = purify(ddp_g, x_in, s.noise * sigma.to(info.device), s.masks, 1.0).float()
            # Generator step: D frozen and in eval mode (no power iteration), gradients reach G only.
            D.requires_grad_(False)
            D.eval()
            l1 = (restored - x).abs().mean()
            gan = -D(restored).float().mean()
            loss = l1 + cfg.gan_weight * gan
            if cfg.lam > 0:
                logits = classifier(restored).float()
                ce = F.cross_entropy(logits, y)
                loss = loss + cfg.lam * ce
        stats = {"l1": l1.item(), "gan": gan.item()}
        if cfg.lam > 0:
            stats |= {"ce": ce.item(), "acc": (logits.argmax(1) == y).float().mean().item()}
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        # Discriminator step: hinge loss, real and fake in one forward (one DDP reduction).
        D.requires_grad_(True)
        D.train()
        with common.autocast(info.device, cfg.precision):
            scores = ddp_d(torch.cat([x, restored.detach()])).float()
        real, fake = scores[: x.shape[0]], scores[x.shape[0] :]
        loss_d = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        if not math.isfinite(stats["l1"]):
            raise FloatingPointError(f"purifier loss diverged at step {step}")
        return stats | {"d": loss_d.item()}

    def epoch_end(step: int, means: dict) -> dict:
        common.sync_buffers(D, info)
        res = {}
        if info.main:
            res = evaluate(G, classifier, spec, test)
            res |= pass_through(G, spec, test, eps=cfg.adv_eps, images=cfg.pass_images, seed=cfg.seed + 4321)
        if held is not None and info.main:
            # The same images, random starts and RT draws every epoch: a fresh seeded generator.
            target = StochasticPipeline(
                DefendedPipeline(G, classifier, spec), torch.Generator().manual_seed(cfg.seed + 77)
            )
            epoch = step // steps_per_epoch(train, cfg.batch_size, info.world_size)
            res = best.record_and_keep(
                robust_accuracy(target, held, check),
                len(held),
                res,
                lambda m: save("best.safetensors", step, epoch, m),
            )
        return {**{f"train_{k}": v for k, v in means.items()}, **res}

    loop = common.LoopSpec(
        cfg.batch_size, cfg.epochs, cfg.seed, cfg.max_steps, cfg.checkpoint_every_s, cfg.stage
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
        models=[G, D],
    )
    common.finish_distributed(info)
    return metrics


def _image_size(cfg: PurifierTrainConfig, classifier) -> int:
    """The purifier works at its classifier's input size (the RT draws and g's output go
    straight into f); --image-size may only restate it."""
    own = classifier.cfg.image_size if classifier is not None else None
    if cfg.image_size and own and cfg.image_size != own:
        raise ValueError(f"--image-size {cfg.image_size}, but {cfg.classifier} takes {own}-px images")
    return cfg.image_size or own or 32


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


def add_common_arguments(p: argparse.ArgumentParser, defaults: PurifierTrainConfig, extra=()) -> None:
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="run folder: checkpoints and metrics.jsonl")
    for name, help_ in [*ARGS, *extra]:
        d = getattr(defaults, name)
        flag = f"--{name.replace('_', '-')}"
        if name == "rt":
            p.add_argument(flag, choices=["rt1", "rt2", "rt3"], default=d, help=f"{help_} (default {d})")
        elif name == "adv":
            p.add_argument(flag, choices=["fgsm", "pgd"], default=d, help=f"{help_} (default {d})")
        else:
            p.add_argument(flag, type=type(d), default=d, help=f"{help_} (default {d})")
    common.add_precision_argument(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, PurifierTrainConfig(data="", out=""))
    p.add_argument(
        "--classifier", default="", help="classifier checkpoint: report pipeline accuracy per epoch"
    )


def config_from_args(args: argparse.Namespace, **fixed) -> PurifierTrainConfig:
    names = {f.name for f in fields(PurifierTrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return PurifierTrainConfig(**(values | fixed))


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, stage="pretrain")
    torch.manual_seed(cfg.seed)
    metrics = run(cfg, resume=args.resume, overwrite=args.overwrite, threads=args.threads)
    log.info("done: %s", metrics)
    return 0
