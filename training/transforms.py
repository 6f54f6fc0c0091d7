"""Random transforms RT1/RT2/RT3 (AToP, Lin et al. 2024), split into sampling and applying.

``sample_rt(spec, batch, gen)`` draws the randomness as explicit tensors (Gaussian noise and
binary masks); ``apply_rt`` / ``Purified.forward`` consume them and are differentiable with
respect to the image. Keeping the two apart is what makes seeded requests reproducible, lets the
ONNX graph take its randomness as inputs, and lets EOT attacks draw fresh samples every pass.

* RT1: a grid of ``block``×``block`` squares; a fraction ``missing`` of them (exactly
  round(missing·#blocks)) is removed (set to 0), and the purifier sees the mask.
* RT2: Gaussian noise of std ``noise_std`` per native pixel, clipped to [0,1], then RT1's mask.
* RT3: RT2's noise, then ``num_masks`` masks that partition the blocks: every pixel is missing
  in exactly one copy. Each copy is inpainted and each pixel is taken from the copy in which it
  was missing, so no input pixel reaches the classifier unpurified.

Masks are 1 where a pixel is *missing*.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class RTSpec:
    kind: str = "rt2"  # rt1 | rt2 | rt3
    noise_std: float = 0.0625  # per native pixel, images in [0,1] (RT2/RT3)
    block: int = 4  # side of a square block, native pixels
    missing: float = 0.25  # fraction of blocks removed (RT1/RT2); RT3 uses 1/num_masks
    num_masks: int = 4  # RT3 only
    image_size: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("rt1", "rt2", "rt3"):
            raise ValueError(f"RT kind must be rt1, rt2 or rt3, not {self.kind!r}")
        if self.image_size % self.block:
            raise ValueError(f"block {self.block} must divide image size {self.image_size}")
        if not 0.0 <= self.missing < 1.0:
            raise ValueError(f"missing fraction must be in [0,1), not {self.missing}")
        if self.noise_std < 0:
            raise ValueError("noise_std must be >= 0")
        if self.kind == "rt3" and self.blocks % self.num_masks:
            raise ValueError(f"{self.num_masks} masks must divide {self.blocks} blocks evenly")

    @property
    def blocks(self) -> int:
        return (self.image_size // self.block) ** 2

    @property
    def copies(self) -> int:
        """Purifier passes per image: 1 for RT1/RT2, num_masks for RT3."""
        return self.num_masks if self.kind == "rt3" else 1

    @property
    def applied_noise_std(self) -> float:
        """The σ actually applied: RT1 has no noise whatever ``noise_std`` says."""
        return 0.0 if self.kind == "rt1" else float(self.noise_std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RTSpec:
        return cls(**d)


@dataclass(frozen=True)
class RTSample:
    """One draw of the randomness: noise [B,3,H,W] (unit std) and masks [B,C,1,H,W]."""

    noise: torch.Tensor
    masks: torch.Tensor


def block_masks(
    spec: RTSpec, batch: int, gen: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Masks [B, copies, 1, H, W] with 1 = missing, built from a random permutation of blocks."""
    g = spec.image_size // spec.block
    ranks = torch.rand(batch, spec.blocks, generator=gen).argsort(1).argsort(1)
    if spec.kind == "rt3":
        group = ranks % spec.num_masks  # every block in exactly one group
        m = (group[:, None, :] == torch.arange(spec.num_masks)[None, :, None]).float()
    else:
        k = round(spec.missing * spec.blocks)
        m = (ranks < k).float()[:, None, :]
    m = m.view(batch, spec.copies, 1, g, g)
    m = m.repeat_interleave(spec.block, 3).repeat_interleave(spec.block, 4)
    return m.to(device)


def sample_rt(
    spec: RTSpec, batch: int, gen: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> RTSample:
    s = spec.image_size
    noise = torch.randn(batch, 3, s, s, generator=gen).to(device)
    return RTSample(noise=noise, masks=block_masks(spec, batch, gen, device))


def apply_rt(x: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor, noise_std: float) -> torch.Tensor:
    """The purifier's inputs: [B, copies, 4, H, W] = (noisy image with holes, mask)."""
    xn = (x + noise_std * noise).clamp(0.0, 1.0) if noise_std > 0 else x
    holes = xn[:, None] * (1.0 - masks)
    return torch.cat([holes, masks], dim=2)


def combine_copies(restored: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Merge purifier outputs [B,C,3,H,W]: RT3 takes each pixel from the copy where it was
    missing; RT1/RT2 (one copy) just return it."""
    if restored.shape[1] == 1:
        return restored[:, 0]
    return (restored * masks).sum(1)
