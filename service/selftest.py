"""What a store version must satisfy before it may serve: manifest facts and a self-test.

Run in a worker thread on a freshly loaded candidate, beside the active version. Every failure is
a ``Refused`` whose message names the problem; the registry then keeps the old version serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atop import contract
from model_store import serving_samples


class Refused(Exception):
    """A candidate version that must not serve, with the reason."""


@dataclass(frozen=True)
class Facts:
    """What the service needs from a manifest."""

    classes: tuple[str, ...]
    image_size: int
    spec: dict
    samples: int = 1  # the manifest's serving.samples: draws per answer when a request says nothing
    random: bool = True  # False: the RT is the identity, every draw is the same (contract.rt_is_random)


def manifest_facts(manifest: dict) -> Facts:
    """Facts of a manifest that ``store.verify`` accepted. The schema already guarantees the
    shapes, the RT spec's consistency with the input and unique class names; what it leaves to
    the service is the value range and non-empty names."""
    lo, hi = manifest["input"]["range"]
    if (lo, hi) != (0, 1):
        raise Refused(f"manifest.json: input range [{lo}, {hi}] is not [0, 1]")
    if not all(manifest["classes"]):
        raise Refused("manifest.json: empty class name in 'classes'")
    return Facts(
        tuple(manifest["classes"]),
        int(manifest["rt"]["image_size"]),
        dict(manifest["rt"]),
        serving_samples(manifest),
        contract.rt_is_random(manifest["rt"]),
    )


def robustness_regressions(candidate: dict, active: dict, tolerance: float) -> list[str]:
    """Measured robust accuracies of ``candidate`` more than ``tolerance`` below ``active``'s.

    Entries of ``evaluation.robust`` are compared only when both manifests measured the same
    attack, norm and eps (a different protocol is no evidence either way). The headline
    ``accuracy`` is the vote of ``evaluation.scoring.samples`` draws; when the two votes are of
    different sizes, the single-draw figures (which do not depend on it) are compared instead,
    and nothing if either lacks one.
    """

    def table(m: dict) -> dict:
        ev = m.get("evaluation") or {}
        k = (ev.get("scoring") or {}).get("samples")
        out = {}
        for r in ev.get("robust") or []:
            try:
                single = r.get("accuracy_single_draw")
                key = (r["attack"], r.get("norm", "Linf"), round(float(r["eps"]), 6))
                out[key] = (k, float(r["accuracy"]), None if single is None else float(single))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    new, old = table(candidate), table(active)
    worse = []
    for key in sorted(new.keys() & old.keys()):
        (k_new, acc_new, one_new), (k_old, acc_old, one_old) = new[key], old[key]
        if k_new == k_old:
            a, b, rule = acc_new, acc_old, ""
        elif one_new is not None and one_old is not None:
            a, b, rule = one_new, one_old, f" (single draw; votes of {k_new} and {k_old} differ)"
        else:
            continue
        if a < b - tolerance:
            attack, norm, eps = key
            worse.append(f"{attack} {norm} eps={eps:g}: {a:.4f} < {b:.4f}{rule}")
    return worse


def _check(name: str, arr: np.ndarray | None, rows: int, k: int) -> None:
    if arr is None:
        return
    if arr.shape != (rows, k):
        raise Refused(f"self-test: {name} has shape {tuple(arr.shape)}, expected ({rows}, {k})")
    if not np.isfinite(arr).all():
        raise Refused(f"self-test: {name} contains NaN or infinity")


def self_test(backend, facts: Facts, batch: int, parity: dict | None = None) -> dict:
    """Warm the backend up and check it honours the contract. Returns measurements.

    1. a full batch (``batch`` rows) and a single row give finite logits of shape [B, K];
    2. the single row equals row 0 of the batch (catches batch-size-dependent graphs, e.g. a
       BatchNorm left in training mode, or rows that leak into each other);
    3. running it again gives the same answer (deterministic given the randomness);
    4. when the exporter recorded reference logits (``graph.parity``), they are reproduced
       (``known_answer``): right weights, right RT handling, right backend numerics.
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
    views = check_views(backend, facts, (image[:2], noise[:2], masks[:2]), logits[:2], scale)
    return {
        "batch": batch,
        "max_abs_logit": scale,
        "reference_logits": known_answer(backend, facts, parity),
        "views": views,
    }


def check_views(backend, facts: Facts, draw: tuple, logits: np.ndarray, scale: float) -> bool:
    """The optional image outputs (atop.contract), when the backend has them: right shapes,
    finite, missing pixels of t(x) at 0, and the same logits as ``run``. False when absent."""
    if not getattr(backend, "has_views", False):
        return False
    rows, s, masks = len(logits), facts.image_size, draw[2]
    try:
        got, _, transformed, purified = backend.run_views(*draw)
    except Exception as e:
        raise Refused(f"self-test: the image outputs failed: {e}") from e
    want = {
        contract.OUTPUT_TRANSFORMED: (rows, contract.rt_copies(facts.spec), 3, s, s),
        contract.OUTPUT_PURIFIED: (rows, 3, s, s),
    }
    for name, arr in zip(contract.VIEW_OUTPUTS, (transformed, purified), strict=True):
        if arr is None or arr.shape != want[name]:
            shape = None if arr is None else tuple(arr.shape)
            raise Refused(f"self-test: {name} has shape {shape}, expected {want[name]}")
        if not np.isfinite(arr).all():
            raise Refused(f"self-test: {name} contains NaN or infinity")
    if np.abs(transformed * masks).max(initial=0.0) > 1e-6:
        raise Refused("self-test: transformed keeps pixels the masks say are missing")
    if not np.allclose(got, logits, atol=1e-3 * scale, rtol=1e-3):
        raise Refused("self-test: logits with the image outputs differ from those without")
    return True


def known_answer(backend, facts: Facts, parity: dict | None) -> bool | None:
    """Replay the exporter's parity draw and compare with its recorded eager-torch logits.

    ``graph.parity`` = {"seed", "batches", "tolerance", "reference_logits": one [b, K] list per
    batch}; for each b in order, from one ``default_rng(seed)``: images
    ``rng.random((b, 3, S, S), float32)`` then ``sample_rt(spec, b, rng)``. None when the
    manifest records no reference logits.
    """
    if not parity or parity.get("reference_logits") is None:
        return None
    try:
        rng = np.random.default_rng(int(parity["seed"]))
        batches = [int(b) for b in parity["batches"]]
        refs = [np.asarray(r, dtype=np.float32) for r in parity["reference_logits"]]
        atol = max(1e-3, 10 * float(parity.get("tolerance", 1e-4)))
    except (KeyError, TypeError, ValueError) as e:
        raise Refused(f"manifest.json: malformed graph.parity ({e!r})") from e
    s = facts.image_size
    for b, expected in zip(batches, refs, strict=False):
        image = rng.random((b, 3, s, s), dtype=np.float32)
        noise, masks = contract.sample_rt(facts.spec, b, rng)
        try:
            got, _ = backend.run(image, noise, masks)
        except Exception as e:
            raise Refused(f"self-test: inference failed on the reference draw: {e}") from e
        if got.shape != expected.shape:
            raise Refused(f"self-test: reference logits have shape {expected.shape}, got {got.shape}")
        err = float(np.abs(got - expected).max())
        if not err <= atol:
            raise Refused(
                f"self-test: exporter's reference logits not reproduced (max error {err:.3g} > {atol:g})"
            )
    return True
