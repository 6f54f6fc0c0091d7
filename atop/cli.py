"""The ``atop`` command. Subcommands import their modules lazily, so ``atop serve`` and
``atop store`` never import torch or the training code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from atop import __version__


def _train_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.safetensors")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_train(sub, argv: list[str]) -> None:
    train = sub.add_parser("train", help="offline training: classifier, purifier, AToP fine-tune")
    tsub = train.add_subparsers(dest="what", required=True, metavar="{classifier,purifier,finetune}")

    def lazy(module: str) -> Callable:
        def call(args):
            import importlib

            return importlib.import_module(module).main(args)

        return call

    import importlib

    for name, module, help_ in [
        (
            "classifier",
            "training.train_classifier",
            "standard or PGD-adversarial training of the classifier f",
        ),
        (
            "purifier",
            "training.train_purifier",
            "pre-train the inpainting purifier g (L1 + hinge GAN on RT'd images)",
        ),
        ("finetune", "training.finetune", "AToP: fine-tune g adversarially with f frozen"),
    ]:
        p = tsub.add_parser(name, help=help_, description=help_)
        # Import only the module asked for: `atop serve` and `atop --help` stay free of torch.
        if "train" not in argv or name not in argv:
            continue
        importlib.import_module(module).add_arguments(p)
        _train_common(p)
        p.set_defaults(func=lazy(module))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atop",
        description="AToP adversarial-defense service: train, export, evaluate and serve "
        "a purification defense (random transform -> purifier -> classifier).",
    )
    parser.add_argument("--version", action="version", version=f"atop {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub, argv or [])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logging.getLogger("atop").warning("interrupted")
        return 130
    except (FileNotFoundError, ValueError) as e:  # user-facing errors: one line, no stack trace
        if args.verbose:
            raise
        logging.getLogger("atop").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
