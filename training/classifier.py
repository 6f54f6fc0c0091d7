"""The frozen classifier f: a CIFAR ResNet, input float NCHW in [0,1], logits out.

Normalisation lives inside the model so every caller (training, attacks, export, the service)
feeds raw [0,1] images. ``depth`` is the number of residual blocks per stage and ``width`` the
channels of the first stage (stages use width, 2*width, 4*width): depth=3, width=16 is He et
al.'s ResNet-20.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ClassifierConfig:
    depth: int = 3  # residual blocks per stage
    width: int = 16  # channels of the first stage
    num_classes: int = 10
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def __post_init__(self) -> None:
        assert self.depth >= 1 and self.width >= 4 and self.num_classes >= 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
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


class ResNet(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = w
        for stage, cout in enumerate((w, 2 * w, 4 * w)):
            for i in range(cfg.depth):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero the last BN of each block so every block starts as the identity.
        for m in self.blocks:
            nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_classifier(cfg: ClassifierConfig) -> ResNet:
    return ResNet(cfg)


def load_classifier(src) -> ResNet:
    """The classifier from a checkpoint written by ``atop train classifier`` (a path, or a
    Checkpoint already read), in eval mode."""
    from training.checkpoint import Checkpoint, load_checkpoint

    ck = src if isinstance(src, Checkpoint) else load_checkpoint(src)
    if ck.config.get("kind") != "classifier":
        raise ValueError(f"{ck.path}: not a classifier checkpoint (kind={ck.config.get('kind')!r})")
    model = ResNet(ClassifierConfig.from_dict(ck.config["model"]))
    model.load_state_dict(ck.state_dict("classifier"))
    return model.eval()
