"""What a store version must satisfy before it may serve: manifest facts and a self-test.

Run in a worker thread on a freshly loaded candidate, beside the active version. Every failure is
a ``Refused`` whose message names the problem; the registry then keeps the old version serving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from atop import contract


class Refused(Exception):
    """A candidate version that must not serve, with the reason."""


@dataclass(frozen=True)
class Facts:
    """What the service needs from a manifest, validated."""

    classes: tuple[str, ...]
    image_size: int
    spec: dict
    copies: int


def manifest_facts(manifest: dict) -> Facts:
    try:
        classes = tuple(manifest["classes"])
        shape = list(manifest["input"]["shape"])
        lo, hi = manifest["input"].get("range", [0, 1])
        spec = dict(manifest["rt"])
        kind, size = spec["kind"], int(spec["image_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise Refused(f"manifest.json: missing or malformed field ({e!r})") from e
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise Refused("manifest.json: 'classes' must list at least two class names")
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
        raise Refused(f"manifest.json: input shape {shape} is not [3, S, S]")
    if (lo, hi) != (0, 1):
        raise Refused(f"manifest.json: input range [{lo}, {hi}] is not [0, 1]")
    if kind not in ("rt1", "rt2", "rt3") or size != shape[1]:
        raise Refused(f"manifest.json: RT spec {spec} does not fit input shape {shape}")
    try:
        copies = contract.rt_copies(spec)
        contract.sample_rt(spec, 1, np.random.default_rng(0))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise Refused(f"manifest.json: RT spec {spec} cannot be sampled ({e!r})") from e
    return Facts(classes, int(shape[1]), spec, copies)


def robust_accuracy(manifest: dict) -> float | None:
    """The worst measured robust accuracy in ``evaluation`` (None when not measured).

    Reads ``evaluation.robust_accuracy``: a number, or a mapping attack -> number.
    """
    value = (manifest.get("evaluation") or {}).get("robust_accuracy")
    if isinstance(value, dict):
        numbers = [v for v in value.values() if isinstance(v, int | float)]
        return min(numbers) if numbers else None
    return float(value) if isinstance(value, int | float) else None


def _check(name: str, arr: np.ndarray | None, rows: int, k: int) -> None:
    if arr is None:
        return
    if arr.shape != (rows, k):
        raise Refused(f"self-test: {name} has shape {tuple(arr.shape)}, expected ({rows}, {k})")
    if not np.isfinite(arr).all():
        raise Refused(f"self-test: {name} contains NaN or infinity")


def self_test(backend, facts: Facts, batch: int, known: dict | None = None) -> dict:
    """Warm the backend up and check it honours the contract. Returns measurements.

    1. a full batch (``batch`` rows) and a single row give finite logits of shape [B, K];
    2. the single row equals row 0 of the batch (catches batch-size-dependent graphs, e.g. a
       BatchNorm left in training mode, or rows that leak into each other);
    3. running it again gives the same answer (deterministic given the randomness);
    4. the manifest's optional ``selftest`` known answer: {"seed", "batch", "logits", "atol"},
       images ``rng.random((n, 3, S, S), float32)`` then ``sample_rt(spec, n, rng)`` from
       ``default_rng(seed)``, must reproduce ``logits``.
    """
    k, s = len(facts.classes), facts.image_size
    rng = np.random.default_rng(12345)
    image = rng.random((batch, 3, s, s), dtype=np.float32)
    noise, masks = contract.sample_rt(facts.spec, batch, rng)
    try:
        logits, raw = backend.run(image, noise, masks)
        _check("logits", logits, batch, k)
        _check("raw_logits", raw, batch, k)
        one, raw_one = backend.run(image[:1], noise[:1], masks[:1])
        again, _ = backend.run(image[:1], noise[:1], masks[:1])
    except Refused:
        raise
    except Exception as e:
        raise Refused(f"self-test: inference failed: {e}") from e
    _check("logits", one, 1, k)
    scale = max(1.0, float(np.abs(logits).max()))
    if not np.allclose(one[0], logits[0], atol=1e-3 * scale, rtol=1e-3):
        raise Refused("self-test: a row's answer depends on the rest of its batch")
    if raw is not None and not np.allclose(raw_one[0], raw[0], atol=1e-3 * scale, rtol=1e-3):
        raise Refused("self-test: raw_logits of a row depend on the rest of its batch")
    if not np.allclose(one, again, atol=1e-5 * scale, rtol=1e-5):
        raise Refused("self-test: the same input and randomness gave different answers")
    return {"batch": batch, "max_abs_logit": scale, "known_answer": known_answer(backend, facts, known)}


def known_answer(backend, facts: Facts, selftest: dict | None) -> bool | None:
    """Check the manifest's recorded answer (see ``self_test`` item 4); None if there is none."""
    if not selftest:
        return None
    try:
        seed, n = int(selftest["seed"]), int(selftest["batch"])
        expected = np.asarray(selftest["logits"], dtype=np.float32)
        atol = float(selftest.get("atol", 1e-3))
    except (KeyError, TypeError, ValueError) as e:
        raise Refused(f"manifest.json: malformed 'selftest' ({e!r})") from e
    rng = np.random.default_rng(seed)
    image = rng.random((n, 3, facts.image_size, facts.image_size), dtype=np.float32)
    noise, masks = contract.sample_rt(facts.spec, n, rng)
    try:
        got, _ = backend.run(image, noise, masks)
    except Exception as e:
        raise Refused(f"self-test: inference failed on the known answer: {e}") from e
    if got.shape != expected.shape or not np.allclose(got, expected, atol=atol, rtol=0):
        err = math.inf if got.shape != expected.shape else float(np.abs(got - expected).max())
        raise Refused(f"self-test: known answer not reproduced (max error {err:.3g} > {atol})")
    return True
