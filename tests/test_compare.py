"""``atop compare``: paired differences of two evaluations' state files."""

from __future__ import annotations

import json

import pytest
import torch

from atop.cli import main as atop
from training.eval.cascade import Scores
from training.eval.compare import (
    CompareError,
    attack_of,
    compare,
    compare_worst,
    robust_images,
    worst_images,
)
from training.eval.stats import paired_difference

N = 8
SECTION = "main/pgd/linf/0.0313725/s50/e1/a0/c/after:"


def _rules(values: list[int]) -> dict:
    """Scores.to_json's shape: the three rules agree (a deterministic model)."""
    return Scores(*(torch.tensor(values, dtype=torch.float32) for _ in range(3))).to_json()


def _state(
    clean: list[int], targets: list[int], survived: list[int], *, seed: int = 0, split: int = 2
) -> dict:
    """A state file as atop eval writes it: clean scores per image; the attack's targets and,
    per finished batch, the vote of each target (1 = survived)."""
    done = {str(i): _rules(survived[j : j + split]) for i, j in enumerate(range(0, len(survived), split))}
    return {
        "identity": {"data": "d", "n": N, "seed": seed, "samples": 1},
        "sections": {
            "main/clean": {"scores": _rules(clean)},
            SECTION: {"targets": targets, "done": done},
        },
    }


def test_robust_images_places_each_survivor_at_its_image():
    s = _state([1] * N, targets=[1, 3, 4, 6], survived=[1, 0, 1, 1])["sections"][SECTION]
    assert robust_images(s, N).tolist() == [False, True, False, False, True, False, True, False]


def test_compare_pairs_image_by_image():
    a = _state([1, 1, 1, 1, 1, 1, 0, 0], targets=[0, 1, 2, 3, 4, 5], survived=[1, 1, 1, 0, 0, 1])
    b = _state([1, 1, 1, 1, 0, 1, 1, 0], targets=[0, 1, 2, 3, 5, 6], survived=[1, 0, 1, 1, 0, 0])
    rows = {r["section"]: r for r in compare(a, b)}
    ra = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    rb = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    row = rows[SECTION]
    assert row["a"] == pytest.approx(4 / 8) and row["b"] == pytest.approx(3 / 8)
    expected = paired_difference(ra, rb)
    assert row["difference"] == pytest.approx(1 / 8) and row["ci95"] == expected["ci95"]
    assert rows["main/clean"]["difference"] == pytest.approx(0.0)
    # Identical evaluations: zero difference, an interval around it.
    same = {r["section"]: r for r in compare(a, a)}[SECTION]
    assert same["difference"] == 0 and same["ci95"][0] <= 0 <= same["ci95"][1]


def test_compare_keeps_the_headline_sections_and_resolves_data_paths(tmp_path, monkeypatch):
    a = _state([1] * N, targets=[0, 1, 2, 3], survived=[1, 1, 0, 0])
    a["sections"]["sweep/pgd/linf/0.0156863/s50/e1/a0/i/after:"] = a["sections"][SECTION]
    monkeypatch.chdir(tmp_path)
    b = json.loads(json.dumps(a))
    a["identity"]["data"], b["identity"]["data"] = "d", str(tmp_path / "d")
    assert sorted(r["section"] for r in compare(a, b)) == ["main/clean", SECTION]


def test_compare_refuses_other_images_and_skips_unfinished_sections():
    a = _state([1] * N, targets=[0, 1, 2, 3], survived=[1, 1, 0, 0])
    with pytest.raises(CompareError, match="seed"):
        compare(a, _state([1] * N, targets=[0, 1, 2, 3], survived=[1, 1, 0, 0], seed=1))
    unfinished = _state([1] * N, targets=[0, 1, 2, 3], survived=[1, 1])
    assert [r["section"] for r in compare(a, unfinished)] == ["main/clean"]


def test_compare_pairs_two_named_sections():
    a = _state([1] * N, targets=[0, 1, 2, 3], survived=[1, 1, 1, 0])
    b = _state([1] * N, targets=[0, 1, 2, 3], survived=[1, 0, 0, 0])
    b["sections"]["main/other"] = b["sections"].pop(SECTION)
    assert [r["section"] for r in compare(a, b)] == ["main/clean"]
    (row,) = compare(a, b, [(SECTION, "main/other")])
    assert row["section"] == f"{SECTION} vs main/other" and row["difference"] == pytest.approx(2 / 8)


def test_compare_command(tmp_path, capsys):
    a = tmp_path / "a.state.json"
    b = tmp_path / "b.state.json"
    a.write_text(json.dumps(_state([1] * N, targets=list(range(N)), survived=[1] * 6 + [0] * 2)))
    b.write_text(json.dumps(_state([1] * N, targets=list(range(N)), survived=[1] * 4 + [0] * 4)))
    assert atop(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "75.0% | 50.0% | +25.0" in out
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    assert atop(["compare", str(a), str(junk)]) == 2
    assert "not a readable eval state file" in capsys.readouterr().err


def test_the_worst_case_joins_every_finished_attack_at_a_radius_image_by_image():
    """--worst: an image is robust at a threat model only if it survived every finished headline
    attack there, across the sections of one file and across the files of one model; other radii,
    the sweep and unfinished sections stay out."""
    a = _state([1] * N, targets=[0, 1, 2, 3, 4, 5], survived=[1, 1, 1, 1, 0, 0])
    alone = "main/fgsm/linf/0.0313725/s1/e1/a0/i/after:"  # an attack alone, on every clean-correct image
    a["sections"][alone] = {"targets": list(range(N)), "done": {"0": _rules([1, 0, 1, 1, 1, 1, 1, 1])}}
    a["sections"]["main/pgd/l2/0.5/s50/e1/a0/c/after:"] = {"targets": [0, 1], "done": {"0": _rules([0, 1])}}
    a["sections"]["main/pgd/linf/0.0313725/s99/e1/a0/c/after:x"] = {
        "targets": [2, 3],
        "done": {},
    }  # unfinished
    a["sections"]["sweep/pgd/linf/0.0313725/s50/e1/a0/i/after:"] = {
        "targets": [0],
        "done": {"0": _rules([0])},
    }
    worst = worst_images([a])
    assert worst[("linf", 0.03137)].tolist() == [True, False, True, True] + [False] * 4
    assert worst[("l2", 0.5)].tolist() == [False, True] + [False] * 6
    # another file of the same model on the same images: joined per image
    b = _state([1] * N, targets=list(range(N)), survived=[1, 1, 0, 1, 1, 1, 1, 1])
    assert worst_images([a, b])[("linf", 0.03137)].tolist() == [True, False, False, True] + [False] * 4
    with pytest.raises(CompareError, match="seed"):
        worst_images([a, _state([1] * N, targets=[0], survived=[1], seed=1)])
    # only the attacks a partial report lists as finished: the state may have moved on since
    listed = {("pgd", "linf", 0.03137, 50, 1)}
    assert attack_of(SECTION) == ("pgd", "linf", 0.03137, 50, 1) and attack_of("main/clean") is None
    assert worst_images([a], [listed])[("linf", 0.03137)].tolist() == [True] * 4 + [False] * 4
    assert ("l2", 0.5) not in worst_images([a], [listed])
    # paired against another model: a row per threat model both attacked
    other = _state([1] * N, targets=list(range(N)), survived=[1, 1, 1, 1, 1, 1, 0, 0])
    (row,) = compare_worst([a], [other])
    assert row["section"] == "worst linf 0.03137" and row["a"] == pytest.approx(3 / 8)
    assert row["difference"] == pytest.approx(3 / 8 - 6 / 8)


def test_compare_command_worst(tmp_path, capsys):
    a, b = tmp_path / "a.state.json", tmp_path / "b.state.json"
    a.write_text(json.dumps(_state([1] * N, targets=list(range(N)), survived=[1] * 6 + [0] * 2)))
    b.write_text(json.dumps(_state([1] * N, targets=list(range(N)), survived=[1] * 4 + [0] * 4)))
    assert atop(["compare", str(a), str(b), "--worst"]) == 0
    assert "| `worst linf 0.03137` | 75.0% | 50.0% | +25.0" in capsys.readouterr().out
    assert atop(["compare", str(a), str(b), "--worst", "--pair", SECTION, SECTION]) == 2
    assert "do not go together" in capsys.readouterr().err


def _with_convergence(prefilter: bool) -> tuple[dict, dict]:
    """A state whose convergence variants ran on the first 4 clean-correct images (images 1, 2, 4,
    5: image 0 and 3 are answered wrongly), counted from that small subset as atop eval stores
    them; under a prefilter, only on the ones the prefilter (PGD-50) left robust."""
    st = _state([0, 1, 1, 0, 1, 1, 1, 1], targets=[1, 2, 4, 5, 6, 7], survived=[1, 1, 1, 1, 1, 0])
    proto = {"convergence_n": 4, "prefilter": {"steps": 50, "eot": 1} if prefilter else None}
    if prefilter:  # the prefilter left images 1, 4, 5 of the subset: the variants' targets 0..2
        st["sections"][SECTION]["done"] = {"0": _rules([1, 0, 1, 1, 1, 0])}
        name = "convergence-after-prefilter/pgd/linf/0.0313725/s100/e1/a0/i/after:"
        st["sections"][name] = {"targets": [0, 1, 2], "done": {"0": _rules([1, 1, 0])}}
    else:
        name = "convergence/pgd/linf/0.0313725/s100/e1/a0/i/after:"
        st["sections"][name] = {"targets": [0, 1, 2, 3], "done": {"0": _rules([1, 0, 1, 1])}}
    st["sections"]["convergence/pgd/linf/0.0313725/s50/e2/a0/i/after:"] = {
        "targets": [0, 1, 2, 3],
        "done": {},
    }  # unfinished: left out
    return st, proto


def test_with_convergence_joins_the_check_variants_at_their_images(tmp_path, capsys):
    """The variants' sections count images from the check's own subset (the first clean-correct
    ones, after the prefilter where there is one): joined into the worst case, each must land on
    its own image of the full subset, and nowhere else."""
    k = ("linf", 0.03137)
    st, proto = _with_convergence(prefilter=False)
    assert worst_images([st])[k].tolist() == [False, True, True, False, True, True, True, False]
    # the 2x variant broke its 2nd image: image 2 of the subset
    joined = worst_images([st], protocols=[proto])[k]
    assert joined.tolist() == [False, True, False, False, True, True, True, False]
    st, proto = _with_convergence(prefilter=True)
    assert worst_images([st])[k].tolist() == [False, True, False, False, True, True, True, False]
    # prefilter survivors in the check's subset: 1, 4, 5; the variant broke its 3rd, image 5
    joined = worst_images([st], protocols=[proto])[k]
    assert joined.tolist() == [False, True, False, False, True, False, True, False]
    # a protocol with no check, or no protocol: the same as without
    assert worst_images([st], protocols=[{"convergence_n": 0}])[k].tolist() == worst_images([st])[k].tolist()
    # the command: reads the finished report beside each state file; refuses without one
    a, b = tmp_path / "a.state.json", tmp_path / "b.state.json"
    a.write_text(json.dumps(st))
    b.write_text(json.dumps(_state([1] * N, targets=list(range(N)), survived=[1] * N)))
    assert atop(["compare", "--worst", "--with-convergence", str(a), str(b)]) == 2
    assert "needs the finished report beside it" in capsys.readouterr().err
    (tmp_path / "a.json").write_text(json.dumps({"protocol": proto}))
    (tmp_path / "b.json").write_text(json.dumps({"protocol": {"convergence_n": 0}}))
    assert atop(["compare", "--worst", "--with-convergence", str(a), str(b)]) == 0
    assert "| `worst linf 0.03137` | 37.5% | 100.0% |" in capsys.readouterr().out
    assert atop(["compare", "--with-convergence", str(a), str(b)]) == 2
    assert "goes with --worst" in capsys.readouterr().err
