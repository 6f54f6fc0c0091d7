"""``atop eval``: robustness of the deployed pipeline (or a baseline) the way a skeptical
reviewer would measure it. Protocol and reasons: docs/evaluation.md.

What is attacked (training/eval/targets.py): a model-store version (its TorchScript file, after
verification, through ``forward_with`` with our own draws of its RT randomness) or checkpoints;
``--defense`` picks the row: ``none`` (the classifier alone: undefended or AT), ``rt`` (random
transform only) or ``full`` (RT + purifier: AP or AToP, from the purifier checkpoint's stage).

Attacks (training/eval/attacks.py, presets in training/eval/protocol.py) run on the whole
pipeline with exact gradients and EOT, cascade within a threat model, and are scored by the
service's rule (vote over ``--samples`` draws), with single-draw and fixed-draw accuracy beside
it (training/eval/cascade.py). Sanity checks run automatically (training/eval/sanity.py); failures
are printed as WARNING lines and stored in the ``sanity`` block. Everything is resumable: the
state file ``<out>.state.json`` is rewritten after every batch. Outputs: ``<out>.json`` (the
manifest's evaluation shape, merged with earlier runs into the same file), ``<out>.md``,
``<out>.svg`` (robust accuracy against ε) and, with matplotlib installed and a sweep in the
protocol, ``<out>.png`` (the same with 95% bands, training/eval/plot.py). ``--record``
publishes the store version again with these numbers (training/eval/record.py).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from training.checkpoint import atomic_path
from training.data import DATA_HELP
from training.eval import protocol
from training.eval.attacks import ATTACKS
from training.eval.evaluate import CLEAN_BLOCK, attack_cheap, evaluate, partial_report
from training.eval.plot import report_png
from training.eval.record import merge_robust, record
from training.eval.report import markdown, svg_plot
from training.eval.targets import DEFENSES, Target, from_checkpoints, from_store
from training.transforms import RTSpec

log = logging.getLogger("atop.eval")


@dataclass(frozen=True)
class EvalConfig:
    data: str
    classifier: str = ""  # checkpoints ...
    purifier: str = ""
    store: str = ""  # ... or a store version
    model: str = "cifar10-atop"
    version: int = 0  # 0 = the newest valid one
    defense: str = "auto"  # auto | none | rt | full
    rt: str = ""  # RT kind for --defense rt without a purifier
    noise_std: float = -1.0  # override the deployed σ (-1 = keep)
    out: str = ""  # <out>.json/.md/.svg and the state file <out>.state.json
    preset: str = "custom"  # custom | quick | leekim
    attacks: tuple[str, ...] = ("pgd",)  # custom protocol
    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 20
    alpha: float = 0.0  # 0 = 2.5·eps/steps
    eot: int = 8
    square_queries: int = 1000
    cascade: bool = True
    prefilter: tuple | None = None  # (steps, eot[, threats]): a cheap attack before each costly one
    sweep: bool = False  # custom protocol: add the ε sweep
    sweep_n: int = 0  # 0 = the preset's (custom: all images)
    convergence_n: int = -1  # -1 = the preset's (custom: 0, no check)
    n: int = 512  # attacked test images (seeded subset)
    clean_n: int = 10000  # images for clean accuracy
    samples: int = 8  # draws per answer (vote rule)
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"  # cuda: models and images on the GPU (draws are made on the CPU and moved)
    sanity: bool = True
    zero_tol: float = 0.05  # "~0%" in the sanity checks
    force: bool = False  # allow EOT 1 on a randomized model
    record: bool = False
    partial: bool = False  # report the attacks the state file has finished, attack nothing
    prefilter_only: bool = False  # run the attacks no costlier than the prefilter, then report as partial
    reuse: tuple[str, ...] = ()  # state files of the same evaluation whose finished sections are copied in
    serve_samples: bool = False  # with record: the new version answers with `samples` draws by default


def build_target(cfg: EvalConfig) -> Target:
    return _target(cfg).to(cfg.device)


def _target(cfg: EvalConfig) -> Target:
    if cfg.store:
        if cfg.noise_std >= 0 or cfg.rt:
            raise ValueError(
                "--noise-std/--rt cannot change a store version; evaluate its checkpoints instead"
            )
        return from_store(cfg.store, cfg.model, cfg.version, cfg.defense)
    if not cfg.classifier:
        raise ValueError("give --classifier (checkpoints) or --store (a model-store version)")
    noise_std = cfg.noise_std if cfg.noise_std >= 0 else None
    spec = None
    if not cfg.purifier and (cfg.rt or cfg.defense == "rt"):
        spec = RTSpec(kind=cfg.rt or "rt2", **({"noise_std": noise_std} if noise_std is not None else {}))
    return from_checkpoints(cfg.classifier, cfg.purifier, cfg.defense, spec, noise_std)


def build_protocol(cfg: EvalConfig) -> protocol.Protocol:
    sizes = {"sweep_n": cfg.sweep_n} if cfg.sweep_n > 0 else {}
    if cfg.convergence_n >= 0:
        sizes["convergence_n"] = cfg.convergence_n
    if cfg.prefilter and not cfg.cascade:
        raise ValueError("--prefilter works through the cascade; it cannot go with --no-cascade")
    if cfg.preset in ("leekim", "quick"):
        proto = (protocol.leekim if cfg.preset == "leekim" else protocol.quick)(**sizes)
        proto = proto if cfg.cascade else proto.without_cascade()
    else:
        proto = _custom(cfg)
    return proto.with_prefilter(*cfg.prefilter) if cfg.prefilter else proto


def _custom(cfg: EvalConfig) -> protocol.Protocol:
    return protocol.custom(
        cfg.attacks,
        norm=cfg.norm,
        eps=cfg.eps,
        steps=cfg.steps,
        eot=cfg.eot,
        alpha=cfg.alpha,
        square_queries=cfg.square_queries,
        cascade=cfg.cascade,
        sweep=cfg.sweep,
        sweep_n=max(cfg.sweep_n, 0),
        convergence_n=max(cfg.convergence_n, 0),
    )


def run(cfg: EvalConfig) -> dict:
    """Evaluate; the result has the manifest's ``evaluation`` shape (model_store.manifest)."""
    if cfg.serve_samples and not cfg.record:  # before hours of attacks, not after
        raise ValueError("--serve-samples sets the recorded version's default; it needs --record")
    target = build_target(cfg)
    paths = output_paths(cfg.out)
    if cfg.partial:
        return _partial(cfg, target, paths)
    if cfg.prefilter_only:
        if paths is None or cfg.record:
            raise ValueError(
                "--prefilter-only keeps its work in the state file of --out OUT; it cannot --record"
            )
        attack_cheap(cfg, target, build_protocol(cfg), paths[".state.json"])
        return _partial(cfg, target, paths)
    result = evaluate(cfg, target, build_protocol(cfg), paths and paths[".state.json"])
    result |= {"config": asdict(cfg)}
    if paths:
        merged = write_merged(paths[".json"], result)
        paths[".md"].write_text(markdown(merged))
        paths[".svg"].write_text(svg_plot(merged))
        png = report_png(merged, paths[".png"])  # None: no sweep or no matplotlib
        log.info("wrote %s, .md, .svg%s", paths[".json"], ", .png" if png else "")
    if cfg.record:
        mv = record(result, serving_samples=cfg.samples if cfg.serve_samples else None)
        result["recorded_as"] = {"model": mv.name, "version": mv.version, "path": str(mv.path)}
    return result


def _partial(cfg: EvalConfig, target: Target, paths: dict[str, Path] | None) -> dict:
    """OUT.partial.json and .md from OUT.state.json; never OUT.json, which marks a finished run
    (recipes/eval_full.sh skips an evaluation whose JSON exists)."""
    if paths is None or cfg.record:
        raise ValueError(
            "--partial reads the state file of --out OUT and writes OUT.partial.json; it cannot --record"
        )
    base = paths[".json"].with_suffix("")
    out = base.with_name(base.name + ".partial.json")
    known = _earlier_clean_block(out, cfg, target)
    result = partial_report(cfg, target, build_protocol(cfg), paths[".state.json"], known)
    result |= {"config": asdict(cfg)}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    log.info(
        "wrote %s and .md: %d finished attacks; pending: %s",
        out,
        len(result["robust"]),
        result["pending_attacks"],
    )
    return result


# the config fields the clean accuracy on the clean set depends on (with the target's files)
CLEAN_SET = ("clean_n", "seed", "samples")


def _earlier_clean_block(path: Path, cfg: EvalConfig, target: Target) -> dict | None:
    """The clean-set block of the partial report at ``path`` when it was computed for the same
    target files (sha256), data and clean set: a refresh of a partial report reuses it (the
    pass over 10,000 images is minutes on a randomized row). None otherwise."""
    try:
        old = json.loads(path.read_text())
        same = (
            old["target"]["source"] == json.loads(json.dumps(target.source))
            and old["target"]["rt"] == (target.spec.to_dict() if target.spec else None)
            and Path(old["config"]["data"]).resolve() == Path(cfg.data).resolve()
            and all(old["config"][k] == getattr(cfg, k) for k in CLEAN_SET)
        )
        block = {k: old[k] for k in CLEAN_BLOCK}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if same:
        log.info("clean accuracy on the clean set: reused from %s (same target and clean set)", path)
    return block if same else None


def output_paths(out: str) -> dict[str, Path] | None:
    """OUT.json, OUT.md, OUT.svg, OUT.png and OUT.state.json for ``--out OUT`` (or OUT.json)."""
    if not out:
        return None
    base = Path(out.removesuffix(".json"))
    return {ext: base.with_name(base.name + ext) for ext in (".json", ".md", ".svg", ".png", ".state.json")}


def write_merged(path: Path, result: dict) -> dict:
    """Write ``result``; robust entries already in ``path`` for other attacks are kept. Returns
    what was written."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    result = result | {"robust": merge_robust(old.get("robust", []), result["robust"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _eps(text: str) -> float:
    """Accept 8/255 as well as 0.0314."""
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    return float(text)


def _at_least(lo: int):
    """An argparse type: an integer >= ``lo`` (a clear usage error before any work, not a crash
    after an hour of attacks)."""

    def parse(text: str) -> int:
        v = int(text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo} (got {v})")
        return v

    parse.__name__ = "integer"
    return parse


COUNT, COUNT0 = _at_least(1), _at_least(0)


def _prefilter(text: str) -> tuple:
    """STEPSxEOT[:THREATS], e.g. 50x8 or 50x8:flow (THREATS: comma-separated linf, l2, flow)."""
    budget, _, threats = text.partition(":")
    try:
        steps, eot = (int(v) for v in budget.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STEPSxEOT such as 50x8, not {text!r}") from None
    if steps < 1 or eot < 1:
        raise argparse.ArgumentTypeError(f"steps and EOT must be at least 1 (got {text!r})")
    if not threats:
        return steps, eot
    names = tuple(t.strip().lower() for t in threats.split(","))
    unknown = [t for t in names if t not in protocol.PREFILTER_THREATS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"STEPSxEOT:THREATS takes threats among {', '.join(protocol.PREFILTER_THREATS)}, not {unknown}"
        )
    return steps, eot, names


_prefilter.__name__ = "STEPSxEOT"


def _survival(text: str) -> float:
    """A fraction in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1, not {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {text!r})")
    return v


_survival.__name__ = "fraction"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EvalConfig(data="")
    a = p.add_argument
    a("--data", required=True, help=f"{DATA_HELP}; its test split is used")
    a(
        "--classifier",
        default="",
        help="classifier checkpoint (checkpoint mode), or a model-store version folder: its f, "
        "standing for the training checkpoint its manifest records (a run begun on that checkpoint resumes)",
    )
    a("--purifier", default="", help="purifier checkpoint: AP (pre-trained) or AToP (fine-tuned)")
    a("--store", default="", help="model-store root (store mode: attack the exported TorchScript file)")
    a("--model", default=d.model, help=f"model name in the store (default {d.model})")
    a("--version", type=int, default=d.version, help="store version (default: the newest valid one)")
    a(
        "--defense",
        choices=DEFENSES,
        default=d.defense,
        help="none: classifier alone; rt: RT only; full: RT+purifier",
    )
    a("--rt", choices=("rt1", "rt2", "rt3"), default="", help="RT kind for --defense rt without --purifier")
    a("--noise-std", type=float, default=d.noise_std, help="override the deployed noise σ (checkpoints only)")
    a("--out", default=d.out, help="output prefix: writes OUT.json/.md/.svg/.png, state OUT.state.json")
    a(
        "--preset",
        choices=protocol.PRESETS,
        default=d.preset,
        help="leekim: the full protocol; quick: small",
    )
    a("--attacks", default=",".join(d.attacks), help=f"custom protocol, comma-separated: {','.join(ATTACKS)}")
    a("--norm", choices=["linf", "l2"], default=d.norm, help="custom protocol threat model (default linf)")
    a("--eps", type=_eps, default=d.eps, help="custom radius, e.g. 8/255 or 0.5 (default 8/255)")
    a("--steps", type=COUNT, default=d.steps, help=f"custom attack steps (default {d.steps})")
    a("--alpha", type=_eps, default=d.alpha, help="custom step size (default 2.5*eps/steps)")
    a("--eot", type=COUNT, default=d.eot, help=f"custom EOT draws per gradient (default {d.eot})")
    a("--square-queries", type=COUNT0, default=d.square_queries, help="custom Square queries")
    a("--no-cascade", dest="cascade", action="store_false", help="every attack on every clean-correct image")
    a(
        "--prefilter",
        type=_prefilter,
        default=d.prefilter,
        metavar="STEPSxEOT[:THREATS]",
        help="e.g. 50x8: before each costlier PGD or flow attack, the same attack at this budget; the costly "
        "one then attacks only its survivors (the worst case is unchanged in meaning; the costly attack's "
        "own figure becomes cumulative). Saves most where a cheap attack breaks most images. 50x8:flow "
        "(or :linf, :l2, comma-separated) puts it only before those threat models' attacks",
    )
    a(
        "--reuse",
        action="append",
        default=[],
        metavar="STATE",
        help="another run's state file of the same evaluation (same model, images, seed, --samples, "
        "--batch-size; another protocol): every attack section this run shares with it (same attack, "
        "budget, step and cascade, so the same seeds) is copied in instead of recomputed. Repeatable; "
        "a state of another evaluation is refused",
    )
    a("--sweep", action="store_true", help="custom protocol: add the ε sweep (plot, monotonicity check)")
    a("--sweep-n", type=COUNT0, default=d.sweep_n, help="images for the sweep (default: the preset's)")
    a(
        "--convergence-n",
        type=COUNT0,
        default=d.convergence_n,
        help="images for the convergence check (0: skip)",
    )
    a("--n", type=COUNT, default=d.n, help=f"attacked test images, seeded subset (default {d.n})")
    a("--clean-n", type=COUNT, default=d.clean_n, help=f"images for clean accuracy (default {d.clean_n})")
    a("--samples", type=COUNT, default=d.samples, help=f"draws per answer, vote rule (default {d.samples})")
    a("--batch-size", type=COUNT, default=d.batch_size, help=f"attack batch (default {d.batch_size})")
    a("--seed", type=int, default=d.seed, help="seed of the subset and of every random draw")
    a(
        "--no-sanity",
        dest="sanity",
        action="store_false",
        help="skip the sanity runs (not for reported numbers)",
    )
    a("--zero-tol", type=float, default=d.zero_tol, help="what counts as ~0%% in the sanity checks")
    a("--force", action="store_true", help="allow gradient attacks with EOT 1 on a randomized model")
    a(
        "--record",
        action="store_true",
        help="publish the store version again, as a NEW version carrying these numbers; a running"
        " `atop serve` on that store swaps to it at its next poll (as to any new version)",
    )
    a(
        "--serve-samples",
        action="store_true",
        help="with --record: the new version's manifest sets serving.samples = --samples, so a request "
        "without the option gets the answer whose accuracy the vote figures measured",
    )
    a(
        "--partial",
        action="store_true",
        help="attack nothing: report what the run's state file (OUT.state.json) has finished so far, to "
        "OUT.partial.json/.md, with the same flags as the run; safe beside the running evaluation",
    )
    a(
        "--prefilter-only",
        action="store_true",
        help="run only the attacks that cost no more per image than --prefilter (the prefilter, and an"
        " FGSM before it) into OUT.state.json, then write OUT.partial.json/.md as --partial does: an upper"
        " bound within a fraction of the run's time; the same command without this flag goes on from there",
    )
    a("--strict", action="store_true", help="exit 3 if a sanity check fails")
    a("--estimate", action="store_true", help="measure per-image costs, print the protocol's wall time, exit")
    a(
        "--survival",
        type=_survival,
        default=1.0,
        help="with --estimate: the fraction of images the first attack of each threat model leaves robust"
        " (the later cascaded ones, and the convergence variants under --prefilter, attack only those);"
        " 1 (default) gives the upper bound",
    )
    a("--device", default=d.device, help="cpu (default) or cuda: where the models and images live")
    a("--threads", type=int, default=None, help="torch CPU threads")


def estimate_only(cfg: EvalConfig, survival: float = 1.0) -> str:
    """Measure this target's per-image costs on one batch and extrapolate the protocol."""
    from training.data import load_split
    from training.eval.evaluate import measure_cost

    target = build_target(cfg)
    proto = build_protocol(cfg) if target.randomized else build_protocol(cfg).deterministic()
    split = load_split(cfg.data, "test", size=target.image_size, classes=target.classes or None)
    split = split.subset(cfg.batch_size, seed=cfg.seed)
    x, y = (split.images.float() / 255).to(cfg.device), split.labels.to(cfg.device)
    cost = measure_cost(target, x, y, cfg.samples)
    k = cfg.samples if target.randomized else 1
    est = protocol.estimate(
        proto, cfg.n, k, cost["gradient_ms_per_image"], cost["forward_ms_per_image"], survival
    )
    lines = [f"{target.role}: {json.dumps(cost)}", f"{'role':12} {'attack':48} {'images':>6} {'hours':>7}"]
    lines += [f"{r['role']:12} {r['attack']:48} {r['images']:>6} {r['hours']:7.2f}" for r in est["rows"]]
    if survival == 1:
        lines.append(
            f"upper bound {est['hours']:.1f} h (every image attacked by every attack; cascades spend less)"
        )
    else:
        lines.append(
            f"estimate {est['hours']:.1f} h (later cascaded attacks on {survival:.0%} of the images)"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in fields(EvalConfig) if hasattr(args, f.name)}
    values["attacks"] = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    values["reuse"] = tuple(args.reuse)
    if args.estimate:
        print(estimate_only(EvalConfig(**values), args.survival))  # noqa: T201
        return 0
    result = run(EvalConfig(**values))
    print(markdown(result))  # noqa: T201
    if "recorded_as" in result:
        rec = result["recorded_as"]
        print(  # noqa: T201
            f"recorded as {rec['model']} version {rec['version']} ({rec['path']}): a new version;"
            " a running `atop serve` on this store swaps to it at its next poll"
        )
    return 3 if args.strict and not result.get("partial") and not result["sanity"]["all_passed"] else 0
