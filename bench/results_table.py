"""The results table (README, docs/results.md) from ``atop eval`` JSON files, one row each.

    python bench/results_table.py \\
        --row "undefended=runs/eval/undefended.json" \\
        --row "AT=runs/eval/at.json+runs/eval/at-linf4.json+runs/eval/at-linf12.json" \\
        --cost "AT=bench/results/ort-cost.json:model_store/cifar10-atop/15" \\
        --out docs/results.md

A row is one evaluation JSON, or several joined with ``+`` (the main protocol, then runs at other
radii or budgets): they must attack the same files (sha256) on the same seeded images with the
same number of draws, or the table refuses them. Columns: clean (the row's clean set, 10,000
images as served), PGD-EOT ℓ∞ 8/255, AutoAttack-rand ℓ∞ 8/255, the ℓ∞ 8/255 worst case (every ℓ∞
attack of the row, per image), Square ℓ∞ 8/255, PGD-EOT ℓ2 0.5 and the ℓ2 worst case (with
AutoAttack where it ran at ℓ2), the unseen ones (flow, and the ℓ∞
worst case at 4/255 and 12/255), and the cost of one answer. Every robust figure is the vote rule
(the service's answer) with its 95% Wilson interval; a figure measured inside a cascade (only on
the images earlier attacks left robust, so it is the worst case over those attacks too) is marked
with †, and one measured with less than the full protocol (Lee & Kim's 200 steps x EOT 20,
AutoAttack's 100 iterations and 5,000 Square queries; EOT 1 for a deterministic row) names its
budget, as does one on fewer than 512 images. The cost is the eval's own torch timing unless
``--cost`` names an ONNX Runtime measurement (bench/ort_cost.py) of the row's exported folder.
The protocol of every row is listed below the table, then the paper's published figures.

``--paired LABEL`` adds, under the table, every other row minus LABEL's, image by image (the
rows' state files, ``X.state.json`` beside ``X.json`` or ``X.partial.json``): per threat model,
the worst case over every finished attack of all the row's files at that radius, and the
difference with Newcombe's paired 95% interval (training/eval/compare.py).
``--with-convergence`` joins each finished file's convergence-check variants (2x steps, 2x EOT,
on its first clean-correct images) into those worst cases as well, as ``atop compare --worst
--with-convergence`` does: the figure that stands when a row's check failed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from training.eval import compare
from training.eval.attacks import NORM_NAMES
from training.eval.protocol import leekim
from training.eval.stats import wilson

LINF, L2 = 8 / 255, 0.5
FULL_N = 512
# The full protocol's budget per (attack, norm): (steps, EOT), from the leekim preset itself.
# AutoAttack's ℓ2 budget is taken as its ℓ∞ one (the preset runs it at ℓ∞ only).
FULL = {(s.name, NORM_NAMES[s.norm]): (s.steps, s.eot) for s in leekim().attacks}
FULL[("autoattack-rand", "L2")] = FULL[("autoattack-rand", "Linf")]
# (column, attack name or "worst", norm, eps); eps None = any
COLUMNS = [
    ("PGD-EOT ℓ∞ 8/255", "pgd", "Linf", LINF),
    ("AutoAttack-rand ℓ∞ 8/255", "autoattack-rand", "Linf", LINF),
    ("worst ℓ∞ 8/255", "worst", "Linf", LINF),
    ("Square ℓ∞ 8/255", "square", "Linf", LINF),
    ("PGD-EOT ℓ2 0.5", "pgd", "L2", L2),
    ("worst ℓ2 0.5", "worst", "L2", L2),
    ("unseen: flow ≤ 1 px", "flow", "flow", None),
    ("unseen: worst ℓ∞ 4/255", "worst", "Linf", 4 / 255),
    ("unseen: worst ℓ∞ 12/255", "worst", "Linf", 12 / 255),
]
PAPER = """## Published figures (AToP paper, CIFAR-10, RT2, 512 or fewer test images)

| | clean | AutoAttack, full pipeline | PGD+EOT, full gradient (64 images) |
|---|---|---|---|
| without fine-tuning (as reported) | 84.18% | 59.57% | 56.25% |
| AToP (as reported) | 90.04% | 72.85% | 64.06% |

What differs, in one sentence: the paper's purifier is an inpainting GAN (DeepFillv2) on
CIFAR-10 upsampled to 256×256 (its noise ~8x milder per native pixel than the same σ here) over
far larger classifiers, and its evaluation used few attack steps, mask-handling bugs and
gradients that skipped the purifier (DESIGN.md), so its figures are an upper anchor; ours are
models sized for 2 CPU cores at native 32×32, attacked through the whole deployed pipeline with
exact gradients, EOT and the service's own answer rule, on the images stated above.
"""


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def with_ci(v: float, ci: list[float] | None, n: int | None = None) -> str:
    """'44.7% [40.5–49.1]'; an older JSON without the interval gets its Wilson interval from n
    (vote-rule accuracies are 0/1 per image, so accuracy x n is the count)."""
    if not ci and n:
        ci = list(wilson(round(v * n), n))
    return pct(v) + (f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]" if ci else "")


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def close(a: float, b: float | None) -> bool:
    return b is None or math.isclose(a, b, rel_tol=1e-3)


def identity(result: dict) -> dict:
    """What a row's files must share: the attacked files, the images and the answer rule."""
    source = result.get("target", {}).get("source", {})
    # a store folder given as --classifier adds its manifest's sha256 beside the weights' own
    files = {k: v for k, v in source.items() if k.endswith("sha256") and not k.endswith("manifest_sha256")}
    p = result.get("protocol", {})
    return {
        "files": sorted(files.values()),
        "images": (p.get("n_images"), p.get("subset_seed")),
        "samples": result.get("scoring", {}).get("samples"),
    }


def runs_of(worst: dict, result: dict) -> frozenset:
    """The attacks behind one worst-case entry, with their budgets: (attack, steps, EOT)."""
    return frozenset(
        (e["attack"], e["steps"], e["eot"])
        for e in result.get("robust", [])
        if e["norm"] == worst["norm"] and close(e["eps"], worst["eps"]) and e["attack"] in worst["attacks"]
    )


def finished(result: dict) -> set | None:
    """A partial report's finished attacks as (attack, norm, radius, steps, EOT), the sections the
    paired block may read from its state file (which the run goes on writing); None for a finished
    run (every section)."""
    if not result.get("partial"):
        return None
    return {
        (e["name"], e["norm"].lower(), round(e["eps"], 5), e["steps"], e["eot"])
        for e in result.get("robust", [])
    }


def pending_at(worst: dict, result: dict) -> list[str]:
    """A partial report's attacks at this worst case's threat model that have not finished."""
    done = finished(result)
    if done is None:
        return []
    return [
        a["name"]
        for a in result.get("protocol", {}).get("attacks", [])
        if a["norm"] == worst["norm"].lower()
        and close(a["eps"], worst["eps"])
        and (a["name"], a["norm"], round(a["eps"], 5), a["steps"], a["eot"]) not in done
    ]


def merge(paths: list[str]) -> dict:
    """One row from several eval JSONs of the same target; the first gives clean and cost."""
    results = [json.loads(Path(q).read_text()) for q in paths]
    first = results[0]
    for q, r in zip(paths[1:], results[1:], strict=True):
        a, b = identity(first), identity(r)
        if a != b:
            diff = ", ".join(k for k in a if a[k] != b[k])
            raise SystemExit(f"{q}: not the same evaluation target as {paths[0]} ({diff} differ)")
    merged = dict(first)
    merged["robust"] = [e for r in results for e in r.get("robust", [])]
    merged["worst_case"] = [
        w | {"_runs": runs_of(w, r), "_pending": pending_at(w, r)}
        for r in results
        for w in r.get("worst_case", [])
    ]
    merged["_files"] = paths
    merged["_parts"] = results
    return merged


def find(result: dict, name: str, norm: str, eps: float | None) -> dict | None:
    """The strongest-budget entry of that attack and threat model (most steps x EOT)."""
    hits = [
        r
        for r in result.get("robust", [])
        if r.get("name") == name and r["norm"] == norm and close(r["eps"], eps)
    ]
    return max(hits, key=lambda r: (r["steps"] * r["eot"], r["n_images"]), default=None)


def budget(entry: dict, randomized: bool) -> str:
    """'' at the full protocol's budget, else what was run (steps x EOT, images)."""
    steps, eot = FULL.get((entry["name"], entry["norm"]), (0, 0))
    notes = []
    short = entry["steps"] < steps or (randomized and entry["eot"] < eot)
    if short:
        notes.append(f"{entry['steps']}" + (f"×{entry['eot']}" if randomized else " steps"))
    if entry["n_images"] < FULL_N:
        notes.append(f"{entry['n_images']} images")
    return ", ".join(notes)


def cell(entry: dict | None, randomized: bool) -> str:
    if entry is None:
        return "not run"
    note = budget(entry, randomized)
    return (
        with_ci(entry["accuracy"], entry.get("ci95"), entry.get("n_images"))
        + ("†" if entry.get("cascade_after") else "")
        + (f" ({note})" if note else "")
    )


def worst_cell(result: dict, norm: str, eps: float, randomized: bool) -> str:
    """The per-image worst case over the row's attacks at (norm, eps), as its eval JSON computed it.
    Several files with a worst case at the same radius: the one whose attacks (with their
    budgets) include every other's is exact, since the same attack on the same images with the
    same seed gives the same per-image results; otherwise the lowest, marked ≤ (the per-image
    minimum across files is not in the JSONs, and can only be lower). A partial report whose
    attacks at that radius have not all finished also gives ≤, naming the pending ones."""
    hits = [w for w in result.get("worst_case", []) if w["norm"] == norm and close(w["eps"], eps)]
    if not hits:
        return "not run"
    covers = [h for h in hits if all(o["_runs"] <= h["_runs"] for o in hits)]
    pending = sorted({a for h in hits for a in h.get("_pending", [])})
    exact = bool(covers) and not pending
    w = min(covers or hits, key=lambda h: h["accuracy"])
    notes = [f"{', '.join(pending)} pending"] if pending else []
    names = [a.removesuffix("-eot") for a in w["attacks"]]  # the JSON names attacks as run: pgd-eot
    for name in names:
        e = find(result, name, norm, eps)
        b = budget(e, randomized) if e is not None else ""
        if b:
            notes.append(f"{name} {b}")
    if "autoattack-rand" not in names and "autoattack-rand" not in pending:
        notes.append("no AutoAttack")
    return (
        ("" if exact else "≤ ")
        + with_ci(
            w["accuracy"], w.get("ci95"), w.get("n_images") or result.get("protocol", {}).get("n_images")
        )
        + (f" ({'; '.join(notes)})" if notes else "")
    )


def cost_cell(result: dict, ort: dict | None) -> str:
    samples = result.get("scoring", {}).get("samples", 1)
    if ort is not None:
        per = ort["ms_per_image_per_draw"]
        draws = f"{samples} draws × {per:.2f}" if samples > 1 else "1 draw"
        return f"{per * samples:.2f} ms ({draws}; ONNX Runtime, {ort['_threads']} thread)"
    c = result.get("cost", {})
    if not c:
        return "–"
    return (
        f"{c['answer_ms_per_image']:.1f} ms ({c['answer_draws']} draw{'s' * (c['answer_draws'] > 1)}, "
        f"torch, {c.get('threads', '?')} thread{'s' * (c.get('threads') != 1)})"
    )


def clean_cell(result: dict) -> str:
    """Clean accuracy as served (the vote of the row's draws), on the row's clean set."""
    served = result.get("clean_accuracy_answer") or {}
    if served.get("accuracy") is not None:
        acc, ci, n = served["accuracy"], served.get("ci95"), served.get("n_images")
    else:
        acc, ci, n = result["clean_accuracy"], result.get("clean_ci95"), result.get("n_images")
    return with_ci(acc, ci, n) + f" ({n:,} images)" if n else with_ci(acc, ci)


def row(label: str, result: dict, ort: dict | None = None) -> str:
    randomized = bool(result.get("target", {}).get("randomized", True))
    cells = [clean_cell(result)]
    for _, name, norm, eps in COLUMNS:
        if name == "worst":
            cells.append(worst_cell(result, norm, eps, randomized))
        else:
            cells.append(cell(find(result, name, norm, eps), randomized))
    cells.append(cost_cell(result, ort))
    return f"| {label} | " + " | ".join(cells) + " |"


def protocol_line(label: str, result: dict) -> str:
    lines = []
    for path, part in zip(result.get("_files", [""]), result.get("_parts", [result]), strict=True):
        p = part.get("protocol", {})
        s = part.get("sanity", {})
        attacks = "; ".join(
            f"{r['attack']} {r['norm']} {r['eps']:.4g}: {r['steps']} steps, EOT {r['eot']}"
            + (f" (after {', '.join(r['cascade_after'])})" if r.get("cascade_after") else "")
            for r in part.get("robust", [])
        )
        if part.get("partial"):
            pending = ", ".join(part.get("pending_attacks") or []) or "none of the main attacks"
            sane = f"**partial: the run is still going** (pending: {pending}; sanity checks come at its end)"
        elif s.get("all_passed"):
            sane = "all sanity checks passed"
        else:
            sane = f"**sanity checks FAILED: {', '.join(s.get('failed', []))}**"
        where = f"`{path}`: " if path else ""
        lines.append(
            f"{where}preset `{p.get('preset', '?')}`, {p.get('n_images', '?')} images (subset seed "
            f"{p.get('subset_seed', '?')}), clean on {part.get('n_images') or '–'}; {attacks}; {sane}; "
            f"wall {hours(max(part.get('wall_s', 0), part.get('attack_wall_s', 0)))}"
        )
    role = result.get("target", {}).get("description", "")
    votes = result.get("scoring", {}).get("samples", "?")
    draws = f"votes of {votes} draws" if votes != 1 else "one deterministic answer"
    return f"* **{label}** ({role}; {draws}): " + " · ".join(lines) + "."


# (column, norm as in state sections, radius) of the paired block
PAIRED = [
    ("worst ℓ∞ 8/255", "linf", LINF),
    ("worst ℓ2 0.5", "l2", L2),
    ("unseen: flow ≤ 1 px", "flow", 1.0),
    ("unseen: worst ℓ∞ 4/255", "linf", 4 / 255),
    ("unseen: worst ℓ∞ 12/255", "linf", 12 / 255),
]


def state_path(path: str) -> Path:
    """The state file ``atop eval`` kept beside an eval JSON or partial report."""
    stem = path.removesuffix(".json").removesuffix(".partial")
    return Path(stem + ".state.json")


def paired_block(rows: list[tuple[str, dict]], base: str, with_convergence: bool = False) -> list[str]:
    """Every row but ``base`` minus ``base``, per image, at each threat model both attacked."""
    states, only, protocols = {}, {}, {}
    for label, r in rows:
        paths = [state_path(q) for q in r["_files"]]
        states[label] = [compare.load_state(q) for q in paths] if all(q.is_file() for q in paths) else None
        only[label] = [finished(part) for part in r["_parts"]]
        # a partial report's convergence check may still be running: joined only once finished
        protocols[label] = [
            part.get("protocol") if with_convergence and finished(part) is None else None
            for part in r["_parts"]
        ]
    if states.get(base) is None:
        raise SystemExit(f"--paired {base!r}: no such row, or a file of it has no state file beside it")
    worst_base = compare.worst_images(states[base], only[base], protocols[base])
    head = ["model"] + [c[0] for c in PAIRED]
    lines = [
        f"### Paired differences against {base.strip('*')}",
        "",
        "Image by image on the same images (the rows' state files): each row's worst case over every "
        "attack its files finished at that radius, minus the reference's; Newcombe's paired 95% "
        "interval. This worst case joins a row's files per image, so it can be lower than the table's "
        "cell where that cell is marked ≤; a row whose cell above names a smaller budget than the "
        "full protocol's is an upper bound here too (so is its difference)."
        + (
            " The convergence check's variants (2× steps, 2× EOT, on a finished file's first "
            "clean-correct images) are joined in too, so a row whose check failed counts every attack "
            "that ran on it."
            if with_convergence
            else ""
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for label, _ in rows:
        if label == base:
            continue
        if states[label] is None:
            lines.append(f"| {label} |" + " no state file |" * len(PAIRED))
            continue
        try:
            compare.same_images(states[label][0], states[base][0])
            worst = compare.worst_images(states[label], only[label], protocols[label])
        except compare.CompareError:
            lines.append(f"| {label} |" + " other images |" * len(PAIRED))
            continue
        cells = []
        for _, norm, eps in PAIRED:
            key = (norm, round(eps, 5))
            if key not in worst or key not in worst_base:
                cells.append("–")
                continue
            d = compare.paired_difference(worst[key], worst_base[key])
            lo, hi = d["ci95"]
            cells.append(
                f"{100 * d['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                f"({pct(float(worst[key].float().mean()))} vs {pct(float(worst_base[key].float().mean()))})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def table(
    rows: list[tuple[str, dict]],
    costs: dict[str, dict] | None = None,
    paired: str = "",
    with_convergence: bool = False,
) -> str:
    costs = costs or {}
    head = ["model", "clean"] + [c[0] for c in COLUMNS] + ["cost / answer"]
    lines = [
        "## Robust accuracy (vote of the service's draws; the same seeded test images in every row)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += [row(label, r, costs.get(label)) for label, r in rows]
    lines += [
        "",
        "95% Wilson intervals in brackets. † measured in a cascade: only on the images the attacks "
        "listed for that row left robust, so the figure is the worst case over them too. A budget in "
        "parentheses (steps×EOT, images) is less than the full protocol's, so the figure is an upper "
        "bound on what the full protocol would leave; 'not run' is a column this row has no "
        "measurement for. Robust figures are the vote of the row's draws (the service with "
        "samples=k). Cost: one answer (all its draws) per image.",
        "",
    ]
    if paired:
        lines += paired_block(rows, paired, with_convergence) + [""]
    lines += ["### Protocol", ""]
    lines += [protocol_line(label, r) for label, r in rows]
    failed = [
        label
        for label, r in rows
        if not all(
            p.get("sanity", {}).get("all_passed", False) or p.get("partial") for p in r.get("_parts", [r])
        )
    ]
    if failed:
        lines += ["", f"> **WARNING: sanity checks failed for {', '.join(failed)}; see their reports.**"]
    return "\n".join(lines + ["", PAPER])


def load_cost(spec: str) -> tuple[str, dict]:
    """'LABEL=ort.json:folder' -> the bench/ort_cost.py result measured on that folder."""
    label, _, rest = spec.partition("=")
    path, _, folder = rest.rpartition(":")
    if not label or not path or not folder:
        raise SystemExit(f"--cost {spec!r}: expected LABEL=ORT_JSON:FOLDER")
    data = json.loads(Path(path).read_text())
    for r in data.get("results", []):
        if r.get("folder") == folder:
            return label, r | {"_threads": data.get("threads", "?")}
    raise SystemExit(f"--cost {spec!r}: {path} has no measurement of {folder}")


BEGIN = "<!-- results_table.py: begin (generated from the eval JSONs; do not edit by hand) -->"
END = "<!-- results_table.py: end -->"


def update(path: Path, text: str, *, check: bool) -> int:
    """Put the table between the markers of ``path``; with ``check``, only compare."""
    doc = path.read_text()
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise SystemExit(f"{path}: needs one {BEGIN!r} line and one {END!r} line after it")
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    new = f"{head}{BEGIN}\n{text}\n{END}{tail}"
    if check:
        if new != doc:
            print(f"{path}: the table differs from the one the eval JSONs give; re-run with --update")
            return 1
        print(f"{path}: the table matches the eval JSONs")
        return 0
    path.write_text(new)
    print(f"{path}: table updated ({len(text.splitlines())} lines)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, fromfile_prefix_chars="@"
    )
    p.add_argument(
        "--row", action="append", required=True, help="LABEL=eval.json[+more.json...], in table order"
    )
    p.add_argument(
        "--cost", action="append", default=[], help="LABEL=ort_cost.json:FOLDER (bench/ort_cost.py), optional"
    )
    p.add_argument(
        "--paired",
        default="",
        metavar="LABEL",
        help="add every other row minus this one, per image, with paired intervals (needs the state files)",
    )
    p.add_argument(
        "--with-convergence",
        action="store_true",
        help="with --paired: join each finished file's convergence-check variants into its worst cases",
    )
    p.add_argument("--out", default="", help="write the Markdown here (default: stdout)")
    p.add_argument(
        "--update",
        default="",
        metavar="FILE",
        help=f"replace the block between {BEGIN} and {END} in FILE (docs/results.md) with the table",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="with --update: change nothing, exit 1 if FILE's block differs from the JSONs' table",
    )
    args = p.parse_args(argv)
    rows = []
    for spec in args.row:
        label, _, paths = spec.partition("=")
        if not paths:
            raise SystemExit(f"--row {spec!r}: expected LABEL=PATH[+PATH...]")
        missing = [q for q in paths.split("+") if not Path(q).is_file()]
        if missing:
            raise SystemExit(f"--row {label!r}: no such file: {', '.join(missing)}")
        rows.append((label, merge(paths.split("+"))))
    costs = dict(load_cost(c) for c in args.cost)
    unknown = set(costs) - {label for label, _ in rows}
    if unknown:
        raise SystemExit(f"--cost for a label with no --row: {', '.join(sorted(unknown))}")
    if args.with_convergence and not args.paired:
        raise SystemExit("--with-convergence goes with --paired")
    text = table(rows, costs, args.paired, args.with_convergence)
    if args.update:
        return update(Path(args.update), text, check=args.check)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
