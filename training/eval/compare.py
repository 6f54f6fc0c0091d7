"""``atop compare A B``: paired differences between two evaluations of the same images.

Two models attacked on the same seeded subset are compared image by image, not by their two
headline figures: the interval of a paired difference (Newcombe's method 10) is much narrower
than that of two independent proportions when the models agree on most images, as two networks
from one training lineage do. The inputs are the state files ``atop eval`` keeps beside its
report (``<out>.state.json``): they hold, per attack section, which images were attacked and
which survived, by the headline (vote) rule. An image counts as robust in a section when it was
attacked there and survived, so in a cascade the last section's figure is "robust to every
attack so far", as in the report's worst case.

``--worst`` compares, per threat model (norm and radius), the per-image worst case instead: an
image counts as robust only if it survived every finished attack of the file at that radius,
which is what the report's worst-case line counts. ``--with-convergence`` joins the convergence
check's stronger variants into it too (on the few images they attacked), for a row whose check
failed: the worst case over every attack the file holds. ``worst_images`` does the same over several
files of one model (the main protocol and runs at other budgets, as bench/results_table.py joins
them), so attacks from different runs combine image by image.

Only the headline sections (``main/...``: clean and every attack on the whole subset) are
compared; the ε sweep and the convergence check run on smaller subsets. Refuses, with one line,
files that were not computed on the same images (data, n, seed; data paths are compared
resolved from the current directory, so ``../shared/data`` and its absolute path match).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from training.eval.cascade import Scores
from training.eval.stats import paired_difference

SAME_IMAGES = ("data", "n", "seed")


class CompareError(ValueError):
    """Two state files that cannot be paired."""


def load_state(path: str | Path) -> dict:
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: not a readable eval state file ({e})") from None
    if not isinstance(state, dict) or "identity" not in state or "sections" not in state:
        raise CompareError(f"{path}: not an eval state file (no identity/sections)")
    return state


def robust_images(section: dict, n: int) -> torch.Tensor:
    """Bool [n]: the images attacked in ``section`` that its attack did not break (vote); for
    the clean section, the images answered correctly. Read with the evaluator's own record
    format (``Scores``), batch by batch as ``run_attacks`` stored them."""
    if "scores" in section:  # the clean pass: one score per image of the subset
        vote = Scores.from_json(section["scores"]).vote
        if len(vote) != n:
            raise CompareError("the clean section does not cover the subset")
        return vote > 0.5
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.tensor(section["targets"], dtype=torch.long)] = section_votes(section)
    return out


def section_votes(section: dict) -> torch.Tensor:
    """Bool, one per target of an attack section (in its ``targets`` order): survived (vote).
    CompareError for a section that is not an attack's or has not finished every batch."""
    if "targets" not in section:
        raise CompareError("not an attack section")
    done = section.get("done", {})
    scores = [Scores.from_json(done[b]) for b in sorted(done, key=int)]
    votes = Scores.cat(scores).vote if scores else torch.zeros(0)
    if len(votes) != len(section["targets"]):
        raise CompareError("a section is unfinished: its attack has not run on every target image")
    return votes > 0.5


def _same_key(value, key: str):
    """``value`` as compared for identity field ``key``: data paths resolved."""
    if key == "data" and isinstance(value, str):
        return str(Path(value).resolve())
    return value


def same_images(a: dict, b: dict) -> int:
    """The number of images two state files share, or CompareError when their subsets differ."""
    ia, ib = a["identity"], b["identity"]
    differ = [k for k in SAME_IMAGES if _same_key(ia.get(k), k) != _same_key(ib.get(k), k)]
    if differ:
        detail = ", ".join(f"{k} {ia.get(k)!r} vs {ib.get(k)!r}" for k in differ)
        raise CompareError(f"not the same images ({detail}): a paired difference needs the same subset")
    return int(ia["n"])


def threat(section: str) -> tuple[str, float] | None:
    """(norm, radius) of a headline attack section, ``main/<attack>/<norm>/<eps>/...``; None for
    the clean section and anything else."""
    parts = section.split("/")
    if len(parts) < 4 or parts[0] != "main" or parts[1] == "clean":
        return None
    try:
        return parts[2], round(float(parts[3]), 5)
    except ValueError:
        return None


def attack_of(section: str) -> tuple[str, str, float, int, int] | None:
    """(attack, norm, radius, steps, EOT) of a headline attack section; None for anything else."""
    t = threat(section)
    parts = section.split("/")
    if t is None or len(parts) < 6 or parts[4][:1] != "s" or parts[5][:1] != "e":
        return None
    try:
        return parts[1], *t, int(parts[4][1:]), int(parts[5][1:])
    except ValueError:
        return None


def worst_images(
    states: list[dict],
    only: list[set | None] | None = None,
    protocols: list[dict | None] | None = None,
) -> dict[tuple[str, float], torch.Tensor]:
    """Per threat model, bool [n]: the images robust to every finished headline attack at that
    radius in any of ``states`` (one model's files, on the same images). An unfinished section
    (a run still going) is left out, as the partial report leaves it out of its worst case.
    ``only``, per state: None, or the (attack, norm, radius, steps, EOT) to count (a partial
    report's finished attacks, so the answer does not move while the run goes on).
    ``protocols``, per state: None, or its report's protocol, to join the convergence check's
    variants too (``convergence_images``; they add to a threat model the file attacked)."""
    n = int(states[0]["identity"]["n"])
    out: dict[tuple[str, float], torch.Tensor] = {}
    for i, st in enumerate(states):
        same_images(states[0], st)
        keep = only[i] if only else None
        for name, sec in st["sections"].items():
            t = threat(name)
            if t is None or (keep is not None and attack_of(name) not in keep):
                continue
            try:
                robust = robust_images(sec, n)
            except CompareError:
                continue
            out[t] = out.get(t, torch.ones(n, dtype=torch.bool)) & robust
    for st, proto in zip(states, protocols or [], strict=False):
        if proto is None:
            continue
        for t, robust in convergence_images(st, proto).items():
            if t in out:
                out[t] &= robust
    return out


CONVERGENCE = ("convergence", "convergence-after-prefilter")


def convergence_images(state: dict, protocol: dict) -> dict[tuple[str, float], torch.Tensor]:
    """Per threat model, bool [n]: False for the images the convergence check's variants
    (2x steps, 2x EOT) broke, True elsewhere. The variants attack only the first
    ``convergence_n`` clean-correct images of the subset (under ``--prefilter``, those of them
    the prefilter left robust), and their sections count images from that small subset, so
    ``protocol`` (the report's: ``convergence_n`` and ``prefilter``) maps them back. Joined into
    a worst case (``worst_images(..., protocols=...)``), they make it the per-image minimum over
    the check's stronger attacks as well; an unfinished variant is left out."""
    n = int(state["identity"]["n"])
    sections = state["sections"]
    k = int(protocol.get("convergence_n") or 0)
    if not k or "main/clean" not in sections:
        return {}
    sub = robust_images(sections["main/clean"], n).nonzero().flatten()[:k]
    out: dict[tuple[str, float], torch.Tensor] = {}
    for name, sec in sections.items():
        parts = name.split("/")
        if parts[0] not in CONVERGENCE or len(parts) < 4 or "targets" not in sec:
            continue
        t = (parts[2], round(float(parts[3]), 5))
        attacked = sub
        if parts[0] == "convergence-after-prefilter":
            pf = protocol.get("prefilter") or {}
            cheap = [s for s in sections if attack_of(s) == (parts[1], *t, pf.get("steps"), pf.get("eot"))]
            if not cheap:
                raise CompareError(f"{name}: no prefilter section to place its images with")
            attacked = sub[robust_images(sections[cheap[0]], n)[sub]]
        try:
            survived = section_votes(sec)
        except CompareError:
            continue  # unfinished
        robust = torch.ones(n, dtype=torch.bool)
        robust[attacked[torch.tensor(sec["targets"], dtype=torch.long)]] = survived
        out[t] = out.get(t, torch.ones(n, dtype=torch.bool)) & robust
    return out


def _row(section: str, ra: torch.Tensor, rb: torch.Tensor) -> dict:
    d = paired_difference(ra, rb)
    return {
        "section": section,
        "a": ra.float().mean().item(),
        "b": rb.float().mean().item(),
        "difference": d["difference"],
        "ci95": d["ci95"],
        "n_images": len(ra),
    }


def compare_worst(
    a: list[dict],
    b: list[dict],
    protocols: tuple[list[dict | None] | None, list[dict | None] | None] = (None, None),
) -> list[dict]:
    """One row per threat model both sides attacked: the per-image worst case of each, a − b
    (``protocols``, per side: those of ``worst_images``, to join the convergence variants)."""
    same_images(a[0], b[0])
    wa, wb = worst_images(a, protocols=protocols[0]), worst_images(b, protocols=protocols[1])
    return [_row(f"worst {t[0]} {t[1]:g}", wa[t], wb[t]) for t in wa if t in wb]


def compare(a: dict, b: dict, pairs: list[tuple[str, str]] | None = None) -> list[dict]:
    """One row per attack section both files finished: accuracy of each and a − b, paired.
    ``pairs``: (section of a, section of b) to compare instead, e.g. two different attacks."""
    n = same_images(a, b)
    rows = []
    if pairs is None:
        pairs = [(name, name) for name in a["sections"] if name.startswith("main/")]
    for name, other in pairs:
        sa, sb = a["sections"].get(name), b["sections"].get(other)
        if sa is None or sb is None:
            continue
        try:
            ra, rb = robust_images(sa, n), robust_images(sb, n)
        except CompareError:
            continue
        rows.append(_row(name if name == other else f"{name} vs {other}", ra, rb))
    return rows


def table(rows: list[dict], names: tuple[str, str]) -> str:
    head = f"| attack section | {names[0]} | {names[1]} | difference [95% CI, paired] |\n|---|---|---|---|"
    lines = [
        f"| `{r['section']}` | {100 * r['a']:.1f}% | {100 * r['b']:.1f}% |"
        f" {100 * r['difference']:+.1f} [{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}] |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="the first evaluation's state file (<out>.state.json of atop eval)")
    p.add_argument("b", help="the second one, on the same images (same --data, --n and --seed)")
    p.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("SECTION_A", "SECTION_B"),
        help="compare this section of A with that one of B (e.g. two different attacks on the same"
        " images; repeatable) instead of the sections the two share by name",
    )
    p.add_argument(
        "--worst",
        action="store_true",
        help="compare the per-image worst case of each threat model (every finished attack at that"
        " radius) instead of attack sections",
    )
    p.add_argument(
        "--with-convergence",
        action="store_true",
        help="with --worst: join the convergence check's variants (2x steps, 2x EOT, on its first"
        " clean-correct images) into each worst case too; reads the finished report <out>.json"
        " beside each state file for the check's subset",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")


def report_protocol(state_path: str | Path) -> dict:
    """The protocol of the finished report ``atop eval`` wrote beside a state file."""
    report = Path(str(state_path).removesuffix(".state.json") + ".json")
    try:
        return json.loads(report.read_text())["protocol"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise CompareError(
            f"{state_path}: --with-convergence needs the finished report beside it ({report})"
        ) from None


def main(args: argparse.Namespace) -> int:
    try:
        pairs = [tuple(p) for p in args.pair] if args.pair else None
        a, b = load_state(args.a), load_state(args.b)
        if args.worst and pairs:
            raise CompareError("--worst and --pair do not go together")
        if args.with_convergence and not args.worst:
            raise CompareError("--with-convergence goes with --worst")
        if args.worst:
            protocols = (
                ([report_protocol(args.a)], [report_protocol(args.b)])
                if args.with_convergence
                else (None, None)
            )
            rows = compare_worst([a], [b], protocols)
        else:
            rows = compare(a, b, pairs)
    except CompareError as e:
        sys.stderr.write(f"atop compare: {e}\n")
        return 2
    if not rows:
        sys.stderr.write("atop compare: the two files share no finished attack section\n")
        return 2
    names = (Path(args.a).name, Path(args.b).name)
    sys.stdout.write((json.dumps(rows, indent=1) if args.json else table(rows, names)) + "\n")
    return 0
