"""ε-sweep plot of one or more ``atop eval`` reports with matplotlib (Agg, headless): robust
accuracy (vote) against ε, ℓ∞ (in /255) left and ℓ2 right, one line per row, with the 95%
interval of each point as a shaded band where the report carries it (``ci95`` on sweep
entries; older reports have none).

matplotlib is optional (the ``train`` extra, and so ``dev``); it is imported only when a plot is
drawn, so importing this module never needs it. The hand-written SVG of training/eval/report.py
stays the dependency-free plot.

    python -m training.eval.plot --out docs/sweep.png undefended=U.json "AToP=A.json"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("atop.eval")

NORMS = (("Linf", "ℓ∞", 255.0), ("L2", "ℓ2", 1.0))  # JSON norm, label, ε scale for the axis
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
INSTALL_HINT = (
    "matplotlib is not installed; install it with `pip install -c constraints.txt matplotlib` "
    "(it is part of the train and dev extras)"
)


def sweep_points(report: dict) -> dict[str, list[tuple[float, float, list[float] | None]]]:
    """norm -> [(ε, accuracy, ci95 or None)] sorted by ε, for the norms plotted."""
    out: dict[str, list] = {}
    for r in report.get("sweep") or []:
        if r.get("norm") in {n for n, _, _ in NORMS}:
            out.setdefault(r["norm"], []).append((float(r["eps"]), float(r["accuracy"]), r.get("ci95")))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


def _setting(report: dict) -> dict[str, str]:
    """The sweep's attack, as parts of a caption: attack, steps, EOT, images."""
    s = report["sweep"][0]
    return {
        "attack": str(s["attack"]),
        "steps": f"{s['steps']} steps",
        "eot": f"EOT {s['eot']}",
        "n": f"{s['n_images']} images",
    }


def _mark_worst_case(ax, rep: dict, norm: str, scale: float, color: str, ticks: set[float]) -> None:
    """A hollow diamond (with its 95% interval) at the report's worst case for ``norm``."""
    for w in rep.get("worst_case") or []:
        if w.get("norm") == norm:
            x = float(w["eps"]) * scale
            ticks.add(x)
            y = 100 * float(w["accuracy"])
            ci = w.get("ci95")
            err = [[y - 100 * ci[0]], [100 * ci[1] - y]] if ci else None
            ax.errorbar([x], [y], yerr=err, fmt="D", ms=8, mfc="none", mew=1.6, color=color, capsize=3)


def plot_sweeps(
    reports: Sequence[tuple[str, dict]], path: str | Path, *, worst_case: bool = False, dpi: int = 110
) -> Path:
    """Draw the sweeps of ``reports`` ((row name, report dict) pairs) into the PNG ``path``.

    Rows without a sweep are left out; a ValueError is raised when none has one. With
    ``worst_case`` each row's worst case at its protocol's main ε is marked with a hollow
    diamond (what the SVG shows for a single report)."""
    rows = [(name, rep, sweep_points(rep)) for name, rep in reports]
    rows = [r for r in rows if r[2]]
    if not rows:
        names = ", ".join(name for name, _ in reports) or "(no reports)"
        raise ValueError(
            f"no ε sweep (ℓ∞ or ℓ2) in {names}: run atop eval with a preset (quick, leekim) or --sweep"
        )
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from e

    # What all rows' sweeps share goes into the title, what differs into each row's label.
    settings = [_setting(rep) for _, rep, _ in rows]
    common = {k: v for k, v in settings[0].items() if all(st[k] == v for st in settings)}
    banded = False
    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (norm, sym, scale) in zip(axes, NORMS, strict=True):
        ticks: set[float] = set()
        for i, (name, rep, pts) in enumerate(rows):
            own = [v for k, v in settings[i].items() if k not in common]
            label = f"{name} ({', '.join(own)})" if own else name
            p = pts.get(norm, [])
            color = f"C{i % 10}"
            if p:
                xs = [e * scale for e, _, _ in p]
                ticks.update(xs)
                ys = [100 * a for _, a, _ in p]
                ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], ms=5, lw=1.6, color=color, label=label)
                if all(ci for _, _, ci in p):
                    lo = [100 * ci[0] for _, _, ci in p]
                    hi = [100 * ci[1] for _, _, ci in p]
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
                    banded = True
            if worst_case:
                _mark_worst_case(ax, rep, norm, scale, color, ticks)
        if ticks and min(ticks) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
            ax.minorticks_off()
        ax.set_xlabel(f"{sym} ε" + (" (/255)" if scale == 255.0 else ""))
        ax.set_title(f"{sym}: robust accuracy vs ε", fontsize=11)
        ax.set_ylim(-2, 102)
        ax.grid(True, color="#ddd", lw=0.8)
    axes[0].set_ylabel("robust accuracy (vote), %")
    axes[0].legend(fontsize=8, loc="upper right")
    note = "band: 95% Wilson interval" if banded else ""
    if worst_case:
        note = "; ".join(x for x in (note, "diamond: worst case over the protocol's attacks") if x)
    head = "ε sweep" + (f": {', '.join(common.values())}" if common else "")
    fig.suptitle(head + (f"  ({note})" if note else ""), fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path, dpi)
    return path


def save_png(fig, path: Path, dpi: int) -> None:
    """The figure as a 256-colour palette PNG: a line plot needs no more, and the file is about a
    third of matplotlib's RGBA one (the repository keeps every report's plot)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        palette_png(im).save(path, format="PNG", optimize=True)


def palette_png(im):
    """An image flattened onto white and reduced to a 256-colour palette."""
    from PIL import Image

    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB").quantize(256)


def report_png(result: dict, path: str | Path) -> Path | None:
    """``atop eval``'s own PNG: this report's sweep with its worst cases. None (and nothing
    written) when matplotlib is missing or the report has no sweep."""
    if not sweep_points(result):
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.info("no %s: %s", Path(path).name, INSTALL_HINT)
        return None
    try:
        return plot_sweeps([(result["target"]["role"], result)], path, worst_case=True)
    except Exception as e:  # the JSON, Markdown and SVG are written already: never lose a run to a plot
        log.warning("could not draw %s: %s", path, e)
        return None


def parse_row(text: str) -> tuple[str, Path]:
    """``name=report.json`` (or a bare path: the name is the file's stem)."""
    name, sep, file = text.partition("=")
    return (name, Path(file)) if sep else (Path(text).stem, Path(text))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.eval.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--worst-case", action="store_true", help="mark each row's worst case at the main ε")
    p.add_argument("--dpi", type=int, default=110)
    p.add_argument("rows", nargs="+", metavar="NAME=REPORT.json", help="one line per row, in this order")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.stderr.write(f"error: {INSTALL_HINT}\n")
        return 2
    reports = [(name, json.loads(file.read_text())) for name, file in map(parse_row, args.rows)]
    try:
        out = plot_sweeps(reports, args.out, worst_case=args.worst_case, dpi=args.dpi)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    skipped = [name for name, rep in reports if not sweep_points(rep)]
    if skipped:
        sys.stderr.write(f"no sweep, left out: {', '.join(skipped)}\n")
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
