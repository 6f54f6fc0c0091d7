"""``atop train finetune``: AToP — fine-tune a pre-trained purifier with an adversarial loss.

With the classifier f frozen, minimise  L_df(x') + λ·CE(y, f(g(t(x'))))  over the purifier g,
where x' = x + δ is adversarial. ``--adv fgsm`` makes x' by FGSM on the bare classifier (cheap
transfer, as the reference code does); ``--adv pgd`` runs PGD with EOT against the whole
pipeline f∘g∘t with the purifier as it currently is (principled, ~steps·eot times dearer).
``--clean-fraction`` keeps part of every batch clean, which protects clean accuracy.
``--precision`` (default bf16) is the autocast of the training step, the attack making x'
included; the per-epoch checks, among them the pass-through metric (``pass_through``: about 1
when a perturbation goes straight through g, about 0 when g removes it), stay fp32.
"""

from __future__ import annotations

import argparse

from training.train import cli
from training.train.cli import config_from_args
from training.train.purifier import PurifierTrainConfig, add_common_arguments, run

FINETUNE_DEFAULTS = PurifierTrainConfig(
    data="",
    out="",
    stage="finetune",
    epochs=2,
    lr=1e-4,
    lam=0.1,
    adv="fgsm",
    noise_max=0.0,
    clean_fraction=0.5,
    robust_check=256,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(
        p,
        FINETUNE_DEFAULTS,
        extra=[
            ("lam", "weight λ of the classification term CE(y, f(g(t(x'))))"),
            ("adv", "how x' is made: fgsm on the bare classifier, or pgd+EOT on the whole pipeline"),
            ("adv_eps", "l-inf radius of x'"),
            ("adv_steps", "PGD steps (--adv pgd)"),
            ("adv_eot", "EOT draws per PGD step (--adv pgd)"),
            ("clean_fraction", "share of each batch kept clean"),
            ("robust_check", "training images held out for the per-epoch PGD-10 x EOT check (0 = none)"),
            ("robust_eot", "EOT draws per step of that check"),
        ],
    )
    p.add_argument("--classifier", required=True, help="frozen classifier checkpoint")
    p.add_argument("--purifier", dest="init", required=True, help="pre-trained purifier checkpoint")


def main(args: argparse.Namespace) -> int:
    return cli.main(run, config_from_args(PurifierTrainConfig, args, stage="finetune"), args)
