"""Training-step throughput (images per second) of the real training commands, fp32 against bf16.

Runs ``atop train classifier | purifier | finetune`` itself for a few steps on a slice of the
training data, timing only the training step (the ``step`` a trainer hands to ``Run.train``;
data loading between steps and the per-epoch checks are left out) and skipping the first step
(warm-up). Every setting of the command's config can be given with ``--set key=value``.

    python bench/train_speed.py classifier --set arch=fast --set width=64 --set depth=2 \
        --set adversarial=fgsm --set batch_size=128
    python bench/train_speed.py purifier
    python bench/train_speed.py finetune --set classifier=CLF.safetensors --set purifier=PUR.safetensors \
        --set adv=pgd --set adv_steps=3

Each precision runs in turn (``--precisions bf16,fp32``), ``--rounds`` times, and the median
is printed with the ratio; on a shared machine compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time

import torch

from training.train import loop


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config(command: str, data: str, out: str, sets: dict):
    if command == "classifier":
        from training.train.classifier import TrainClassifierConfig

        base = TrainClassifierConfig(data=data, out=out)
    elif command == "purifier":
        from training.train.purifier import PurifierTrainConfig

        base = PurifierTrainConfig(data=data, out=out)
    else:
        from training.train.finetune import FINETUNE_DEFAULTS

        base = dataclasses.replace(FINETUNE_DEFAULTS, data=data, out=out)
    return dataclasses.replace(base, **sets)


def measure(command: str, cfg, threads: int) -> float:
    """Images per second of the training step, over steps 2.. of a short run."""
    times: list[float] = []
    train = loop.Run.train

    def timed_train(session, config, split, step_fn, checks, **kw):
        def step(batch, i, total):
            t = time.perf_counter()
            r = step_fn(batch, i, total)
            times.append(time.perf_counter() - t)
            return r

        session.best = None  # no per-epoch checks: only the step is timed
        return train(session, config, split, step, lambda: {}, **kw)

    loop.Run.train = timed_train
    try:
        torch.manual_seed(0)
        if command == "classifier":
            from training.train.classifier import run
        else:
            from training.train.purifier import run
        run(cfg, threads=threads)
    finally:
        loop.Run.train = train
    steps = times[1:]
    return cfg.batch_size * len(steps) / sum(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("classifier", "purifier", "finetune"))
    p.add_argument("--data", default="../shared/data/cifar10", help="training data (a slice is used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config field")
    p.add_argument("--steps", type=int, default=6, help="training steps per measurement (first skipped)")
    p.add_argument("--precisions", default="bf16,fp32", help="comma-separated, in turn")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    sets = dict(kv.split("=", 1) for kv in args.set)
    sets = {k: _value(v) for k, v in sets.items()}
    sets.setdefault("limit_train", 4000)
    sets.setdefault("limit_test", 16)
    if args.command == "classifier":
        sets.setdefault("robust_check", 0)  # the per-epoch check is not part of the step
    figures: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for precision in args.precisions.split(","):
            with tempfile.TemporaryDirectory() as out:
                cfg = config(
                    args.command, args.data, out, sets | {"precision": precision, "max_steps": args.steps}
                )
                figures.setdefault(precision, []).append(measure(args.command, cfg, args.threads))
    first = statistics.median(next(iter(figures.values())))
    for precision, values in figures.items():
        med = statistics.median(values)
        print(
            f"{args.command:10s} {precision}: {med:7.1f} img/s  (runs {', '.join(f'{v:.0f}' for v in values)})"
            f"  x{med / first:.2f} of {next(iter(figures))}"
        )
    print(
        json.dumps(
            {
                "command": args.command,
                "set": sets,
                "threads": args.threads,
                "img_per_s": {k: statistics.median(v) for k, v in figures.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
