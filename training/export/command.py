"""``atop export``: classifier + purifier checkpoints -> a verified model-store version.

``run`` loads the checkpoints into one defended pipeline, converts it (convert.py: ONNX,
TorchScript, parity against eager torch), describes it (manifest.py) and publishes the files
and the manifest as the next version of the store, atomically (model_store.publish).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from model_store import ModelVersion, default_store, publish
from training.checkpoint import load_checkpoint
from training.classifier import load_classifier
from training.data import CIFAR10_CLASSES
from training.export.convert import check_parity, export_onnx, export_torchscript
from training.export.manifest import (
    NO_PURIFIER,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    build_manifest,
    graph_block,
    load_evaluation,
    provenance,
)
from training.purifier import IDENTITY_RT, DefendedPipeline, NoPurifier, load_purifier

log = logging.getLogger("atop.export")
FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class ExportConfig:
    classifier: str
    purifier: str
    store: str
    name: str = "cifar10-atop"
    rt: str | None = None  # override the purifier's deployed RT kind
    noise_std: float | None = None  # override its noise std
    formats: tuple[str, ...] = FORMATS
    data: str | None = None  # recorded in provenance with its checksum
    evaluation: str | None = None  # JSON file of measured numbers for the manifest
    samples: int = 1  # serving.samples: RT draws averaged per answer when a request does not say
    classes: tuple[str, ...] | None = None  # renames; default: the names the classifier was trained on
    opset: int = 18
    parity_seed: int = 0
    tolerance: float = 1e-4


def run(cfg: ExportConfig) -> ModelVersion:
    if "onnx" not in cfg.formats or not set(cfg.formats) <= set(FORMATS):
        raise ValueError(f"--formats must include onnx (the serving format) and be among {FORMATS}")
    if cfg.samples < 1:
        raise ValueError(f"--samples {cfg.samples}: must be at least 1")
    evaluation = load_evaluation(cfg.evaluation)
    measured = (evaluation.get("scoring") or {}).get("samples")
    if measured is not None and measured != cfg.samples:
        log.warning(
            "--evaluation's vote figures were measured with samples=%d, but the version will answer "
            "with %d by default (--samples)",
            measured,
            cfg.samples,
        )
    classifier = load_classifier(cfg.classifier)
    size = classifier.cfg.image_size
    if cfg.purifier == NO_PURIFIER:
        if cfg.rt or cfg.noise_std is not None:
            raise ValueError(
                "--purifier none exports the classifier alone; --rt and --noise-std do not apply"
            )
        purifier, spec = NoPurifier(), dataclasses.replace(IDENTITY_RT, image_size=size)
    else:
        ck = load_checkpoint(cfg.purifier)
        purifier, spec = load_purifier(ck)
        if spec.image_size != size:
            raise ValueError(
                f"{cfg.purifier} works on {spec.image_size}-px images, {cfg.classifier} on {size}-px ones"
            )
        trained_on = tuple(ck.config.get("classes") or ())
        if trained_on and classifier.cfg.classes and trained_on != classifier.cfg.classes:
            raise ValueError(
                f"{cfg.purifier} was trained beside classes {', '.join(trained_on)}, {cfg.classifier}"
                f" answers {', '.join(classifier.cfg.classes)}: not one pipeline"
            )
    overrides = {k: v for k, v in (("kind", cfg.rt), ("noise_std", cfg.noise_std)) if v is not None}
    spec = dataclasses.replace(spec, **overrides)
    pipeline = DefendedPipeline(purifier, classifier, spec).eval()
    pipeline.requires_grad_(False)
    classes = export_classes(cfg.classes, classifier.cfg, cfg.classifier)
    log.info("exporting %s with RT %s", cfg.name, spec)
    with tempfile.TemporaryDirectory(prefix="atop-export-") as tmp:
        files = {ONNX_FILE: Path(tmp) / ONNX_FILE}
        export_onnx(pipeline, files[ONNX_FILE], cfg.opset)
        if "torchscript" in cfg.formats:
            files[TORCHSCRIPT_FILE] = Path(tmp) / TORCHSCRIPT_FILE
            export_torchscript(pipeline, files[TORCHSCRIPT_FILE])
        parity = check_parity(pipeline, files, cfg.parity_seed, cfg.tolerance)
        front = cfg.purifier != NO_PURIFIER
        manifest = build_manifest(
            spec,
            classes,
            graph=graph_block(
                spec,
                cfg.opset,
                len(classes),
                front=front,
                torchscript="torchscript" in cfg.formats,
                parity=parity,
            ),
            provenance=provenance(cfg.classifier, cfg.purifier if front else None, cfg.data, cfg.parity_seed),
            evaluation=evaluation,
            samples=cfg.samples,
        )
        return publish(Path(cfg.store), cfg.name, files, manifest)


def export_classes(renamed: tuple[str, ...] | None, model, where: str) -> list[str]:
    """The manifest's class names: the ones the classifier was trained on (its data's folder
    names, recorded in the checkpoint), or ``renamed`` (--classes), which may rename them but
    neither change their number nor reorder them, as either would put wrong names on answers."""
    k, names = model.num_classes, tuple(model.classes)
    if renamed:
        if len(renamed) != k:
            raise ValueError(f"--classes has {len(renamed)} names; {where} answers {k} classes")
        if len(set(renamed)) != k:
            raise ValueError("--classes repeats a name; each class needs its own")
        moved = [n for i, n in enumerate(renamed) if n in names and names.index(n) != i]
        if moved:
            raise ValueError(
                f"--classes puts {', '.join(moved)} at another position than {where} was trained"
                f" with ({', '.join(names)}): answers would carry the wrong names; the order is"
                " fixed by training (leave --classes out, or rename in that order)"
            )
        if names and renamed != names:
            log.warning(
                "renaming classes: %s", ", ".join(f"{a} -> {b}" for a, b in zip(names, renamed, strict=True))
            )
        return list(renamed)
    if names:
        return list(names)
    if k == 10:
        log.warning(
            "%s records no class names (trained before they were recorded); assuming CIFAR-10's: %s",
            where,
            ", ".join(CIFAR10_CLASSES),
        )
        return list(CIFAR10_CLASSES)
    raise ValueError(f"{where} answers {k} classes and records no names; pass --classes with {k} names")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", required=True, help="classifier checkpoint (.safetensors)")
    p.add_argument(
        "--purifier",
        required=True,
        help="purifier or fine-tune checkpoint (.safetensors), or 'none': the classifier alone"
        " (a robust classifier such as the AT baseline), with the identity as RT",
    )
    p.add_argument("--store", default=None, help="store root (default: the embedded model_store)")
    p.add_argument(
        "--name",
        default=ExportConfig.name,
        help=f"model name in the store (default {ExportConfig.name}; the service serves one name)",
    )
    p.add_argument("--rt", choices=("rt1", "rt2", "rt3"), help="override the purifier's RT kind")
    p.add_argument("--noise-std", type=float, help="override the RT noise std (native pixels)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: onnx[,torchscript]")
    p.add_argument("--data", help="training data set, recorded in provenance with its checksum")
    p.add_argument("--evaluation", help="JSON file of measured accuracy for the manifest")
    p.add_argument(
        "--samples",
        type=int,
        default=ExportConfig.samples,
        help="serving.samples: RT draws the service averages per answer when a request does not "
        "set `samples` (default 1; evaluate with `atop eval --samples` the same)",
    )
    p.add_argument(
        "--classes",
        help="comma-separated class names to publish instead of those the classifier was trained on"
        " (its data's folder names, in sorted order): renames only; another count or order is"
        " refused (default: the trained names)",
    )
    p.add_argument("--opset", type=int, default=ExportConfig.opset, help="ONNX opset (>= 17)")
    p.add_argument("--parity-seed", type=int, default=ExportConfig.parity_seed)
    p.add_argument("--tolerance", type=float, default=ExportConfig.tolerance, help="parity max abs diff")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.opset < 17:
        raise ValueError(f"--opset {args.opset}: the manifest schema needs opset >= 17")
    fields = {f.name for f in dataclasses.fields(ExportConfig)}
    cfg = ExportConfig(
        **{k: v for k, v in vars(args).items() if k in fields}
        | {"store": str(args.store or default_store()), "formats": _split(args.formats)}
        | {"classes": _split(args.classes) or None}
    )
    mv = run(cfg)
    log.info("published %s version %d at %s", mv.name, mv.version, mv.path)
    return 0


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())
