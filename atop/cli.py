"""The ``atop`` command.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``main(args)``; a
module is imported only when its subcommand is invoked, so ``atop serve`` and ``atop store``
never import torch or the training code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from atop import __version__

# (command, module, help). "train" has its own level of subcommands below.
COMMANDS = [
    ("serve", "service.cli", "run the HTTP defense service (default: the embedded model)"),
    (
        "export",
        "training.export.command",
        "export a trained pipeline to ONNX/TorchScript into the model store",
    ),
    ("store", "model_store.cli", "list, show, verify and publish model-store versions"),
    ("eval", "training.eval.command", "robustness evaluation of a store version or checkpoints"),
    ("compare", "training.eval.compare", "paired differences of two evaluations on the same images"),
]
# (command, module, help, what --resume means for it)
_RESUME = "continue the run in --out from last.safetensors"
TRAIN_COMMANDS = [
    (
        "classifier",
        "training.train.classifier",
        "standard or PGD-adversarial training of the classifier f",
        _RESUME,
    ),
    (
        "purifier",
        "training.train.purifier",
        "pre-train the inpainting purifier g (L1 + hinge GAN on RT'd images)",
        _RESUME,
    ),
    ("finetune", "training.train.finetune", "AToP: fine-tune g adversarially with f frozen", _RESUME),
    (
        "ensemble",
        "training.ensemble",
        "combine trained classifiers (and mirror averaging) into one f",
        "no effect (combining takes seconds); accepted so recipes can pass it to every stage",
    ),
]


def _call(module: str):
    return lambda args: importlib.import_module(module).main(args)


def _add(sub, name: str, module: str, help_: str, wanted: bool) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    if wanted:  # import the module (and so torch, for training) only when it is asked for
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(func=_call(module))
    return p


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = argv or []
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="atop",
        description="AToP adversarial-defense service: train, export, evaluate and serve "
        "a purification defense (random transform -> purifier -> classifier).",
    )
    parser.add_argument("--version", action="version", version=f"atop {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_ in COMMANDS:
        _add(sub, name, module, help_, first == name)
    train = sub.add_parser("train", help="offline training: classifier, purifier, AToP fine-tune, ensemble")
    tsub = train.add_subparsers(dest="what", required=True, metavar="{classifier,purifier,finetune,ensemble}")
    for name, module, help_, resume_help in TRAIN_COMMANDS:
        p = _add(tsub, name, module, help_, first == "train" and name in argv)
        p.add_argument("--resume", action="store_true", help=resume_help)
        if resume_help == _RESUME:
            p.add_argument(
                "--overwrite",
                action="store_true",
                help="--out already holds a run: delete its checkpoints and metrics and start over"
                " (without this or --resume such an --out is refused)",
            )
        p.add_argument(
            "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
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
