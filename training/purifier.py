"""The purifier g (an inpainting UNet), its PatchGAN discriminator, and the defended pipeline.

g takes the random transform's output: the noisy image with holes and the hole mask (4
channels) and returns a whole image in [0,1]; it both fills the holes and denoises the rest.
It predicts a residual on top of the input (holes pre-filled with mid-grey), clamped to [0,1].
``width=32`` (~0.6M parameters) is sized for CPU serving; ``width=64`` is the GPU variant.

``DefendedPipeline`` is the deployed unit f(g(t(x))): given the image and one draw of the RT's
randomness it is deterministic and differentiable end to end, which is what the ONNX export,
the parity tests and the white-box attacks all need. ``StochasticPipeline`` draws that
randomness itself, from a ``torch.Generator``, on every call (EOT attacks, evaluation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from training.transforms import RTSpec, apply_rt, combine_copies, sample_rt


@dataclass(frozen=True)
class PurifierConfig:
    width: int = 32  # channels at full resolution; 2x and 4x at 1/2 and 1/4

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PurifierConfig:
        return cls(**d)


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)
    )


class UNetPurifier(nn.Module):
    """Three-level UNet; dilated convolutions at 1/4 resolution give the context to fill holes."""

    def __init__(self, cfg: PurifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.enc0 = nn.Sequential(_conv(4, w), _conv(w, w))
        self.enc1 = nn.Sequential(_conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w))
        self.mid = nn.Sequential(
            _conv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w, dilation=2), _conv(4 * w, 4 * w, dilation=4)
        )
        self.up1 = _conv(4 * w, 2 * w)
        self.dec1 = _conv(4 * w, 2 * w)
        self.up0 = _conv(2 * w, w)
        self.dec0 = _conv(2 * w, w)
        self.head = nn.Conv2d(w, 3, 3, padding=1)
        # Residual output, zero-initialised: training starts from the identity on kept pixels
        # and mid-grey in the holes, instead of learning the identity through ten layers.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        base = inp[:, :3] + 0.5 * inp[:, 3:4]  # holes filled with mid-grey
        e0 = self.enc0(inp)
        e1 = self.enc1(e0)
        m = self.mid(e1)
        d1 = self.dec1(torch.cat([self.up1(F.interpolate(m, scale_factor=2.0, mode="nearest")), e1], 1))
        d0 = self.dec0(torch.cat([self.up0(F.interpolate(d1, scale_factor=2.0, mode="nearest")), e0], 1))
        return (base + self.head(d0)).clamp(0.0, 1.0)


class PatchDiscriminator(nn.Module):
    """SN-PatchGAN: spectrally normalised convs, one realness score per 8x8 patch grid cell."""

    def __init__(self, width: int = 64):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(3, w, 4, 2, 1)),
            nn.LeakyReLU(0.2, inplace=True),
            spectral_norm(nn.Conv2d(w, 2 * w, 4, 2, 1)),
            nn.LeakyReLU(0.2, inplace=True),
            spectral_norm(nn.Conv2d(2 * w, 4 * w, 3, 1, 1)),
            nn.LeakyReLU(0.2, inplace=True),
            spectral_norm(nn.Conv2d(4 * w, 1, 3, 1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def purify(
    purifier: nn.Module, x: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor, noise_std: float
) -> torch.Tensor:
    """g(t(x)) for one draw (noise, masks): every copy is inpainted in one batched pass."""
    inp = apply_rt(x, noise, masks, noise_std)  # [B, C, 4, H, W]
    b, c = inp.shape[:2]
    restored = purifier(inp.flatten(0, 1)).view(b, c, *x.shape[1:])
    return combine_copies(restored, masks)


class DefendedPipeline(nn.Module):
    """f(g(t(x))) with the randomness as explicit inputs. Also returns nothing else: logits."""

    def __init__(self, purifier: nn.Module, classifier: nn.Module, spec: RTSpec):
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier
        self.spec = spec
        self.noise_std = spec.applied_noise_std

    def forward(self, x: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.classifier(purify(self.purifier, x, noise, masks, self.noise_std))


class StochasticPipeline(nn.Module):
    """The defense as an attacker sees it: x -> logits, fresh randomness on every call."""

    def __init__(self, pipeline: DefendedPipeline, gen: torch.Generator | None = None):
        super().__init__()
        self.pipeline = pipeline
        self.gen = gen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = sample_rt(self.pipeline.spec, x.shape[0], self.gen, x.device)
        return self.pipeline(x, s.noise, s.masks)


class NoPurifier(nn.Module):
    """No purifier: returns the image channels of its input. With ``IDENTITY_RT`` (RT1, no block
    missing, no noise) the pipeline f(g(t(x))) is exactly f(x): how a classifier that defends
    on its own (the adversarially trained baseline) is exported and served through the same graph
    and contract as AToP (``atop export --purifier none``)."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return inp[:, :3]


IDENTITY_RT = RTSpec(kind="rt1", noise_std=0.0, missing=0.0)


def load_purifier(src) -> tuple[UNetPurifier, RTSpec]:
    """The purifier and its deployed RT spec from a purifier/fine-tune checkpoint (a path, or a
    Checkpoint already read), eval mode."""
    from training.checkpoint import Checkpoint, load_checkpoint, model_config

    ck = src if isinstance(src, Checkpoint) else load_checkpoint(src)
    model = UNetPurifier(PurifierConfig.from_dict(model_config(ck.config, "purifier", ck.path)))
    model.load_state_dict(ck.state_dict("purifier"))
    return model.eval(), RTSpec.from_dict(ck.config["rt"])


@torch.no_grad()
def pass_through(
    purifier: nn.Module,
    spec: RTSpec,
    split,
    *,
    eps: float = 8 / 255,
    images: int = 256,
    seed: int = 4321,
    batch_size: int = 128,
) -> dict[str, float]:
    """Does g remove a small perturbation or copy it through? (DESIGN: "A purifier that copies
    its input does not defend".) On the first ``images`` of ``split``, with a random ±``eps``
    sign perturbation d and the *same* RT draw for x and x + d, over the pixels the RT kept:

    * ``denoise_err_in``: mean |t(x) - x| (the noise the purifier is given);
    * ``denoise_err_out``: mean |g(t(x)) - x| (what is left after purifying);
    * ``pass_through``: mean over images of <g(t(x+d)) - g(t(x)), d> / <d, d>; 1 = d goes
      straight through (the identity), 0 = d is removed (e.g. a constant output).

    Per purifier pass, before RT3 merges its copies (RT3 keeps no input pixel in the merged
    image; its copies each see three quarters of it). fp32, seeded: comparable across epochs.
    """
    from training.data import batches

    gen = torch.Generator().manual_seed(seed)
    param = next(purifier.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    err_in = err_out = ratio = kept = 0.0
    n = 0
    with torch.autocast(device.type, enabled=False):
        for x, _ in batches(split, batch_size):
            if n >= images:
                break
            x = x[: images - n].to(device)
            d = (torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1).to(device) * eps
            d = (x + d).clamp(0.0, 1.0) - x  # the perturbation that an image in [0,1] can carry
            s = sample_rt(spec, x.shape[0], gen, device)
            inp = apply_rt(
                torch.cat([x, x + d]),
                s.noise.repeat(2, 1, 1, 1),
                s.masks.repeat(2, 1, 1, 1, 1),
                spec.applied_noise_std,
            )  # [2B, C, 4, H, W]
            out = purifier(inp.flatten(0, 1)).view(*inp.shape[:2], *x.shape[1:])
            keep = 1.0 - s.masks  # [B, C, 1, H, W]
            clean, moved = out[: x.shape[0]], out[x.shape[0] :] - out[: x.shape[0]]
            err_in += float(((inp[: x.shape[0], :, :3] - x[:, None]).abs() * keep).sum())
            err_out += float(((clean - x[:, None]).abs() * keep).sum())
            kept += float(keep.sum()) * x.shape[1]
            dd = d[:, None] * keep
            num = (moved * dd).flatten(1).sum(1)
            ratio += float((num / (dd * dd).flatten(1).sum(1).clamp_min(1e-12)).sum())
            n += x.shape[0]
    return {"denoise_err_in": err_in / kept, "denoise_err_out": err_out / kept, "pass_through": ratio / n}
