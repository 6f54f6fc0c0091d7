"""``atop eval``: accuracy of the defended pipeline under white-box attacks with EOT.

The attacked model is the whole pipeline f(g(t(x))) with exact gradients through the random
transform, the purifier and the classifier; every attack step averages the gradient over
``--eot`` fresh draws of the randomness. Final adversarial examples are then scored three ways:

* ``vote`` — the service's answer with ``samples=k``: argmax of the softmax averaged over k
  fresh draws (what a client receives);
* ``single`` — accuracy of one random draw, averaged over the same k draws (what a client
  gets from ``samples=1``, in expectation);
* ``fixed`` — one fixed draw of the randomness, the same one for every evaluation.

Checks and the full protocol table (AutoAttack-rand, Square, the unseen attack, sanity checks)
belong to the evaluation issue; this module is the core they build on.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from training.attacks import fgsm, pgd
from training.classifier import load_classifier
from training.data import batches, load_split
from training.purifier import DefendedPipeline, StochasticPipeline, load_pipeline
from training.transforms import RTSpec, sample_rt

log = logging.getLogger("atop.eval")


@dataclass(frozen=True)
class EvalConfig:
    data: str
    classifier: str
    purifier: str = ""  # empty: the undefended classifier
    out: str = ""
    n: int = 512  # test images (seeded subset)
    clean_n: int = 10000  # images for clean accuracy
    attack: str = "pgd"  # pgd | fgsm | none
    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 20
    alpha: float = 0.0  # 0 = 2.5·eps/steps
    eot: int = 8
    samples: int = 8  # draws used to score each final example
    noise_std: float = -1.0  # override the deployed σ (-1 = keep)
    batch_size: int = 64
    seed: int = 0


def build_model(cfg: EvalConfig) -> tuple[nn.Module, DefendedPipeline | None]:
    if not cfg.purifier:
        return load_classifier(cfg.classifier), None
    pipe = load_pipeline(cfg.classifier, cfg.purifier)
    if cfg.noise_std >= 0:
        spec = RTSpec.from_dict({**pipe.spec.to_dict(), "noise_std": cfg.noise_std})
        pipe = DefendedPipeline(pipe.purifier, pipe.classifier, spec).eval()
    return pipe.requires_grad_(False), pipe


@torch.no_grad()
def score(
    pipe: DefendedPipeline | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int, seed: int
) -> dict[str, torch.Tensor]:
    """Per-example correctness [B] under the vote, single and fixed rules."""
    if pipe is None:
        ok = (model(x).argmax(1) == y).float()
        return {"vote": ok, "single": ok, "fixed": ok}
    gen = torch.Generator().manual_seed(seed)
    probs = torch.zeros(x.shape[0], pipe.classifier.cfg.num_classes)
    single = torch.zeros(x.shape[0])
    for _ in range(samples):
        s = sample_rt(pipe.spec, x.shape[0], gen)
        p = pipe(x, s.noise, s.masks).softmax(1)
        probs += p
        single += (p.argmax(1) == y).float()
    fixed_draw = sample_rt(pipe.spec, x.shape[0], torch.Generator().manual_seed(10_000 + seed))
    fixed = (pipe(x, fixed_draw.noise, fixed_draw.masks).argmax(1) == y).float()
    return {"vote": (probs.argmax(1) == y).float(), "single": single / samples, "fixed": fixed}


def clean_accuracy(cfg: EvalConfig, model, pipe, test) -> dict:
    split = test.subset(cfg.clean_n, seed=cfg.seed)
    sums = {"vote": 0.0, "single": 0.0, "fixed": 0.0}
    for i, (x, y) in enumerate(batches(split, 500)):
        res = score(pipe, model, x, y, samples=1, seed=cfg.seed * 7919 + i)
        for k in sums:
            sums[k] += float(res[k].sum())
    return {"n": len(split), "accuracy": sums["single"] / len(split), "draws_per_image": 1}


def run(cfg: EvalConfig) -> dict:
    """Evaluate; the result has the manifest's ``evaluation`` shape (model_store.manifest)."""
    test = load_split(cfg.data, "test")
    model, pipe = build_model(cfg)
    t0 = time.time()
    clean = clean_accuracy(cfg, model, pipe, test)
    log.info("clean accuracy %.4f on %d images", clean["accuracy"], clean["n"])
    result: dict = {
        "clean_accuracy": clean["accuracy"],
        "n_images": clean["n"],
        "clean_protocol": "top-1, one fresh RT draw per image (the mean over the randomness)",
        "rt": pipe.spec.to_dict() if pipe else None,
        "config": asdict(cfg),
        "robust": [],
    }
    if cfg.attack != "none":
        result["robust"].append(attack(cfg, model, pipe, test))
    result["wall_s"] = round(time.time() - t0, 1)
    if cfg.out:
        write_merged(Path(cfg.out), result)
    return result


def attack(cfg: EvalConfig, model, pipe, test) -> dict:
    from tqdm import tqdm

    target = StochasticPipeline(pipe, torch.Generator().manual_seed(cfg.seed + 1)) if pipe else model
    eot = cfg.eot if pipe else 1  # a deterministic model needs no EOT
    split = test.subset(cfg.n, seed=cfg.seed)
    sums = {"clean_vote": 0.0, "vote": 0.0, "single": 0.0, "fixed": 0.0}
    t0 = time.time()
    bar = tqdm(total=len(split), desc=f"{cfg.attack}-{cfg.norm} eot={eot}", mininterval=10)
    for i, (x, y) in enumerate(batches(split, cfg.batch_size)):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        if cfg.attack == "fgsm":
            xa = fgsm(target, x, y, eps=cfg.eps, norm=cfg.norm, eot=eot)
        else:
            xa = pgd(
                target,
                x,
                y,
                eps=cfg.eps,
                steps=cfg.steps,
                alpha=cfg.alpha or None,
                norm=cfg.norm,
                eot=eot,
                gen=gen,
            )
        res = score(pipe, model, xa, y, cfg.samples, seed=cfg.seed * 31 + i)
        for k in ("vote", "single", "fixed"):
            sums[k] += float(res[k].sum())
        sums["clean_vote"] += float(score(pipe, model, x, y, cfg.samples, seed=i)["vote"].sum())
        bar.update(len(y))
    bar.close()
    n = len(split)
    out = {
        "attack": f"{cfg.attack}-eot" if pipe else cfg.attack,
        "norm": {"linf": "Linf", "l2": "L2"}[cfg.norm],
        "eps": cfg.eps,
        "steps": cfg.steps if cfg.attack == "pgd" else 1,
        "alpha": cfg.alpha or (2.5 * cfg.eps / cfg.steps if cfg.attack == "pgd" else cfg.eps),
        "eot": eot,
        "n_images": n,
        "accuracy": sums["vote"] / n,
        "score_rule": f"argmax of the softmax averaged over {cfg.samples} fresh RT draws (service samples={cfg.samples})",
        "accuracy_single_draw": sums["single"] / n,
        "accuracy_fixed_randomness": sums["fixed"] / n,
        "clean_accuracy_same_images": sums["clean_vote"] / n,
        "gradients": "exact through RT, purifier and classifier" if pipe else "exact (deterministic model)",
        "subset_seed": cfg.seed,
        "wall_s": round(time.time() - t0, 1),
    }
    log.info(
        "%s %s eps=%.4g: accuracy vote %.4f single %.4f fixed %.4f (clean on same images %.4f)",
        out["attack"],
        out["norm"],
        cfg.eps,
        out["accuracy"],
        out["accuracy_single_draw"],
        out["accuracy_fixed_randomness"],
        out["clean_accuracy_same_images"],
    )
    return out


def write_merged(path: Path, result: dict) -> None:
    """Write ``result``; robust entries already in ``path`` for other attacks are kept."""
    old = json.loads(path.read_text()) if path.is_file() else {"robust": []}
    key = lambda r: (r["attack"], r["norm"], round(r["eps"], 6), r["steps"], r["eot"])  # noqa: E731
    new_keys = {key(r) for r in result["robust"]}
    result = {
        **result,
        "robust": [r for r in old.get("robust", []) if key(r) not in new_keys] + result["robust"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def _eps(text: str) -> float:
    """Accept 8/255 as well as 0.0314."""
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    return float(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EvalConfig(data="", classifier="")
    p.add_argument("--data", required=True, help="CIFAR-10 source (test split is used)")
    p.add_argument("--classifier", required=True, help="classifier checkpoint")
    p.add_argument("--purifier", default="", help="purifier checkpoint (omit: undefended classifier)")
    p.add_argument("--out", default="", help="write the result JSON here")
    p.add_argument("--n", type=int, default=d.n, help=f"attacked test images, seeded subset (default {d.n})")
    p.add_argument(
        "--clean-n", type=int, default=d.clean_n, help=f"images for clean accuracy (default {d.clean_n})"
    )
    p.add_argument("--attack", choices=["pgd", "fgsm", "none"], default=d.attack, help="attack (default pgd)")
    p.add_argument("--norm", choices=["linf", "l2"], default=d.norm, help="threat model (default linf)")
    p.add_argument("--eps", type=_eps, default=d.eps, help="radius, e.g. 8/255 or 0.5 (default 8/255)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"PGD steps (default {d.steps})")
    p.add_argument("--alpha", type=_eps, default=d.alpha, help="PGD step size (default 2.5*eps/steps)")
    p.add_argument("--eot", type=int, default=d.eot, help=f"EOT draws per gradient (default {d.eot})")
    p.add_argument(
        "--samples", type=int, default=d.samples, help=f"draws to score each example (default {d.samples})"
    )
    p.add_argument("--noise-std", type=float, default=d.noise_std, help="override the deployed noise σ")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"attack batch (default {d.batch_size})"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the subset, RT draws and random starts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig)})
    result = run(cfg)
    print(json.dumps({k: result[k] for k in ("clean_accuracy", "n_images", "robust")}, indent=2))  # noqa: T201
    return 0
