"""The contract between training/export and serving. Tiny on purpose, numpy only, no torch.

The exported ONNX pipeline is deterministic: its randomness comes in as explicit inputs, which
the caller samples with ``sample_rt`` below from the RT spec in the version's manifest. That is
what makes a seeded request reproducible and lets a client that reads only the manifest drive
the graph.

Graph inputs (float32, NCHW):
  image  [B, 3, H, W]     the image in [0, 1]
  noise  [B, 3, H, W]     standard normal; the graph multiplies it by the spec's noise_std
  masks  [B, C, 1, H, W]  1 = pixel missing; C = 1 (RT1/RT2) or num_masks (RT3)
Graph outputs:
  logits      [B, K]           the defended pipeline f(g(t(x)))
  raw_logits  [B, K]           the undefended classifier f(x), for the attack-suspicion signal
  transformed [B, C, 3, H, W]  t(x), what the purifier is given: the noisy image (clipped to
                               [0, 1]) with the missing pixels set to 0, one per copy; which
                               pixels are missing is the ``masks`` input
  purified    [B, 3, H, W]     g(t(x)), what the defended classifier sees
The two image outputs are optional (``VIEW_OUTPUTS``): versions exported before they existed
have only the logits, and a reader must say what is missing rather than make them up.
"""

from __future__ import annotations

import numpy as np

MANIFEST_SCHEMA = "atop-manifest/1"
RT_SAMPLER = "atop-rt-sampler/1"
INPUT_IMAGE, INPUT_NOISE, INPUT_MASKS = "image", "noise", "masks"
OUTPUT_LOGITS, OUTPUT_RAW_LOGITS = "logits", "raw_logits"
OUTPUT_TRANSFORMED, OUTPUT_PURIFIED = "transformed", "purified"
VIEW_OUTPUTS = (OUTPUT_TRANSFORMED, OUTPUT_PURIFIED)


def view_shapes(spec: dict) -> dict[str, list]:
    """The declared shapes of the optional image outputs for an RT spec ("B" = batch)."""
    s = int(spec["image_size"])
    return {OUTPUT_TRANSFORMED: ["B", rt_copies(spec), 3, s, s], OUTPUT_PURIFIED: ["B", 3, s, s]}


def rt_copies(spec: dict) -> int:
    """Purifier passes per image (the C of the masks input)."""
    return int(spec["num_masks"]) if spec["kind"] == "rt3" else 1


def rt_is_random(spec: dict) -> bool:
    """Whether the RT draws anything: False for the identity RT (RT1/RT2 with no block missing
    and no noise), with which a classifier that defends on its own is exported. Then every draw
    is the same, and one draw is the whole answer."""
    noise = spec["kind"] != "rt1" and float(spec.get("noise_std", 0)) > 0
    return noise or spec["kind"] == "rt3" or float(spec.get("missing", 0)) > 0


def sample_masks(spec: dict, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Block masks [B, C, 1, H, W] float32, 1 = missing (same rule as training.transforms).

    RT1/RT2: exactly round(missing * #blocks) blocks are missing, chosen uniformly.
    RT3: a uniform random partition of the blocks into num_masks equal groups, one per copy.
    """
    size, block = int(spec["image_size"]), int(spec["block"])
    g = size // block
    nb = g * g
    ranks = rng.random((batch, nb)).argsort(1).argsort(1)
    if spec["kind"] == "rt3":
        n = int(spec["num_masks"])
        m = (ranks[:, None, :] % n == np.arange(n)[None, :, None]).astype(np.float32)
    else:
        k = round(float(spec["missing"]) * nb)
        m = (ranks < k).astype(np.float32)[:, None, :]
    m = m.reshape(batch, -1, 1, g, g)
    return np.ascontiguousarray(m.repeat(block, axis=3).repeat(block, axis=4))


def sample_rt(spec: dict, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One draw of the RT randomness: (noise [B,3,H,W], masks [B,C,1,H,W]), float32.

    Noise is drawn before masks; with the same seed and spec this is reproducible everywhere.
    """
    size = int(spec["image_size"])
    noise = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    return noise, sample_masks(spec, batch, rng)
