"""``atop train ensemble``: combine trained classifier checkpoints into one classifier.

No training happens. Two ways to combine:

* an ensemble (default): the members' weights are copied into one checkpoint whose model config
  is ``arch="ensemble"`` (optionally with ``flip_tta``); its output is the log of the mean of
  the members' softmax probabilities, and it costs one forward pass per member;
* ``--soup``: one network whose every float tensor (weights and BatchNorm statistics) is the
  mean of the members' (a uniform "model soup", Wortsman et al. 2022). It costs one forward
  pass, whatever the number of members, and it only makes sense for members of one
  architecture fine-tuned from one parent (e.g. two warm restarts of the same network), whose
  weights lie in one basin; members of another architecture are refused.

Either way every later step — the purifier fine-tune, export, evaluation, the service — treats
the result as the classifier f. With ``--data`` its top-1 is measured on the test split and
stored with the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from model_store import sha256_file
from training.checkpoint import load_checkpoint, run_config, save_checkpoint
from training.classifier import ClassifierConfig, build_classifier, classifier_config, load_classifier
from training.data import load_split
from training.metrics import accuracy

log = logging.getLogger("atop.train.ensemble")


def combine(
    members: list[str], *, flip_tta: bool = False, soup: bool = False
) -> tuple[torch.nn.Module, dict]:
    """The combined classifier (eval mode) and its provenance, from member checkpoint paths."""
    if not members:
        raise ValueError("an ensemble needs at least one --member checkpoint")
    cfgs, states, sources = [], [], []
    for path in members:
        member, state, source = _member(path)
        if member.arch == "ensemble" or member.flip_tta:
            raise ValueError(f"{path}: members must be plain networks (no nested ensemble or flip_tta)")
        cfgs.append(member)
        states.append(state)
        sources.append(source)
    # The config refuses members that disagree on the number of classes; names and input size
    # are checked here, where the members' paths are known.
    named = [(c.classes, c.image_size, p) for c, p in zip(cfgs, members, strict=True) if c.classes]
    for names, size, path in named[1:]:
        if (names, size) != named[0][:2]:
            raise ValueError(
                f"{path}: its classes ({', '.join(names)}) or input size {size} differ from"
                f" {named[0][2]}'s ({', '.join(named[0][0])}, {named[0][1]} px); members must agree"
            )
    if soup:
        if flip_tta:
            raise ValueError("--soup averages weights into one network; it does not take --flip-tta")
        return _soup(cfgs, states, members), {
            "members": sources,
            "soup": True,
            "seed": sources[0]["train"].get("seed"),
        }
    cfg = ClassifierConfig(
        arch="ensemble",
        flip_tta=flip_tta,
        members=tuple(cfgs),
        num_classes=cfgs[0].num_classes,
        classes=named[0][0] if named else (),
        image_size=cfgs[0].image_size,
    )
    model = build_classifier(cfg)  # the members' networks are built once, here
    ens = model.net if flip_tta else model
    for net, state in zip(ens.members, states, strict=True):
        net.load_state_dict(state)
    return model.eval(), {"members": sources, "flip_tta": flip_tta, "seed": sources[0]["train"].get("seed")}


def _member(path: str) -> tuple[ClassifierConfig, dict, dict]:
    """A member's config, weights and provenance, from a training checkpoint or from a published
    model-store version folder (its f, rebuilt from the manifest and the TorchScript file), so a
    combination can be rebuilt from published versions alone."""
    if Path(path).is_dir():
        model = load_classifier(path)  # verifies the version's checksums first
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        recipe = (manifest.get("provenance", {}).get("recipe") or {}).get("classifier") or {}
        train = (recipe.get("config") or {}).get("train", {})
        source = {"path": str(path), "manifest_sha256": manifest.get("manifest_sha256"), "train": train}
        return model.cfg, model.state_dict(), source
    ck = load_checkpoint(path)
    source = {
        "path": str(path),
        "sha256": sha256_file(Path(path)),
        "step": ck.header.get("step"),
        "test_acc": (ck.header.get("metrics") or {}).get("test_acc"),
        "train": ck.config.get("train", {}),
    }
    return classifier_config(ck), ck.state_dict("classifier"), source


def _soup(cfgs: list[ClassifierConfig], states: list[dict], paths: list[str]) -> torch.nn.Module:
    """One network of the members' architecture with the mean of their float tensors; integer
    buffers (BatchNorm's step counters) are the first member's."""
    first = cfgs[0].to_dict()  # one config builds one set of tensor names and shapes
    for cfg, path in zip(cfgs[1:], paths[1:], strict=True):
        if cfg.to_dict() != first:
            raise ValueError(f"{path}: another architecture than {paths[0]}'s; a soup needs one architecture")
    mean = {
        k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    model = build_classifier(cfgs[0])
    model.load_state_dict(mean)
    return model.eval()


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, provenance = combine(args.member, flip_tta=args.flip_tta, soup=args.soup)
    metrics = {}
    if args.data:
        test = load_split(
            args.data, "test", size=model.cfg.image_size, classes=tuple(model.cfg.classes) or None
        )
        metrics["test_acc"] = accuracy(model, test)["acc"]
        log.info(
            "%s of %d, flip_tta=%s: test top-1 %.4f",
            "soup" if args.soup else "ensemble",
            len(args.member),
            args.flip_tta,
            metrics["test_acc"],
        )
    out = Path(args.out)
    path = save_checkpoint(
        out / "final.safetensors",
        models={"classifier": model},
        config=run_config("classifier", train=provenance, model=model.cfg.to_dict()),
        step=0,
        epoch=0,
        metrics=metrics or None,
    )
    log.info("wrote %s", path)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--member",
        action="append",
        required=True,
        help="a classifier checkpoint, or a published model-store version folder whose f to take"
        " (repeat for each member)",
    )
    p.add_argument("--out", required=True, help="run folder: final.safetensors is written there")
    p.add_argument(
        "--flip-tta", action="store_true", help="also average over the mirrored image, inside the model"
    )
    p.add_argument(
        "--soup",
        action="store_true",
        help="average the members' weights into one network instead (one forward pass; members must"
        " share one architecture, e.g. warm restarts of one network)",
    )
    p.add_argument(
        "--data", default="", help="measure the combined model's top-1 on this data set's test split"
    )
