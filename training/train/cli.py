"""The command-line side the trainers share: --data and --out, one flag per config field from a
table of (field, help) (its type and default from the config), --precision, the config from the
parsed flags, and ``main``."""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch

from training.data import DATA_HELP
from training.train.step import PRECISIONS

log = logging.getLogger("atop.train")


def add_run_flags(
    p: argparse.ArgumentParser,
    defaults,
    table: list[tuple[str, str]],
    *,
    choices: dict[str, list[str]] | None = None,
    fmt: str = "",
) -> None:
    """--data, --out, then ``--field-name`` for each (field, help) of ``table``: typed and
    defaulted by the config instance ``defaults``, the default shown in the help (``fmt``: its
    format spec), ``choices`` offered where given."""
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="run folder: checkpoints and metrics.jsonl")
    for name, help_ in table:
        d = getattr(defaults, name)
        kind = {"choices": choices[name]} if name in (choices or {}) else {"type": type(d)}
        p.add_argument(f"--{name.replace('_', '-')}", default=d, help=f"{help_} (default {d:{fmt}})", **kind)


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="bf16",
        help="training-step arithmetic: bf16 autocast (~2x faster on CPUs with AVX-512 BF16 and"
        " on GPUs) or fp32; checks and evaluation attacks are always fp32 (default bf16)",
    )


def config_from_args(cls, args: argparse.Namespace, **fixed):
    """The config ``cls`` from the parsed flags (its fields of the same names), ``fixed`` on top."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**({k: v for k, v in vars(args).items() if k in names} | fixed))


def main(run, cfg, args: argparse.Namespace) -> int:
    """``atop train ...``: seed the initial weights, ``run(cfg)``, log the last epoch's metrics."""
    torch.manual_seed(cfg.seed)  # model init only; data and attacks use their own generators
    metrics = run(cfg, resume=args.resume, overwrite=args.overwrite, threads=args.threads)
    log.info("done: %s", metrics)
    return 0
