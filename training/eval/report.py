"""Human-readable outputs of ``atop eval``: a Markdown report and an SVG plot of robust
accuracy against ε (ℓ∞ and ℓ2). The SVG is written by hand, so plotting needs no dependency."""

from __future__ import annotations

from html import escape

from training.eval.sanity import warning_lines


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def ci_text(ci: list[float] | None) -> str:
    """A 95% interval as "[a–b]" in percent (empty when absent, as in older result files)."""
    return "" if not ci else f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]"


def final_text(r: dict) -> str:
    """The final-iterate figure of a stepped attack (best iterate is the headline)."""
    if r.get("accuracy_final_iterate") is None:
        return "–"
    d = r.get("final_minus_best")
    delta = f" (+{100 * d['difference']:.1f} pts)" if d and d["difference"] > 0 else ""
    return f"{pct(r['accuracy_final_iterate'])}{delta}"


def eps_text(norm: str, eps: float) -> str:
    if norm == "Linf":
        return f"{eps * 255:.3g}/255"
    return f"{eps:.3g} px" if norm == "flow" else f"{eps:.3g}"


def answer_text(answer: dict | None) -> str:
    """The clean accuracy of the vote answer (samples > 1), for the clean-accuracy line."""
    if not answer or answer["samples"] == 1:
        return ""
    return f", {pct(answer['accuracy'])} answering with samples={answer['samples']} (softmax mean)"


def prefilter_text(pre: dict | None) -> str:
    if not pre:
        return ""
    where = f" (before the {', '.join(pre['threats'])} attacks only)" if pre.get("threats") else ""
    return (
        f" Prefilter {pre['steps']}x{pre['eot']}{where}: each costlier PGD or flow attack follows the same "
        "attack at that budget and attacks only its survivors, so its figure is cumulative: the worst case "
        "over both (the same quantity as the worst-case line below)."
    )


def partial_lines(result: dict) -> list[str]:
    if not result.get("partial"):
        return []
    pending = ", ".join(result.get("pending_attacks") or []) or "none of the main attacks"
    return [
        "> **Partial report of a run still going: the attacks its state file has finished, and the "
        f"worst case over them. Pending: {pending}; and {result['sanity'].get('pending', '')}.**",
    ]


def markdown(result: dict) -> str:
    t, p, s = result["target"], result["protocol"], result["sanity"]
    sub = result["clean_accuracy_subset"]
    lines = [
        f"# Robustness evaluation: {t['role']} ({t['description']})",
        "",
        *[f"> **{w}**" for w in warning_lines(s)],
        *partial_lines(result),
        "" if not s["all_passed"] or result.get("partial") else "All sanity checks passed.",
        "",
        f"* Source: {', '.join(f'{k}=`{v}`' for k, v in t['source'].items())}; randomized: {'yes' if t['randomized'] else 'no'}"
        + (f"; RT {t['rt']}" if t["rt"] else ""),
        "* Clean accuracy: "
        + (
            ""
            if result["clean_accuracy"] is None
            else f"{pct(result['clean_accuracy'])}{ci_text(result.get('clean_ci95'))} on "
            f"{result['n_images']} test images (one fresh draw each)"
            f"{answer_text(result.get('clean_accuracy_answer'))}; "
        )
        + f"on the attacked subset ({sub['n_images']} "
        f"images, seed {p['subset_seed']}): {pct(sub['vote'])}{ci_text(sub.get('ci95'))} by vote.",
        f"* Protocol: `{p['preset']}`. Attacks of one threat model cascade in the order listed (each "
        "sees only the images still robust); 'alone' rows attack every clean-correct image."
        + prefilter_text(p.get("prefilter")),
        f"* Scoring (headline = vote): vote: {result['scoring']['vote']}; single: "
        f"{result['scoring']['single']}; fixed: {result['scoring']['fixed']}.",
        "* Robust (vote) is the best iterate for pgd, cw and flow (per image, the iterate the attack "
        "scored highest on its own draws); 'final iterate' is the last one, on the same scoring draws. "
        "Brackets: 95% Wilson intervals over the attacked subset.",
        "",
        "| attack | threat | steps | EOT | step size | attacked | after | robust (vote) [95% CI] | final iterate "
        "| single draw | fixed draw | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["robust"]:
        step = "adaptive" if r["step_size"] is None else f"{r['step_size']:.4g}"
        after = " → ".join(r["cascade_after"]) if r["cascade_after"] else "alone"
        lines.append(
            f"| {r['attack']} | {r['norm']} {eps_text(r['norm'], r['eps'])} | {r['steps']} | {r['eot']} | {step} "
            f"| {r['attacked']} | {after} | **{pct(r['accuracy'])}**{ci_text(r.get('ci95'))} | {final_text(r)} "
            f"| {pct(r['accuracy_single_draw'])} "
            f"| {pct(r['accuracy_fixed_randomness'])} | {r['wall_s']:.0f} s |"
        )
    lines += ["", "Worst case per threat model (robust to every attack listed):", ""]
    for w in result["worst_case"]:
        lines.append(
            f"* {w['norm']} {eps_text(w['norm'], w['eps'])}: **{pct(w['accuracy'])}**{ci_text(w.get('ci95'))} "
            f"({', '.join(w['attacks'])})"
        )
    if result["sweep"]:
        sw = result["sweep"][0]
        lines += [
            "",
            f"## ε sweep ({sw['attack']}, {sw['steps']} steps, EOT {sw['eot']}, {sw['n_images']} images)",
            "",
            "| threat | robust (vote) [95% CI] | final iterate | single draw |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['norm']} {eps_text(r['norm'], r['eps'])} | {pct(r['accuracy'])}{ci_text(r.get('ci95'))} "
            f"| {final_text(r)} | {pct(r['accuracy_single_draw'])} |"
            for r in result["sweep"]
        ]
    if s["checks"]:
        lines += ["", "## Sanity checks", "", "| check | status | detail |", "|---|---|---|"]
        lines += [f"| {c['name']} | {c['status'].upper()} | {c['detail']} |" for c in s["checks"]]
    c = result["cost"]
    if not c:
        return "\n".join(lines + [""])
    lines += [
        "",
        f"Cost ({c['threads']} threads, batch {c['batch']}): {c['forward_ms_per_image']:.2f} ms per image per "
        f"forward pass, {c['answer_ms_per_image']:.2f} ms per answer ({c['answer_draws']} draws), "
        f"{c['gradient_ms_per_image']:.2f} ms per attack gradient. Wall time {result['wall_s']:.0f} s"
        + (
            f" (this run); the attacks took {result['attack_wall_s']:.0f} s in all, over every run that "
            "wrote its state file."
            if result.get("attack_wall_s", 0) > result["wall_s"]
            else "."
        ),
        "",
    ]
    return "\n".join(lines)


def _panel(
    points: list[tuple[float, float]], worst: list[tuple[float, float]], norm: str, x0: int
) -> list[str]:
    """One panel 300x220 at x offset x0: categorical ε axis, accuracy 0-100%."""
    w, h, left, top, bottom = 300, 220, 45, 25, 40
    pw, ph = w - left - 15, h - top - bottom
    xs = sorted({e for e, _ in points} | {e for e, _ in worst})
    pos = {e: x0 + left + (i + 0.5) * pw / max(len(xs), 1) for i, e in enumerate(xs)}

    def py(a: float) -> float:
        return top + ph * (1 - a)

    out = [
        f'<text x="{x0 + w / 2}" y="15" text-anchor="middle" font-size="13">{escape(norm)}: robust accuracy vs ε</text>',
        f'<rect x="{x0 + left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>',
    ]
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(
            f'<line x1="{x0 + left}" x2="{x0 + left + pw}" y1="{py(a):.1f}" y2="{py(a):.1f}" stroke="#ddd"/>'
        )
        out.append(
            f'<text x="{x0 + left - 4}" y="{py(a) + 4:.1f}" text-anchor="end" font-size="10">{int(a * 100)}%</text>'
        )
    for e in xs:
        out.append(
            f'<text x="{pos[e]:.1f}" y="{top + ph + 14}" text-anchor="middle" font-size="10">{escape(eps_text(norm, e))}</text>'
        )
    out.append(f'<text x="{x0 + left + pw / 2}" y="{h - 6}" text-anchor="middle" font-size="11">ε</text>')
    pts = sorted(points)
    if pts:
        path = " ".join(f"{pos[e]:.1f},{py(a):.1f}" for e, a in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
        out += [f'<circle cx="{pos[e]:.1f}" cy="{py(a):.1f}" r="3" fill="#1f77b4"/>' for e, a in pts]
    for e, a in worst:
        x, y = pos[e], py(a)
        out.append(f'<path d="M{x:.1f},{y - 6:.1f} l6,6 l-6,6 l-6,-6 z" fill="#d62728"/>')
    return out


def svg_plot(result: dict) -> str:
    """Robust accuracy (vote) against ε: the sweep as a line, worst case at the main ε as a red
    diamond; ℓ∞ left, ℓ2 right."""
    body = []
    for i, norm in enumerate(("Linf", "L2")):
        pts = [(r["eps"], r["accuracy"]) for r in result["sweep"] if r["norm"] == norm]
        worst = [(w["eps"], w["accuracy"]) for w in result["worst_case"] if w["norm"] == norm]
        body += _panel(pts, worst, norm, 300 * i)
    sw = result["sweep"][0] if result["sweep"] else None
    note = (
        f"line: {sw['attack']} {sw['steps']} steps, EOT {sw['eot']}, {sw['n_images']} images; "
        if sw
        else "no sweep; "
    ) + "diamond: worst case over the protocol's attacks"
    body.append(f'<text x="300" y="236" text-anchor="middle" font-size="10">{escape(note)}</text>')
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="600" height="245" viewBox="0 0 600 245" '
        'font-family="sans-serif">\n<rect width="600" height="245" fill="white"/>\n'
        + "\n".join(body)
        + "\n</svg>\n"
    )
