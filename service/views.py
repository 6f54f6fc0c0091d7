"""What the defense does to an image, for people: the /inspect answer and the version card.

* Pictures (PNG, base64): the image as the model sees it (after the decoding rule), and per RT
  draw t(x) (the graph's ``transformed`` output, missing pixels painted ``MASK_COLOUR`` so the
  mask is visible; RT3's copies side by side) and g(t(x)) (``purified``). Values are rounded
  to 8 bits, so the pictures are exact up to 1/255.
* The version card: name, version, its random transform in words, what the page can and cannot
  show (and why), and its recorded robustness in one line, read from the manifest's evaluation.

A version exported before the graph had image outputs (the embedded v8), or whose transform is
the identity, is described as it is: nothing is drawn that the model did not compute.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from atop import contract
from service.predict import softmax
from service.schemas import ClassScore, ImageResult, ModelRef, Timing

MASK_COLOUR = (255, 0, 255)  # missing pixels in the t(x) pictures


class ImageViews(BaseModel):
    input: str = Field(
        description="PNG (base64) of the image as the model sees it: S×S RGB, decoded as /classify does"
    )
    transformed: list[str] | None = Field(
        description="per draw, PNG (base64) of t(x): the noisy image with the missing pixels painted "
        "magenta (#ff00ff); RT3's copies side by side. null when the version's graph has no such output"
    )
    purified: list[str] | None = Field(
        description="per draw, PNG (base64) of g(t(x)), the image the defended classifier sees; null "
        "when the version's graph has no such output"
    )


class InspectResult(ImageResult):
    undefended_top_k: list[ClassScore] | None = Field(
        description="top-k of the undefended classifier f(x); null when the backend has no raw logits"
    )
    views: ImageViews


class VersionCard(BaseModel):
    """A model version in words, for a person deciding how far to trust its answers."""

    name: str
    version: int
    transform: str = Field(description="the random transform t, in words")
    random: bool = Field(description="whether t draws anything (false: the identity, every draw is the same)")
    purifier: bool | None = Field(description="whether the pipeline has a purifier g (null: not recorded)")
    images: bool = Field(
        description="whether the graph returns t(x) and g(t(x)) (versions exported before do not)"
    )
    default_samples: int = Field(description="draws averaged per answer when a request does not say")
    robustness: str = Field(
        description="the manifest's recorded clean and robust accuracy, with the protocol"
    )
    notes: list[str] = Field(description="what cannot be shown for this version, and why")


class InspectResponse(BaseModel):
    request_id: str
    model: ModelRef
    card: VersionCard = Field(description="the version that served this answer")
    samples: int
    seed: int | None
    results: list[InspectResult]
    timing: Timing


# --- pictures ----------------------------------------------------------------------------------
def _png(chw: np.ndarray) -> str:
    """float [3, H, W] in [0, 1] -> base64 PNG (8 bits, rounded)."""
    rgb = np.clip(np.rint(np.moveaxis(chw, 0, -1) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buf, "PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def transformed_png(transformed: np.ndarray, masks: np.ndarray) -> str:
    """One draw's t(x) [C, 3, H, W] with its masks [C, 1, H, W]: missing pixels in MASK_COLOUR,
    the C copies side by side."""
    colour = np.asarray(MASK_COLOUR, np.float32).reshape(1, 3, 1, 1) / 255.0
    painted = np.where(masks > 0.5, colour, transformed)  # [C, 3, H, W]
    return _png(np.concatenate(list(painted), axis=2))


def top_classes(probs: np.ndarray, classes: tuple[str, ...], k: int) -> list[ClassScore]:
    order = np.argsort(-probs, kind="stable")[: min(k, len(classes))]
    return [ClassScore(label=classes[c], class_index=int(c), probability=float(probs[c])) for c in order]


def inspect_results(
    results: list[ImageResult], job, *, samples: int, classes, top_k: int
) -> list[InspectResult]:
    """/classify's results plus the undefended top-k and the pictures of every draw (rows
    i*samples + j of the job). CPU work: run it in the threadpool."""
    raw = None
    if job.raw is not None:
        raw = softmax(job.raw.reshape(len(results), samples, -1)[:, 0])
    have = job.transformed is not None and job.purified is not None
    out = []
    for i, r in enumerate(results):
        rows = range(i * samples, (i + 1) * samples)
        views = ImageViews(
            input=_png(job.image[i * samples]),
            transformed=[transformed_png(job.transformed[j], job.masks[j]) for j in rows] if have else None,
            purified=[_png(job.purified[j]) for j in rows] if have else None,
        )
        undefended = None if raw is None else top_classes(raw[i], classes, top_k)
        out.append(InspectResult(**r.model_dump(), undefended_top_k=undefended, views=views))
    return out


# --- the version card --------------------------------------------------------------------------
def describe_rt(spec: dict) -> str:
    if not contract.rt_is_random(spec):
        return "identity: no noise, no masks"
    block, missing = int(spec["block"]), float(spec["missing"])
    noise = f"Gaussian noise σ = {float(spec['noise_std']):g} (clipped to [0, 1])"
    if spec["kind"] == "rt3":
        n = int(spec["num_masks"])
        return f"RT3: {noise}, then {n} complementary masks of {block}×{block} blocks; each copy is inpainted"
    holes = f"{missing:.0%} of the {block}×{block} blocks missing"
    if spec["kind"] == "rt1" or float(spec["noise_std"]) == 0:
        return f"{spec['kind'].upper()}: {holes}"
    return f"RT2: {noise}, then {holes}"


def _threat(norm: str, eps: float) -> str:
    """``Linf`` 0.0314 -> "ℓ∞ 8/255", ``L2`` 0.5 -> "ℓ2 0.5", anything else -> "flow ε=1"."""
    if norm.lower() == "linf":
        k = eps * 255
        return "ℓ∞ " + (f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}")
    return f"ℓ2 {eps:g}" if norm.lower() == "l2" else f"{norm} ε={eps:g}"


def robustness_line(evaluation: dict | None) -> str:
    """The recorded clean and robust accuracy with the protocol, in one line: per threat (norm,
    eps), the lowest accuracy over the attacks recorded at it, and which attacks those were."""
    ev = evaluation or {}
    clean, robust = ev.get("clean_accuracy"), ev.get("robust") or []
    if clean is None and not robust:
        return "No evaluation recorded: this version's robustness is unmeasured."
    parts = []
    if clean is not None:
        n = ev.get("n_images")
        parts.append(f"{clean:.1%} clean" + (f" ({n:,} images)" if n else ""))
    threats: dict[tuple[str, float], list[dict]] = {}
    for r in robust:
        threats.setdefault((str(r.get("norm", "Linf")), float(r["eps"])), []).append(r)
    sizes = {int(r["n_images"]) for r in robust}
    per_threat = []
    for (norm, eps), rows in threats.items():
        attacks = []
        for r in rows:
            label = f"{r['attack']}-{r['steps']}" if int(r.get("steps", 0)) > 1 else str(r["attack"])
            label += f" EOT {r['eot']}" if int(r.get("eot", 1)) > 1 else ""
            attacks.append(label + (", unseen in training" if r.get("unseen_in_training") else ""))
        n = "" if len(sizes) == 1 else f"; {min(int(r['n_images']) for r in rows)} images"
        worst = min(float(r["accuracy"]) for r in rows)
        per_threat.append(f"{_threat(norm, eps)}: {worst:.1%} ({', '.join(attacks)}{n})")
    if per_threat:
        scope = "worst attack" + (f", {next(iter(sizes))} images" if len(sizes) == 1 else "")
        parts.append(f"robust ({scope}): " + " · ".join(per_threat))
    preset = (ev.get("protocol") or {}).get("preset")
    return "; ".join(parts) + (f"; preset {preset}" if preset else "")


def version_card(
    name: str, version: int, manifest: dict, *, images: bool, raw: bool, samples: int
) -> VersionCard:
    """The card of one served version (``images``/``raw``: what its backend returns)."""
    spec = manifest["rt"]
    random = contract.rt_is_random(spec)
    recipe = (manifest.get("provenance") or {}).get("recipe") or {}
    purifier = None if "purifier" not in recipe else recipe["purifier"] is not None
    trained = ((recipe.get("classifier") or {}).get("config") or {}).get("train") or {}
    adversarial = trained.get("adversarial")
    own = f" (adversarially trained, {adversarial})" if adversarial and adversarial != "none" else ""
    notes = []
    if not random and purifier is False:
        notes.append(
            "This version has no purifier and its random transform is the identity: the classifier "
            f"sees the {spec['image_size']}×{spec['image_size']} image as it is, t(x) = g(t(x)) = x, "
            f"and every draw is the same. Whatever robustness it has is the classifier's own{own}."
        )
    elif not random:
        notes.append("Its random transform is the identity: every draw is the same, so one is computed.")
    if not images:
        notes.append(
            "Its graph has no transformed / purified outputs (it was exported before they existed), "
            "so t(x) and g(t(x)) cannot be shown; a re-export adds them."
        )
    if not raw:
        notes.append("Its backend gives no undefended logits: no undefended top-k, no suspicion signal.")
    return VersionCard(
        name=name,
        version=version,
        transform=describe_rt(spec),
        random=random,
        purifier=purifier,
        images=images,
        default_samples=samples if random else 1,
        robustness=robustness_line(manifest.get("evaluation")),
        notes=notes,
    )


def slot_card(slot) -> VersionCard:
    """The card of a registry slot (service.registry.Slot)."""
    backend = slot.backend
    return version_card(
        slot.name,
        slot.version,
        slot.manifest,
        images=bool(getattr(backend, "has_views", False)),
        raw=bool(backend.has_raw),
        samples=slot.facts.samples,
    )
