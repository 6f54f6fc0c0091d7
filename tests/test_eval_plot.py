"""The ε-sweep PNG (training/eval/plot.py): drawn from synthetic reports of two rows (with and
without intervals), a valid PNG of a sensible size; a report without a sweep is refused with a
clear ValueError (atop eval's own PNG is then skipped); the CLI writes the file, and says how to
install matplotlib when it is missing."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402

from training.eval.plot import main, plot_sweeps, report_png  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_report(role: str, top: float, ci: bool = True) -> dict:
    """A report with a 3-point sweep per norm (accuracy falling with ε) and a worst case."""
    sweep = []
    for norm, epss in (("Linf", (2 / 255, 8 / 255, 32 / 255)), ("L2", (0.25, 1.0, 4.0))):
        for k, eps in enumerate(epss):
            acc = top / (k + 1) if k < 2 else 0.0
            row = {"attack": "pgd-eot", "norm": norm, "eps": eps, "steps": 10, "eot": 2}
            row |= {"n_images": 64, "accuracy": acc}
            if ci:
                row["ci95"] = [max(0.0, acc - 0.1), min(1.0, acc + 0.1)]
            sweep.append(row)
    worst = [{"norm": "Linf", "eps": 8 / 255, "accuracy": top / 3, "attacks": ["pgd-eot"]}]
    if ci:
        worst[0]["ci95"] = [top / 3 - 0.1, top / 3 + 0.1]
    return {"target": {"role": role}, "sweep": sweep, "worst_case": worst}


def check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert 5_000 < len(data) < 400_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG" and 600 <= w <= 2000 and 250 <= h <= 1000 and w > h
        assert im.mode == "P"  # a 256-colour palette: a third of the RGBA file's size


def test_the_palette_png_keeps_the_picture():
    """Reduced to 256 colours on white, a plot-like RGBA image (antialiased coloured lines, a
    transparent margin) stays within a few levels per pixel of the original flattened on white."""
    import numpy as np
    from PIL import ImageDraw

    from training.eval.plot import palette_png

    im = Image.new("RGBA", (400, 200), (255, 255, 255, 255))
    draw = ImageDraw.Draw(im)
    for i, colour in enumerate([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]):
        draw.line([(10, 20 + 40 * i), (390, 180 - 30 * i)], fill=colour + (255,), width=3)
    draw.rectangle([0, 0, 400, 8], fill=(0, 0, 0, 0))  # transparent: becomes white, not black
    small = palette_png(im.resize((800, 400), Image.Resampling.BICUBIC))
    want = Image.alpha_composite(
        Image.new("RGBA", (800, 400), "white"), im.resize((800, 400), Image.Resampling.BICUBIC)
    )
    diff = np.abs(np.asarray(small.convert("RGB"), dtype=int) - np.asarray(want.convert("RGB"), dtype=int))
    assert small.mode == "P" and diff.mean() < 1.0 and np.percentile(diff, 99.9) < 24
    assert (np.asarray(small.convert("RGB"))[:8] > 250).all()


def test_two_rows_make_a_png(tmp_path):
    out = plot_sweeps(
        [("AP", fake_report("ap", 0.7)), ("AToP", fake_report("atop", 0.8, ci=False))], tmp_path / "s.png"
    )
    assert out == tmp_path / "s.png"
    check_png(out)


def test_no_sweep_is_a_clear_error(tmp_path):
    empty = {"target": {"role": "ap"}, "sweep": [], "worst_case": []}
    with pytest.raises(ValueError, match="no ε sweep.*--sweep"):
        plot_sweeps([("AP", empty), ("old", {"robust": []})], tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()
    assert report_png(empty, tmp_path / "r.png") is None and not (tmp_path / "r.png").exists()


def test_report_png_marks_the_worst_case(tmp_path):
    check_png(report_png(fake_report("atop", 0.6), tmp_path / "atop.png"))


def test_cli(tmp_path, monkeypatch, capsys):
    files = []
    for name, top in (("ap", 0.7), ("atop", 0.8)):
        (tmp_path / f"{name}.json").write_text(json.dumps(fake_report(name, top)))
        files.append(f"{name.upper()}={tmp_path / name}.json")
    none = tmp_path / "undefended.json"
    none.write_text(json.dumps({"sweep": []}))
    out = tmp_path / "docs" / "sweep.png"
    assert main(["--out", str(out), *files, str(none)]) == 0
    check_png(out)
    assert "left out: undefended" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["--out", str(tmp_path / "x.png"), *files]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -c constraints.txt matplotlib" in err
