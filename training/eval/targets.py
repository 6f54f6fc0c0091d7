"""What ``atop eval`` attacks: the deployed pipeline or one of its baselines, behind one interface.

A ``Target`` is either deterministic (``pipeline is None``: the bare classifier, undefended or
adversarially trained) or randomized: ``pipeline(x, noise, masks) -> logits`` is deterministic
given one draw of the random transform, and ``stochastic(gen)`` returns the callable an attacker
sees (fresh randomness from ``gen`` on every call, exact gradients end to end).

Sources:

* checkpoints: ``--classifier`` alone (undefended or AT), ``--defense rt`` (RT only: the
  classifier sees the noisy image with holes), or ``--purifier`` (RT + purifier: AP for a
  pre-trained purifier, AToP for a fine-tuned one);
* a model-store version: the exported TorchScript ``model.pt`` after ``verify`` (every sha256
  checked), attacked through its differentiable ``forward_with(x, noise, masks)`` with our own
  draws from the manifest's RT spec, i.e. the deployed weights and graph, not a re-build.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from training.checkpoint import quiet_jit
from training.purifier import StochasticPipeline
from training.transforms import RTSpec, apply_rt

DEFENSES = ("auto", "none", "rt", "full")


class RTOnlyPipeline(nn.Module):
    """f(t(x)) without a purifier: the classifier sees the noisy image with the holes zeroed.
    RT3 uses its first copy (one of the num_masks partitions missing)."""

    def __init__(self, classifier: nn.Module, spec: RTSpec):
        super().__init__()
        self.classifier = classifier
        self.spec = spec
        self.noise_std = spec.applied_noise_std

    def forward(self, x: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.classifier(apply_rt(x, noise, masks[:, :1], self.noise_std)[:, 0, :3])


class StorePipeline(nn.Module):
    """A store version's TorchScript pipeline as ``(x, noise, masks) -> logits``."""

    def __init__(self, scripted: nn.Module, spec: RTSpec):
        super().__init__()
        self.scripted = scripted
        self.spec = spec

    def forward(self, x: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.scripted.forward_with(x, noise, masks)


class ScriptedRaw(nn.Module):
    """The store version's bare classifier f(x) (its ``raw_logits`` method)."""

    def __init__(self, scripted: nn.Module):
        super().__init__()
        self.scripted = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scripted.raw_logits(x)


@dataclass
class Target:
    role: str  # undefended | at | rt-only | ap | atop | pipeline
    classifier: nn.Module  # the bare classifier f, [0,1] in, logits out
    pipeline: nn.Module | None = None  # (x, noise, masks) -> logits; None: deterministic
    spec: RTSpec | None = None
    adversarially_trained: bool = False
    source: dict = field(default_factory=dict)
    classes: tuple[str, ...] = ()  # its output names, when known: the test split is read in this order
    image_size: int = 32  # the test images are brought to this size (the service's rule)

    @property
    def randomized(self) -> bool:
        return self.pipeline is not None

    @property
    def description(self) -> str:
        return {
            "undefended": "undefended classifier f(x)",
            "at": "adversarially trained classifier f(x), no purification",
            "rt-only": "random transform only: f(t(x)), no purifier",
            "ap": "RT + pre-trained purifier (AP): f(g(t(x)))",
            "atop": "RT + fine-tuned purifier (AToP): f(g(t(x)))",
        }.get(self.role, "RT + purifier: f(g(t(x)))")

    def stochastic(self, gen: torch.Generator | None) -> nn.Module:
        """The model as an attacker sees it: fresh randomness from ``gen`` on every call."""
        return StochasticPipeline(self.pipeline, gen) if self.pipeline is not None else self.classifier

    def to(self, device: str) -> Target:
        """Move the models (not the samplers: draws are made on the CPU and moved). On the CPU
        their weights go channels_last, and the convolutions follow: an fp32 gradient step of
        the attacks costs 1.2x (AToP over the AT f) to 1.3x (v6's pipeline) less than in NCHW
        (measured on 2 Zen 4 cores, batch 64); the numbers agree to float rounding."""
        layout = {"memory_format": torch.channels_last} if torch.device(device).type == "cpu" else {}
        self.classifier.to(device, **layout)
        if self.pipeline is not None:
            self.pipeline.to(device, **layout)
        return self

    def bare(self) -> Target:
        """The same classifier with no defense (for the 'undefended falls to ~0%' check)."""
        role = "at" if self.adversarially_trained else "undefended"
        return Target(
            role,
            self.classifier,
            adversarially_trained=self.adversarially_trained,
            classes=self.classes,
            image_size=self.image_size,
        )


def _frozen(m: nn.Module) -> nn.Module:
    for p in m.parameters():  # (ScriptModules have no requires_grad_)
        p.requires_grad_(False)
    return m.eval()


def adversarially_trained(train: dict) -> bool:
    """Whether a classifier's recorded training config (a checkpoint's ``train`` block, or the
    manifest's ``provenance.recipe.classifier.config.train``) is adversarial training. A
    combination (``atop train ensemble``, a soup) records its members' configs under
    ``members``: it counts as adversarially trained when every member was."""
    members = train.get("members")
    if members:
        return all(adversarially_trained(m.get("train") or {}) for m in members)
    return train.get("adversarial") in ("fgsm", "pgd")


def _role_from_purifier(stage: str | None) -> str:
    return {"finetune": "atop", "pretrain": "ap"}.get(stage or "", "pipeline")


def from_checkpoints(
    classifier: str,
    purifier: str = "",
    defense: str = "auto",
    spec: RTSpec | None = None,
    noise_std: float | None = None,
) -> Target:
    """A target from training checkpoints (each read once). ``spec`` overrides the purifier's
    deployed RT spec (and is required for ``defense='rt'`` without a purifier); ``noise_std``
    overrides only the purifier spec's σ."""
    from model_store import sha256_file
    from training.checkpoint import load_checkpoint
    from training.classifier import load_classifier
    from training.purifier import DefendedPipeline, load_purifier

    defense = ("full" if purifier else "none") if defense == "auto" else defense
    if Path(classifier).is_dir():
        f, train, source = _classifier_from_store_folder(Path(classifier))
    else:
        clf_ck = load_checkpoint(classifier)
        f = load_classifier(clf_ck)
        train = clf_ck.config.get("train", {})
        source = {
            "classifier": str(Path(classifier).resolve()),
            "classifier_sha256": sha256_file(Path(classifier)),
        }
    f = _frozen(f)
    known = {"classes": tuple(f.cfg.classes), "image_size": f.cfg.image_size}
    at = adversarially_trained(train)
    saved = stage = None
    if purifier:
        pur_ck = load_checkpoint(purifier)
        g, saved = load_purifier(pur_ck)
        stage = pur_ck.config.get("stage")
        if noise_std is not None:
            saved = dataclasses.replace(saved, noise_std=noise_std)
        source |= {"purifier": str(Path(purifier).resolve()), "purifier_sha256": sha256_file(Path(purifier))}
    rt = spec or saved
    if defense == "none":
        return Target("at" if at else "undefended", f, adversarially_trained=at, source=source, **known)
    if rt is None:
        raise ValueError("--defense rt needs an RT spec: pass --purifier (its deployed RT) or --rt")
    if defense == "rt":
        return Target("rt-only", f, _frozen(RTOnlyPipeline(f, rt)), rt, at, source, **known)
    if not purifier:
        raise ValueError("--defense full needs --purifier")
    pipe = _frozen(DefendedPipeline(g, f, rt))
    return Target(_role_from_purifier(stage), f, pipe, rt, at, source, **known)


def _classifier_from_store_folder(folder: Path) -> tuple[nn.Module, dict, dict]:
    """The classifier f of a model-store version folder given as ``--classifier`` (its weights
    from the verified TorchScript file), its training config, and its source. The source names
    the training checkpoint the version was exported from (the sha256 its manifest records): the
    version holds that checkpoint's weights (export checks the parity), so an evaluation begun on
    the checkpoint resumes on the folder, on a machine that never had the checkpoint."""
    from model_store import verify
    from training.classifier import classifier_from_store

    manifest = verify(folder)  # every file's sha256, before anything is read
    recipe = (manifest.get("provenance", {}).get("recipe") or {}).get("classifier") or {}
    if not recipe.get("sha256"):
        raise ValueError(f"{folder}: the manifest does not record the classifier checkpoint's sha256")
    f = classifier_from_store(folder, manifest)
    source = {
        "classifier": str(folder.resolve()),
        "classifier_sha256": recipe["sha256"],
        "classifier_store_manifest_sha256": manifest.get("manifest_sha256", ""),
    }
    return f, recipe.get("config", {}).get("train", {}), source


def from_store(root: str, name: str, version: int | None, defense: str = "auto") -> Target:
    """A target from a store version's TorchScript file (verified first)."""
    from model_store import get_version, verify

    mv = get_version(Path(root), name, version or None)
    manifest = verify(mv.path)
    ts = manifest["graph"].get("torchscript")
    if ts is None:
        raise ValueError(
            f"{mv.path}: this version has no TorchScript file, so it cannot be attacked with exact "
            "gradients; re-export with --formats onnx,torchscript or evaluate its checkpoints"
        )
    with quiet_jit():
        scripted = _frozen(torch.jit.load(str(mv.path / ts["file"]), map_location="cpu"))
    spec = RTSpec.from_dict({k: v for k, v in manifest["rt"].items() if k != "sampler"})
    recipe = manifest["provenance"].get("recipe", {})
    train = recipe.get("classifier", {}).get("config", {}).get("train", {})
    at = adversarially_trained(train)
    front = recipe.get("purifier") is not None  # None: exported with --purifier none (f alone)
    stage = (recipe.get("purifier") or {}).get("config", {}).get("stage")
    source = {
        "store": str(Path(root).resolve()),
        "model": mv.name,
        "version": mv.version,
        "manifest_sha256": manifest["manifest_sha256"],
        "file": ts["file"],
        "file_sha256": manifest["files"][ts["file"]]["sha256"],
    }
    f = ScriptedRaw(scripted)
    known = {"classes": tuple(manifest.get("classes") or ()), "image_size": spec.image_size}
    defense = ("full" if front else "none") if defense == "auto" else defense
    if not front and defense != "none":
        raise ValueError(f"{mv.path}: exported without a purifier (the classifier alone); use --defense none")
    if defense == "none":
        return Target("at" if at else "undefended", f, adversarially_trained=at, source=source, **known)
    if defense == "rt":
        return Target("rt-only", f, RTOnlyPipeline(scripted.classifier, spec), spec, at, source, **known)
    return Target(_role_from_purifier(stage), f, StorePipeline(scripted, spec), spec, at, source, **known)
