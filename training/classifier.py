"""The frozen classifier f: a CIFAR residual network, input float NCHW in [0,1], logits out.

Normalisation lives inside the model so every caller (training, attacks, export, the service)
feeds raw [0,1] images. Two architectures:

* ``resnet`` — He et al.'s CIFAR ResNet. ``depth`` is the number of residual blocks per stage and
  ``width`` the channels of the first stage (stages use width, 2*width, 4*width): depth=3,
  width=16 is ResNet-20.
* ``fast`` — a shallow, wide residual net in the style of the fast CIFAR-10 training recipes
  (a 2x2 stem, then three stages of conv → 2x2 max-pool → BN → GELU followed by ``depth``
  residual conv units; stage widths width, 4*width, 4*width). Its compute sits in few, wide
  layers that vectorise well: on 2 CPU cores, width 48 trains at 599 img/s against 178 for a
  width-32 ResNet-20 (and 678 for ResNet-20 itself). The CPU recipe's run reached 87.25% in
  16 epochs (ResNet-20: 87.70% in 40).
* ``ensemble`` — trained classifiers combined (``atop train ensemble``): the output is the log of
  the mean of the members' softmax probabilities, so softmax(output) is the averaged prediction.

``flip_tta`` (any architecture) also averages over the horizontally flipped image, inside the
model: the deployed graph and every attack see it, so it is part of the classifier, not a
scoring trick. Each is differentiable end to end and exports to ONNX and TorchScript.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ClassifierConfig:
    depth: int = 3  # residual blocks (units) per stage
    width: int = 16  # channels of the first stage
    num_classes: int = 10
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    arch: str = "resnet"  # resnet | fast | ensemble
    flip_tta: bool = False  # average the prediction over the image and its mirror
    members: tuple[ClassifierConfig, ...] = ()  # ensemble only
    # The class names in output order, from the training data's folders; () in checkpoints
    # written before names were recorded (their export must then be told the names).
    classes: tuple[str, ...] = ()
    image_size: int = 32  # the side of the square images it was trained on

    def __post_init__(self) -> None:
        assert self.depth >= 1 and self.width >= 4 and self.num_classes >= 2
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for {self.num_classes} outputs")
        if (self.arch == "ensemble") != bool(self.members):
            raise ValueError("an ensemble classifier needs members, and only an ensemble has them")
        if any(m.num_classes != self.num_classes for m in self.members):
            raise ValueError("ensemble members disagree on the number of classes")
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown classifier architecture {self.arch!r} (one of {', '.join(ARCHITECTURES)})"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        d = dict(d)
        for k in ("mean", "std", "classes"):
            if k in d:
                d[k] = tuple(d[k])
        d["members"] = tuple(cls.from_dict(m) for m in d.get("members", ()))
        return cls(**d)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _Network(nn.Module):
    """What both architectures share: the config, normalisation inside the model, conv init."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def init_convs(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class ResNet(_Network):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__(cfg)
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = w
        for stage, cout in enumerate((w, 2 * w, 4 * w)):
            for i in range(cfg.depth):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, cfg.num_classes)
        self.init_convs()
        # Zero the last BN of each block so every block starts as the identity.
        for m in self.blocks:
            nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(self.normalise(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvUnit(nn.Module):
    """conv3x3 → BN → GELU, added to its input."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(ch)
        nn.init.zeros_(self.bn.weight)  # starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.bn(self.conv(x)))


class FastNet(_Network):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__(cfg)
        w = cfg.width
        stem = max(w // 2, 8)
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 2, 1, 0, bias=False), nn.BatchNorm2d(stem), nn.GELU()]
        cin = stem
        for cout in (w, 4 * w, 4 * w):
            layers += [
                nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                nn.MaxPool2d(2),
                nn.BatchNorm2d(cout),
                nn.GELU(),
            ]
            layers += [ConvUnit(cout) for _ in range(cfg.depth)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, cfg.num_classes)
        self.init_convs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalise(x))
        return self.fc(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


class Ensemble(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(build_classifier(m) for m in cfg.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([F.log_softmax(m(x), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


class FlipAveraged(nn.Module):
    """``net`` applied to x and to its mirror image; log of the mean of the two softmaxes."""

    def __init__(self, net: nn.Module, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two calls, not one on cat([x, mirror]): splitting a batch in two would pin the batch
        # axis of the exported ONNX graph.
        a, b = F.log_softmax(self.net(x), dim=1), F.log_softmax(self.net(x.flip(3)), dim=1)
        return torch.logaddexp(a, b) - math.log(2.0)


ARCHITECTURES = {"resnet": ResNet, "fast": FastNet, "ensemble": Ensemble}


def require_classes(cfg: ClassifierConfig, classes: tuple[str, ...], what: str) -> None:
    """Refuse a classifier (``what`` names it) whose outputs are not ``classes`` in this order;
    a checkpoint from before names were recorded can only be checked by the count."""
    if cfg.num_classes != len(classes) or cfg.classes not in ((), tuple(classes)):
        raise ValueError(
            f"{what} answers {', '.join(cfg.classes) or f'{cfg.num_classes} unnamed classes'};"
            f" the data's classes are {', '.join(classes)}"
        )


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    net = ARCHITECTURES[cfg.arch](replace(cfg, flip_tta=False) if cfg.flip_tta else cfg)
    return FlipAveraged(net, cfg) if cfg.flip_tta else net


def load_classifier(src) -> nn.Module:
    """The classifier from a checkpoint written by ``atop train classifier`` (a path, or a
    Checkpoint already read), or from a model-store version folder, in eval mode."""
    from pathlib import Path

    from training.checkpoint import Checkpoint, load_checkpoint

    if not isinstance(src, Checkpoint) and Path(src).is_dir():
        return classifier_from_store(Path(src))
    ck = src if isinstance(src, Checkpoint) else load_checkpoint(src)
    model = build_classifier(classifier_config(ck))
    model.load_state_dict(ck.state_dict("classifier"))
    return model.eval()


def classifier_config(ck) -> ClassifierConfig:
    """The model config of a checkpoint written by ``atop train classifier`` (or ensemble)."""
    return classifier_config_from(ck.config, ck.path)


def classifier_from_store(folder, manifest: dict | None = None) -> nn.Module:
    """The classifier f inside a published model-store version: its architecture from the
    manifest's provenance (the training checkpoint's config), its weights from the version's
    TorchScript file, after the version's checksums are verified (``manifest``: what ``verify``
    already returned for this folder, so its files are not hashed twice). So a published version
    is enough to build on (e.g. to fine-tune a purifier over its f) without keeping the training
    checkpoint's weights in the repository as well."""
    from model_store import verify
    from training.checkpoint import quiet_jit

    manifest = manifest if manifest is not None else verify(folder)
    recipe = (manifest.get("provenance", {}).get("recipe") or {}).get("classifier") or {}
    ts = (manifest.get("graph") or {}).get("torchscript")
    if "config" not in recipe or ts is None:
        raise ValueError(f"{folder}: the manifest lacks the classifier's config or a TorchScript file")
    model = build_classifier(classifier_config_from(recipe["config"], folder))
    with quiet_jit():
        scripted = torch.jit.load(str(folder / ts["file"]), map_location="cpu")
    prefix = "classifier."
    weights = {k[len(prefix) :]: v for k, v in scripted.state_dict().items() if k.startswith(prefix)}
    wanted = model.state_dict().keys()  # TorchScript also lists the non-persistent mean/std buffers
    model.load_state_dict({k: v for k, v in weights.items() if k in wanted})
    return model.eval()


def classifier_config_from(config: dict, where) -> ClassifierConfig:
    from training.checkpoint import model_config

    return ClassifierConfig.from_dict(model_config(config, "classifier", where))
