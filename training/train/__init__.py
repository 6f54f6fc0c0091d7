"""``atop train classifier | purifier | finetune``: the trainers, on one skeleton.

loop.py          the skeleton: a Run from --out to final.safetensors (resume, checkpoints,
                 epochs, metrics.jsonl, best epoch, signals)
classifier.py    atop train classifier: standard, adversarial, purifier-adapted, distilled
purifier.py      atop train purifier: pre-training of g (finetune runs the same trainer)
finetune.py      atop train finetune: AToP, the purifier stage with f frozen and x' adversarial
robust_check.py  the per-epoch PGD check on held-out training images, the best-epoch rule
step.py          what a step uses: LR schedule, per-step generator, bf16 autocast, EMA
distributed.py   torchrun/DDP: process group, replica sync and check
cli.py           the command line they share: flags from the config dataclasses, main
"""
