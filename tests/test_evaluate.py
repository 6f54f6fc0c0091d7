"""``atop eval`` end to end on tiny trained models: undefended accuracy falls under PGD; results
fit the manifest's evaluation schema and merge across runs; the outputs (JSON, Markdown, SVG,
sanity block) are written; EOT 1 is refused on a randomized model; an interrupted run resumes
to the numbers of an uninterrupted one; the baselines are built from the same checkpoints; a
store version is attacked through its TorchScript file and ``--record`` publishes a new
version with the same files; the results table is generated from eval JSONs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from atop.cli import main as atop
from model_store import verify
from model_store.manifest import Evaluation
from tests.tiny_data import write_folder
from training.eval import cascade
from training.eval.command import EvalConfig, build_target, run

REPO = Path(__file__).resolve().parents[1]


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("eval")
    data = write_folder(base / "data", n_train=32, n_test=16)
    assert (
        atop(
            f"train classifier --data {data} --out {base}/c --depth 1 --width 8 --epochs 4 "
            "--batch-size 16 --lr 0.05 --threads 1".split()
        )
        == 0
    )
    assert (
        atop(
            f"train purifier --data {data} --out {base}/p --width 4 --disc-width 4 --epochs 1 "
            "--batch-size 16 --threads 1".split()
        )
        == 0
    )
    return data, base / "c" / "final.safetensors", base / "p" / "final.safetensors"


def test_pgd_breaks_the_undefended_classifier(trained):
    data, clf, _ = trained
    cfg = EvalConfig(data=str(data), classifier=str(clf), n=48, clean_n=48, eps=0.25, steps=10)
    res = run(cfg)
    rob = res["robust"][0]
    assert res["clean_accuracy"] > 0.9
    assert rob["accuracy"] < 0.2 and rob["eot"] == 1 and rob["attack"] == "pgd"
    checks = {c["name"]: c["status"] for c in res["sanity"]["checks"]}
    assert checks["undefended_pgd"] == "pass" and checks["randomness"] == "pass"
    assert not res["target"]["randomized"] and res["target"]["role"] == "undefended"


def test_the_undefended_check_runs_at_8_255_under_a_smaller_radius(trained):
    """At 1/255 a bare network may honestly keep a lot; the attack-works check (must fall to ~0%)
    is calibrated at 8/255 and runs there, with the protocol's step scaled, not at 1/255."""
    data, clf, _ = trained
    res = run(EvalConfig(data=str(data), classifier=str(clf), n=16, clean_n=16, eps=1 / 255, steps=5))
    check = next(c for c in res["sanity"]["checks"] if c["name"] == "undefended_pgd")
    assert check["values"]["eps"] == pytest.approx(8 / 255) and "8/255" in check["detail"]
    assert res["robust"][0]["eps"] == pytest.approx(1 / 255)  # the figure itself stays at 1/255
    # an l2-only protocol has no l-inf PGD to borrow: the check still runs, at 8/255
    res = run(EvalConfig(data=str(data), classifier=str(clf), n=16, clean_n=16, norm="l2", eps=0.1, steps=2))
    check = next(c for c in res["sanity"]["checks"] if c["name"] == "undefended_pgd")
    assert check["values"]["eps"] == pytest.approx(8 / 255)  # (the tiny model itself is robust there)


def test_pipeline_results_merge_and_fit_the_manifest(trained, tmp_path):
    data, clf, pur = trained
    out = tmp_path / "eval.json"
    common = dict(
        data=str(data), classifier=str(clf), purifier=str(pur), n=8, clean_n=16, samples=2, out=str(out)
    )
    run(EvalConfig(**common, steps=2, eot=2, sanity=False))
    run(EvalConfig(**common, attacks=("fgsm",), norm="l2", eps=0.5, eot=2, sanity=False))
    saved = json.loads(out.read_text())
    Evaluation.model_validate(saved)
    assert [(r["attack"], r["norm"]) for r in saved["robust"]] == [("pgd-eot", "Linf"), ("fgsm-eot", "L2")]
    for r in saved["robust"]:
        assert 0 <= r["accuracy"] <= 1 and r["eot"] == 2 and r["n_images"] == 8


def test_outputs_sanity_block_and_plot(trained, tmp_path):
    data, clf, pur = trained
    cfg = EvalConfig(
        data=str(data),
        classifier=str(clf),
        purifier=str(pur),
        attacks=("pgd", "autoattack-rand", "square", "flow"),
        eps=0.25,
        steps=3,
        eot=2,
        square_queries=30,
        sweep=True,
        convergence_n=4,
        n=8,
        clean_n=16,
        samples=2,
        out=str(tmp_path / "ap"),
    )
    res = run(cfg)
    names = {c["name"] for c in res["sanity"]["checks"]}
    assert {
        "randomness",
        "undefended_pgd",
        "convergence",
        "eps_monotone_linf",
        "eps_reaches_zero_l2",
    } <= names
    assert any(n.startswith("whitebox_le_blackbox_linf") for n in names)
    assert res["target"]["role"] == "ap" and res["target"]["randomized"]
    assert [r["attack"] for r in res["robust"]] == ["pgd-eot", "autoattack-rand", "square", "flow-eot"]
    assert res["robust"][2]["cascade_after"] == ["pgd-eot", "autoattack-rand"]
    assert res["cost"]["gradient_ms_per_image"] > 0 and res["sweep"]
    Evaluation.model_validate(json.loads((tmp_path / "ap.json").read_text()))
    md = (tmp_path / "ap.md").read_text()
    assert "| pgd-eot | Linf 63.8/255 |" in md and "## Sanity checks" in md
    assert ET.fromstring((tmp_path / "ap.svg").read_text()).tag.endswith("svg")
    assert (tmp_path / "ap.state.json").is_file()


def test_eot_1_is_refused_on_a_randomized_model(trained):
    data, clf, pur = trained
    cfg = EvalConfig(
        data=str(data), classifier=str(clf), purifier=str(pur), eot=1, n=4, clean_n=4, sanity=False
    )
    with pytest.raises(ValueError, match="randomized"):
        run(cfg)
    assert run(EvalConfig(**{**cfg.__dict__, "force": True, "steps": 1}))["robust"][0]["eot"] == 1


def test_an_interrupted_run_resumes_to_the_same_numbers(trained, tmp_path, monkeypatch):
    data, clf, pur = trained
    common = dict(data=str(data), classifier=str(clf), purifier=str(pur), attacks=("pgd", "square"))
    common |= dict(eps=0.25, steps=2, eot=2, square_queries=20, n=16, clean_n=8, samples=2, batch_size=4)
    common |= dict(sanity=False)
    reference = run(EvalConfig(**common, out=str(tmp_path / "ref")))
    real, calls, armed = cascade.run_attack, [], [True]

    def flaky(*a, **kw):
        calls.append(1)
        if armed[0] and len(calls) == 3:
            raise Killed("the machine went down")
        return real(*a, **kw)

    monkeypatch.setattr(cascade, "run_attack", flaky)
    with pytest.raises(Killed):
        run(EvalConfig(**common, out=str(tmp_path / "cut")))
    calls.clear()
    armed[0] = False
    resumed = run(EvalConfig(**common, out=str(tmp_path / "cut")))
    batches = sum(-(-r["attacked"] // 4) for r in reference["robust"])
    assert len(calls) == batches - 2  # the two finished batches are not attacked again
    for a, b in zip(reference["robust"], resumed["robust"], strict=True):
        assert (a["accuracy"], a["accuracy_single_draw"]) == (b["accuracy"], b["accuracy_single_draw"])
    calls.clear()
    again = run(EvalConfig(**common, out=str(tmp_path / "cut")))  # a finished state: nothing to attack
    assert not calls  # yet its report gives the attacks' time over every run, not this run's
    assert again["attack_wall_s"] == resumed["attack_wall_s"]
    assert again["attack_wall_s"] == pytest.approx(sum(r["wall_s"] for r in again["robust"]), abs=0.2)
    with pytest.raises(ValueError, match="different evaluation"):
        run(EvalConfig(**{**common, "seed": 1}, out=str(tmp_path / "cut")))


def test_reuse_takes_the_shared_attacks_from_another_run_of_the_same_evaluation(
    trained, tmp_path, monkeypatch
):
    """--reuse: a run whose protocol shares an attack with another run's state (same attack,
    budget and cascade) copies that attack's batches in and attacks only what is new, with the
    numbers it would have computed itself; a state of another evaluation is refused."""
    data, clf, pur = trained
    common = dict(data=str(data), classifier=str(clf), purifier=str(pur), eps=0.25, steps=2, eot=2)
    common |= dict(square_queries=20, n=16, clean_n=8, samples=2, batch_size=4, sanity=False)
    both = dict(common, attacks=("pgd", "square"))
    reference = run(EvalConfig(**both, out=str(tmp_path / "ref")))
    run(EvalConfig(**common, attacks=("pgd",), out=str(tmp_path / "pgd")))
    run(EvalConfig(**common, attacks=("pgd",), seed=1, out=str(tmp_path / "other")))
    real, calls = cascade.run_attack, []

    def counted(spec, *a, **kw):
        calls.append(spec.name)
        return real(spec, *a, **kw)

    monkeypatch.setattr(cascade, "run_attack", counted)
    reused = run(EvalConfig(**both, reuse=(str(tmp_path / "pgd.state.json"),), out=str(tmp_path / "re")))
    assert calls and set(calls) == {"square"}  # PGD's batches were copied, only Square attacked
    timeless = lambda res: [{k: v for k, v in r.items() if k != "wall_s"} for r in res["robust"]]  # noqa: E731
    assert timeless(reused) == timeless(reference) and reused["worst_case"] == reference["worst_case"]
    ref_sections = json.loads((tmp_path / "ref.state.json").read_text())["sections"]
    sections = json.loads((tmp_path / "re.state.json").read_text())["sections"]
    assert {k: v["done"].keys() for k, v in sections.items() if "done" in v} == {
        k: v["done"].keys() for k, v in ref_sections.items() if "done" in v
    }  # the run's own state is whole: it resumes without the other file
    with pytest.raises(ValueError, match="different evaluation"):
        run(EvalConfig(**both, reuse=(str(tmp_path / "other.state.json"),), out=str(tmp_path / "bad")))
    with pytest.raises(ValueError, match="not a readable eval state"):
        run(EvalConfig(**both, reuse=(str(tmp_path / "missing.json"),), out=str(tmp_path / "bad")))
    assert not (tmp_path / "bad.state.json").exists()


def test_a_state_file_has_one_writer_at_a_time(trained, tmp_path):
    """Two `atop eval` on one state file would each rewrite it from their own copy and drop the
    other's batches: the second is refused with one line, and the file is free again after."""
    data, clf, pur = trained
    cfg = EvalConfig(
        data=str(data), classifier=str(clf), purifier=str(pur), eps=0.25, steps=2, eot=2, n=8, clean_n=8,
        samples=2, batch_size=4, sanity=False, out=str(tmp_path / "one"),
    )  # fmt: skip
    with cascade.EvalState(tmp_path / "one.state.json", {}).claimed():
        with pytest.raises(ValueError, match=r"another atop eval \(pid \d+\) is writing"):
            run(cfg)
        assert atop(["eval", *f"--data {data} --classifier {clf} --purifier {pur} --n 8 --samples 2".split(),
                     "--out", str(tmp_path / "one")]) == 2  # fmt: skip
    assert run(cfg)["robust"][0]["attacked"] > 0


def test_a_prefilter_leaves_the_costly_attack_only_its_survivors(trained, tmp_path):
    """--prefilter: the cheap PGD runs first on every clean-correct image, the costly one only on
    the images it left robust; the costly figure is cumulative (after the prefilter) and so never
    above the prefilter's; the undefended check still uses the strongest PGD, not the cheap one;
    the convergence check's 2x variants attack only the prefilter's survivors in its subset."""
    data, clf, _ = trained
    common = dict(data=str(data), classifier=str(clf), n=48, clean_n=16, eps=0.25, steps=8, batch_size=16)
    res = run(EvalConfig(**common, prefilter=(4, 1), convergence_n=48, out=str(tmp_path / "pre")))
    conv = next(c for c in res["sanity"]["checks"] if c["name"] == "convergence")
    sections = json.loads((tmp_path / "pre.state.json").read_text())["sections"]
    (attacked,) = [
        len(v["targets"]) for k, v in sections.items() if k.startswith("convergence-after-prefilter/")
    ]
    assert f"after its 4x1 prefilter ({attacked} of 48 left)" in conv["detail"] and 0 < attacked < 48
    assert conv["values"]["n_images"] == 48 and conv["values"]["steps_x2"] <= attacked / 48
    v, paired = conv["values"], conv["values"]["paired"]["2x steps"]  # per image, on the same 48
    assert (
        round((v["base"] - v["steps_x2"]) * 48)
        == paired["broken_by_variant_only"] - paired["broken_by_1x_only"]
    )
    assert attacked == res["robust"][1]["attacked"]  # the subset is every image: the same survivors
    cheap, costly = res["robust"]
    assert (cheap["steps"], costly["steps"]) == (4, 8) and res["protocol"]["prefilter"] == {
        "steps": 4,
        "eot": 1,
    }
    assert cheap["cascade_after"] == [] and costly["cascade_after"] == ["pgd"]
    survivors = round(cheap["accuracy"] * 48)
    assert cheap["broken"] > 0 and costly["attacked"] == survivors < cheap["attacked"]
    assert costly["accuracy"] <= cheap["accuracy"]
    (worst,) = res["worst_case"]
    assert worst["accuracy"] == costly["accuracy"] and worst["attacks"] == ["pgd", "pgd"]
    check = next(c for c in res["sanity"]["checks"] if c["name"] == "undefended_pgd")
    assert check["values"]["steps"] == 8 and "PGD-8 " in check["detail"]
    # without the prefilter the costly attack alone attacks every clean-correct image
    alone = run(EvalConfig(**common, out=str(tmp_path / "plain")))["robust"][0]
    assert alone["attacked"] == cheap["attacked"]
    # a prefilter limited to another threat model leaves the l-inf attack (and its state) as it was
    before = json.loads((tmp_path / "plain.state.json").read_text())["sections"]
    later = run(EvalConfig(**common, prefilter=(4, 1, ("l2",)), out=str(tmp_path / "plain")))
    assert later["robust"] == [alone] and later["protocol"]["prefilter"]["threats"] == ["l2"]
    assert json.loads((tmp_path / "plain.state.json").read_text())["sections"].keys() == before.keys()
    with pytest.raises(ValueError, match="cascade"):
        run(EvalConfig(**common, prefilter=(1, 1), cascade=False))


def test_prefilter_only_runs_the_cheap_attacks_and_the_run_goes_on_from_them(trained, tmp_path, monkeypatch):
    """--prefilter-only: the prefilter alone is attacked (the costly PGD, and the cheap FGSM that
    cascades after it, are left), a partial report says so, and the run without the flag resumes
    from the same state: it attacks only what was left and ends with exactly the figures of a run
    that never stopped."""
    data, clf, _ = trained
    common = dict(data=str(data), classifier=str(clf), n=48, clean_n=16, eps=0.25, steps=8, batch_size=16)
    common |= dict(attacks=("pgd", "fgsm"), prefilter=(4, 1), sanity=False)
    reference = run(EvalConfig(**common, out=str(tmp_path / "ref")))

    def figures(entries):  # everything but the wall time
        return [{k: v for k, v in e.items() if k != "wall_s"} for e in entries]

    assert [(r["attack"], r["steps"]) for r in reference["robust"]] == [("pgd", 4), ("pgd", 8), ("fgsm", 1)]
    calls, real = [], cascade.run_attack
    monkeypatch.setattr(
        cascade, "run_attack", lambda spec, *a, **kw: calls.append(spec.steps) or real(spec, *a, **kw)
    )
    out = tmp_path / "cut"
    cheap = run(EvalConfig(**common, out=str(out), prefilter_only=True))
    assert set(calls) == {4}  # the prefilter's batches only
    assert cheap["partial"] and cheap["pending_attacks"] == ["pgd linf 8x1", "fgsm linf 1x1"]
    assert figures(cheap["robust"]) == figures(reference["robust"][:1])
    assert cheap["worst_case"][0]["accuracy"] >= reference["worst_case"][0]["accuracy"]  # an upper bound
    assert (tmp_path / "cut.partial.json").is_file() and not (tmp_path / "cut.json").exists()
    calls.clear()
    again = run(EvalConfig(**common, out=str(out), prefilter_only=True))  # nothing left to do cheaply
    assert not calls and again["robust"] == cheap["robust"]
    # a run whose cheap attacks all come from another run's state (--reuse) attacks nothing and
    # still has its state file and partial report
    calls.clear()
    taken = run(
        EvalConfig(
            **common,
            out=str(tmp_path / "taken"),
            prefilter_only=True,
            reuse=(str(tmp_path / "cut.state.json"),),
        )
    )
    assert (
        not calls
        and figures(taken["robust"]) == figures(cheap["robust"])
        and (tmp_path / "taken.state.json").is_file()
    )
    whole = run(EvalConfig(**common, out=str(out)))
    assert 8 in calls and set(calls) <= {8, 1}  # the prefilter was not attacked again
    assert (
        figures(whole["robust"]) == figures(reference["robust"])
        and whole["worst_case"] == reference["worst_case"]
    )
    with pytest.raises(ValueError, match="needs --prefilter"):
        run(EvalConfig(**(common | {"prefilter": None}), out=str(tmp_path / "none"), prefilter_only=True))
    with pytest.raises(ValueError, match="state file"):
        run(EvalConfig(**common, prefilter_only=True))


def test_prefilter_placement_and_step():
    """Before PGD l-inf, PGD l2 and flow of the full protocol, not before FGSM (alone, 1 step),
    AutoAttack (adaptive step) or Square (queries); the cheap step is the costly one's scaled to
    the fewer steps, at most eps/4."""
    from training.eval import protocol

    base = protocol.leekim()
    pre = base.with_prefilter(50, 8)
    names = [(s.name, s.norm, s.steps, s.eot) for s in pre.attacks]
    assert names == [
        ("fgsm", "linf", 1, 20),
        ("pgd", "linf", 50, 8),
        ("pgd", "linf", 200, 20),
        ("autoattack-rand", "linf", 100, 20),
        ("square", "linf", 5000, 1),
        ("pgd", "l2", 50, 8),
        ("pgd", "l2", 200, 20),
        ("flow", "flow", 50, 8),
        ("flow", "flow", 100, 20),
    ]
    assert all(s.cascade for s in pre.attacks if s.name in ("pgd", "flow"))
    linf, l2, flow = (s for s in pre.attacks if s.steps == 50)
    assert linf.alpha == pytest.approx(min(0.007 * 4, 8 / 255 / 4)) == pytest.approx(8 / 255 / 4)
    assert l2.alpha == pytest.approx(0.125)  # 0.1 x 4 = 0.4, capped at 0.5/4
    assert flow.alpha == pytest.approx(2.5 * 1.0 / 100 * 2)  # flow's default step, scaled
    assert pre.deterministic().prefilter == (50, 8) and pre.to_dict()["prefilter"] == {"steps": 50, "eot": 8}
    assert base.with_prefilter(500, 40).attacks == base.attacks  # nothing costs more than the prefilter
    # limited to some threat models (a run begun without it keeps its finished sections)
    flow_only = base.with_prefilter(50, 8, ("flow",))
    assert [(s.name, s.steps) for s in flow_only.attacks if s.name in ("pgd", "flow")] == [
        ("pgd", 200),
        ("pgd", 200),
        ("flow", 50),
        ("flow", 100),
    ]
    assert [s for s in flow_only.attacks if s.name != "flow"] == [s for s in base.attacks if s.name != "flow"]
    assert flow_only.to_dict()["prefilter"] == {"steps": 50, "eot": 8, "threats": ["flow"]}
    assert flow_only.prefiltered(flow_only.attacks[-1]) and not flow_only.prefiltered(base.convergence)
    assert pre.prefiltered(base.convergence) and not base.prefiltered(base.convergence)


def test_the_estimate_follows_the_cascade_when_given_a_survival_fraction():
    """--estimate: survival 1 is the upper bound (every attack on every image); with a survival
    fraction the first cascaded attack of each threat model runs on every image, the later ones
    (the costly PGD after its prefilter, AutoAttack, Square) and the convergence variants on that
    fraction; FGSM (alone) and the sweep keep their counts."""
    from training.eval import protocol

    pre = protocol.leekim(sweep_n=128, convergence_n=64).with_prefilter(50, 8)
    full, cut = (protocol.estimate(pre, 512, 2, 10.0, 3.0, survival=f) for f in (1.0, 0.1))
    assert all(r["images"] == 512 for r in full["rows"] if r["role"] == "main")
    images = [(r["attack"], r["images"]) for r in cut["rows"] if r["role"] == "main"]
    assert [i for _, i in images] == [512, 512, 51, 51, 51, 512, 51, 512, 51]
    assert [r["images"] for r in cut["rows"] if r["role"] == "convergence"] == [6, 6]
    assert [r["images"] for r in cut["rows"] if r["role"] == "sweep"] == [128] * len(pre.sweep)
    assert cut["hours"] < full["hours"]
    # without a prefilter the convergence variants run on all their images
    plain = protocol.estimate(protocol.leekim(convergence_n=64), 512, 2, 10.0, 3.0, survival=0.1)
    assert [r["images"] for r in plain["rows"] if r["role"] == "convergence"] == [64, 64]
    flow_only = protocol.leekim(convergence_n=64).with_prefilter(50, 8, ("flow",))  # l-inf PGD alone
    est = protocol.estimate(flow_only, 512, 2, 10.0, 3.0, survival=0.1)
    assert [r["images"] for r in est["rows"] if r["role"] == "convergence"] == [64, 64]


def test_a_partial_report_shows_the_finished_attacks_of_a_run_still_going(trained, tmp_path, monkeypatch):
    """--partial: a run stopped inside its second attack reports its first, with the numbers the
    whole run gives, lists the second as pending, never writes the state file (the run may be
    going on beside it) nor OUT.json (which marks a finished run); the table shows it as partial."""
    data, clf, pur = trained
    common = dict(data=str(data), classifier=str(clf), purifier=str(pur), attacks=("pgd", "square"))
    common |= dict(eps=0.25, steps=2, eot=2, square_queries=20, n=16, clean_n=8, samples=2, batch_size=4)
    reference = run(EvalConfig(**common, sanity=False, out=str(tmp_path / "ref")))
    pgd_batches = -(-reference["robust"][0]["attacked"] // 4)
    real, calls = cascade.run_attack, []

    def dies_in_square(*a, **kw):
        calls.append(1)
        if len(calls) == pgd_batches + 1:
            raise Killed("the machine went down")
        return real(*a, **kw)

    monkeypatch.setattr(cascade, "run_attack", dies_in_square)
    out = tmp_path / "cut"
    with pytest.raises(Killed):
        run(EvalConfig(**common, out=str(out)))
    state = (tmp_path / "cut.state.json").read_bytes()
    calls.clear()
    part = run(EvalConfig(**common, out=str(out), partial=True))
    assert not calls and (tmp_path / "cut.state.json").read_bytes() == state  # nothing attacked or written
    assert not (tmp_path / "cut.json").exists() and (tmp_path / "cut.partial.json").is_file()
    assert part["partial"] and part["pending_attacks"] == ["square linf 20x1"]
    (pgd,) = part["robust"]
    assert pgd["accuracy"] == reference["robust"][0]["accuracy"] and pgd["attack"] == "pgd-eot"
    assert part["worst_case"][0]["attacks"] == ["pgd-eot"]
    assert "Partial report" in (tmp_path / "cut.partial.md").read_text()
    table = subprocess.run(
        [sys.executable, "bench/results_table.py", "--row", f"AToP={tmp_path / 'cut.partial.json'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "partial: the run is still going" in table and "sanity checks failed" not in table
    # its worst case at that radius is an upper bound while Square is pending
    spec = importlib.util.spec_from_file_location("results_table", REPO / "bench" / "results_table.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    row = rt.merge([str(tmp_path / "cut.partial.json")])
    assert row["worst_case"][0]["_pending"] == ["square"]
    assert rt.worst_cell(row, "Linf", 0.25, True).startswith("≤ ") and "square pending" in rt.worst_cell(
        row, "Linf", 0.25, True
    )
    assert "no AutoAttack" in rt.worst_cell(row, "Linf", 0.25, True)  # it is not in this protocol
    row["worst_case"][0]["_pending"] = ["autoattack-rand"]  # pending is not missing
    assert "no AutoAttack" not in rt.worst_cell(row, "Linf", 0.25, True)
    # an attack finished at one radius is still pending at another with the same budget
    two = [
        {"name": "pgd", "norm": n, "eps": e, "steps": 2, "eot": 2}
        for n, e in (("linf", 8 / 255), ("l2", 0.5))
    ]
    fake = {"partial": True, "robust": [two[0] | {"norm": "Linf"}], "protocol": {"attacks": two}}
    assert rt.pending_at({"norm": "L2", "eps": 0.5}, fake) == ["pgd"]
    assert rt.pending_at({"norm": "Linf", "eps": 8 / 255}, fake) == []
    whole = rt.merge([str(tmp_path / "ref.json")])
    assert whole["worst_case"][0]["_pending"] == [] and not rt.worst_cell(
        whole, "Linf", 0.25, True
    ).startswith("≤")
    with pytest.raises(FileNotFoundError, match="no state file"):
        run(EvalConfig(**common, out=str(tmp_path / "never"), partial=True))
    # a refresh reuses the clean-set accuracy of the earlier partial report (same target and
    # clean set), and passes over the clean set again when that set changes
    from training.eval import evaluate as ev

    def no_clean_pass(*a, **kw):
        raise AssertionError("the clean set was evaluated again")

    monkeypatch.setattr(ev, "clean_accuracy", no_clean_pass)
    again = run(EvalConfig(**common, out=str(out), partial=True))
    assert {k: again[k] for k in ev.CLEAN_BLOCK} == {k: part[k] for k in ev.CLEAN_BLOCK}
    with pytest.raises(AssertionError, match="evaluated again"):
        run(EvalConfig(**(common | {"clean_n": 6}), out=str(out), partial=True))


def test_baselines_from_the_same_checkpoints(trained, tmp_path):
    from training.checkpoint import load_checkpoint, save_checkpoint
    from training.classifier import load_classifier

    data, clf, pur = trained
    base = dict(data=str(data), classifier=str(clf))
    assert build_target(EvalConfig(**base)).role == "undefended"
    rt = build_target(EvalConfig(**base, purifier=str(pur), defense="rt"))
    assert rt.role == "rt-only" and rt.randomized and rt.spec.kind == "rt2"
    assert build_target(EvalConfig(**base, defense="rt", rt="rt3")).spec.kind == "rt3"
    assert build_target(EvalConfig(**base, purifier=str(pur))).role == "ap"
    ck = load_checkpoint(clf)
    at_path = save_checkpoint(
        tmp_path / "at.safetensors",
        models={"classifier": load_classifier(clf)},
        config=ck.config | {"train": ck.config["train"] | {"adversarial": "pgd"}},
        step=1,
        epoch=0,
    )
    at = build_target(EvalConfig(data=str(data), classifier=str(at_path)))
    assert at.role == "at" and at.adversarially_trained and not at.randomized

    # A soup (or ensemble) records its members' training configs: adversarially trained when
    # every member was, so it gets the AT row's checks, not the undefended f's (PGD <= 5%).
    def soup_role(*members) -> str:
        out = tmp_path / f"soup{len(list(tmp_path.iterdir()))}"
        argv = ["train", "ensemble", "--soup", "--out", str(out)]
        assert atop(argv + [a for m in members for a in ("--member", str(m))]) == 0
        target = build_target(EvalConfig(data=str(data), classifier=str(out / "final.safetensors")))
        assert target.adversarially_trained == (target.role == "at")
        return target.role

    assert soup_role(at_path, at_path) == "at"
    assert soup_role(at_path, clf) == "undefended"  # one member was not adversarially trained
    x = torch.rand(2, 3, 32, 32)
    logits = rt.stochastic(torch.Generator().manual_seed(0))(x)
    assert logits.shape == (2, rt.classifier.cfg.num_classes)


@pytest.mark.slow  # one ONNX + TorchScript export, ~10 s
def test_store_version_is_attacked_and_recorded(trained, tmp_path):
    from training import export
    from training.transforms import sample_rt

    data, clf, pur = trained
    store = tmp_path / "store"
    export.run(export.ExportConfig(str(clf), str(pur), str(store), name="tiny"))  # 10 outputs
    cfg = EvalConfig(data=str(data), store=str(store), model="tiny", version=1, eps=0.25, steps=2, eot=2)
    target = build_target(cfg)
    eager = build_target(EvalConfig(data=str(data), classifier=str(clf), purifier=str(pur)))
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    d = sample_rt(target.spec, 3, torch.Generator().manual_seed(0))
    (g_store,) = torch.autograd.grad(target.pipeline(x, d.noise, d.masks).sum(), x)
    (g_eager,) = torch.autograd.grad(eager.pipeline(x, d.noise, d.masks).sum(), x)
    assert torch.allclose(g_store, g_eager, atol=1e-5)  # the deployed graph, exact gradients
    res = run(EvalConfig(**{**cfg.__dict__, "n": 8, "clean_n": 8, "samples": 2, "record": True}))
    assert res["target"]["source"]["version"] == 1 and res["recorded_as"]["version"] == 2
    v1, v2 = verify(store / "tiny" / "1"), verify(store / "tiny" / "2")
    assert v1["files"] == v2["files"] and v1["evaluation"] == {} and v2["serving"] == {"samples": 1}
    answer = v2["evaluation"]["clean_accuracy_answer"]
    assert answer["samples"] == 2 and answer["n_images"] == 8 and 0 <= answer["accuracy"] <= 1
    assert v2["evaluation"]["robust"][0]["attack"] == "pgd-eot" and "sanity" in v2["evaluation"]
    assert v2["provenance"]["derived_from"]["version"] == 1
    served = dict(cfg.__dict__, n=4, clean_n=4, samples=3, sanity=False, record=True, serve_samples=True)
    res = run(EvalConfig(**served))
    v3 = verify(store / "tiny" / "3")
    assert v3["serving"] == {"samples": 3} and v3["evaluation"]["scoring"]["samples"] == 3
    assert "serving.samples set to 3" in v3["provenance"]["derived_from"]["change"]
    with pytest.raises(ValueError, match="needs --record"):
        run(EvalConfig(**{**served, "record": False}))
    with pytest.raises(ValueError, match="store version"):
        run(EvalConfig(data=str(data), classifier=str(clf), n=4, clean_n=4, record=True, sanity=False))


@pytest.mark.slow  # one ONNX + TorchScript export, ~10 s
def test_a_run_resumes_on_the_store_version_of_its_checkpoint_elsewhere(trained, tmp_path, monkeypatch):
    """A state file begun on a training checkpoint resumes on a fresh machine that has only the
    store version exported from it (and the purifier in another folder): nothing is attacked
    again, the numbers are the same. Another classifier file is refused."""
    import shutil

    from training import export
    from training.checkpoint import load_checkpoint, save_checkpoint
    from training.classifier import load_classifier

    data, clf, pur = trained
    common = dict(data=str(data), attacks=("pgd",), eps=0.25, steps=2, eot=2, n=8, clean_n=8, samples=2)
    common |= dict(batch_size=4, sanity=False, out=str(tmp_path / "run"))
    first = run(EvalConfig(**common, classifier=str(clf), purifier=str(pur)))
    store = tmp_path / "store"
    export.run(export.ExportConfig(str(clf), "none", str(store), name="f"))
    elsewhere = tmp_path / "elsewhere" / "purifier.safetensors"
    elsewhere.parent.mkdir()
    shutil.copy(pur, elsewhere)
    calls = []
    real = cascade.run_attack
    monkeypatch.setattr(cascade, "run_attack", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    moved = EvalConfig(**common, classifier=str(store / "f" / "1"), purifier=str(elsewhere))
    again = run(moved)
    assert calls == []  # every batch came from the state file
    assert again["robust"][0]["accuracy"] == first["robust"][0]["accuracy"]
    assert again["target"]["source"]["classifier_sha256"] == first["target"]["source"]["classifier_sha256"]
    assert again["target"]["source"]["classifier"] == str((store / "f" / "1").resolve())
    fresh = run(EvalConfig(**{**moved.__dict__, "out": str(tmp_path / "fresh")}))
    assert fresh["robust"][0]["accuracy"] == first["robust"][0]["accuracy"]  # the same weights
    ck = load_checkpoint(clf)
    other = save_checkpoint(
        tmp_path / "other.safetensors",
        models={"classifier": load_classifier(clf)},
        config=ck.config,
        step=7,
        epoch=0,
    )
    with pytest.raises(ValueError, match="different evaluation"):
        run(EvalConfig(**common, classifier=str(other), purifier=str(pur)))


def test_results_table(trained, tmp_path):
    data, clf, pur = trained
    common = dict(data=str(data), classifier=str(clf), n=8, clean_n=8, samples=2, sanity=False)
    common |= dict(attacks=("pgd", "square"), eps=8 / 255, steps=2, eot=2, square_queries=10)
    run(EvalConfig(**common, out=str(tmp_path / "undefended")))
    run(EvalConfig(**{**common, "attacks": ("pgd",), "eps": 4 / 255}, out=str(tmp_path / "undefended-4")))
    run(EvalConfig(**common, purifier=str(pur), out=str(tmp_path / "ap")))
    # the same PGD at 4/255 again, then Square on its survivors: its worst case covers the first's
    run(EvalConfig(**{**common, "eps": 4 / 255}, out=str(tmp_path / "undefended-4sq")))
    # another 8/255 run whose attacks neither cover nor are covered by the main file's
    run(EvalConfig(**{**common, "attacks": ("fgsm",)}, out=str(tmp_path / "undefended-fgsm")))
    table = [sys.executable, str(REPO / "bench" / "results_table.py")]
    out = tmp_path / "results.md"
    undefended = f"undefended={tmp_path}/undefended.json+{tmp_path}/undefended-4.json"
    subprocess.run(
        table + ["--row", undefended, "--row", f"AP={tmp_path}/ap.json", "--out", str(out)],
        check=True,
        cwd=REPO,
    )
    text = out.read_text()
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in text.splitlines()
        if line.startswith("| ")
    }
    for label, name in (("undefended", "undefended"), ("AP", "ap")):
        r = json.loads((tmp_path / f"{name}.json").read_text())
        assert rows[label][1].startswith(
            f"{100 * r['clean_accuracy_answer']['accuracy']:.1f}% ["
        )  # served, with CI
        pgd = next(e for e in r["robust"] if e["name"] == "pgd")
        lo, hi = pgd["ci95"]
        budget = "2 steps" if label == "undefended" else "2×2"  # EOT counts only where there is randomness
        want = f"{100 * pgd['accuracy']:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}] ({budget}, 8 images)"
        assert rows[label][2] == want
        assert "†" in rows[label][5]  # Square ran on the points PGD left robust
    # the joined file gives the undefended row its 4/255 column; the AP row has none
    four = json.loads((tmp_path / "undefended-4.json").read_text())["worst_case"][0]
    assert rows["undefended"][9].startswith(f"{100 * four['accuracy']:.1f}% [")
    assert rows["AP"][9] == "not run" and "no AutoAttack" in rows["AP"][4]
    # several worst cases at one radius: exact when one run's attacks cover the others', else "≤"
    joined = "+".join(f"{tmp_path}/undefended{s}.json" for s in ("", "-4", "-4sq", "-fgsm"))
    joined_text = subprocess.run(
        table + ["--row", f"u={joined}"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    cells = next(line for line in joined_text.splitlines() if line.startswith("| u | ")).split(" | ")
    covering = json.loads((tmp_path / "undefended-4sq.json").read_text())["worst_case"][0]
    assert cells[9].startswith(f"{100 * covering['accuracy']:.1f}% [")
    main8 = json.loads((tmp_path / "undefended.json").read_text())["worst_case"][0]["accuracy"]
    fgsm8 = json.loads((tmp_path / "undefended-fgsm.json").read_text())["worst_case"][0]["accuracy"]
    assert cells[4].startswith(f"≤ {100 * min(main8, fgsm8):.1f}% [")
    assert "## Published figures" in text and "### Protocol" in text
    assert "(2 draws, torch, " in text  # cost cell names its draws and threads
    # two files of different targets (the bare f and AP) in one row are refused, not averaged
    bad = subprocess.run(
        table + ["--row", f"mixed={tmp_path}/undefended.json+{tmp_path}/ap.json"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode != 0 and "not the same evaluation target" in bad.stderr
    assert "Traceback" not in bad.stderr
    # --paired: the per-image worst case of the joined row minus AP's, from the state files
    from training.eval.compare import load_state, paired_difference, worst_images

    paired = subprocess.run(
        table + ["--row", f"u={joined}", "--row", f"AP={tmp_path}/ap.json", "--paired", "AP"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    states = [load_state(tmp_path / f"undefended{s}.state.json") for s in ("", "-4", "-4sq", "-fgsm")]
    u8 = worst_images(states)[("linf", round(8 / 255, 5))]
    ap8 = worst_images([load_state(tmp_path / "ap.state.json")])[("linf", round(8 / 255, 5))]
    d = paired_difference(u8, ap8)
    line = next(
        x for x in paired.split("### Paired differences against AP")[1].splitlines() if x.startswith("| u |")
    )
    assert line.split(" | ")[1] == (
        f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] "
        f"({100 * float(u8.float().mean()):.1f}% vs {100 * float(ap8.float().mean()):.1f}%)"
    )
    assert float(u8.float().mean()) <= min(main8, fgsm8)  # joined per image: at most either file's
    bad = subprocess.run(
        table + ["--row", f"AP={tmp_path}/ap.json", "--paired", "nope"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode != 0 and "--paired 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_docs_results_table_is_the_committed_jsons():
    """The full table in docs/results.md is what bench/results_table.py makes of the committed
    eval JSONs: a figure typed by hand, or a JSON re-run without regenerating, fails here."""
    r = subprocess.run(
        [
            sys.executable,
            "bench/results_table.py",
            "@docs/results_table.args",
            "--update",
            "docs/results.md",
            "--check",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--clean-n", "0"),
        ("--n", "0"),
        ("--samples", "0"),
        ("--steps", "-1"),
        ("--sweep-n", "-1"),
        ("--prefilter", "50"),
        ("--prefilter", "0x8"),
        ("--prefilter", "50x8:l3"),
        ("--survival", "0"),
        ("--survival", "1.5"),
    ],
)
def test_counts_out_of_range_are_usage_errors_before_any_work(flag, value, capsys):
    """--clean-n 0 used to run the whole attack, then die dividing by zero with a traceback."""
    with pytest.raises(SystemExit) as e:
        atop(["eval", "--data", "nowhere", "--store", "nowhere", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and ("must be" in err or "STEPSxEOT" in err), err
    assert "Traceback" not in err


def test_the_full_evaluation_recipe_queues_valid_commands_in_order(tmp_path):
    """recipes/eval_full.sh under DRY=1: every queued `atop eval` line parses with the real CLI;
    the order puts the main protocol of AToP over the AT f, AToP and AP over the standard f first,
    then v6 at the unseen l-inf radii (no figure yet), AToP over the AT f at the unseen radii,
    then the rest of the standard-f rows' unseen runs, and AP over the AT f (a row the issue does
    not name) last; the prefilter goes on every run, before flow only
    on the one begun without it (and its l2aa run); a run takes --reuse of the state files it
    shares attacks with, where they exist; a run with its JSON is skipped; PARTIAL=1 reports only runs with a state file,
    with the very flags of the run; by default a cheap pass (--prefilter-only) goes over the queue
    before the full one."""
    import shlex

    from atop.cli import build_parser

    script = REPO / "recipes" / "eval_full.sh"

    def queue(**env):
        e = {"PATH": "/usr/bin:/bin", "DRY": "1", "OUT": str(tmp_path)} | env
        out = subprocess.run(
            ["bash", str(script), "somewhere"], env=e, capture_output=True, text=True, check=True
        )
        return out.stdout.splitlines()

    def flags(line):
        argv = shlex.split(line)
        assert argv[:2] == ["atop", "eval"]
        return build_parser(argv[1:]).parse_args(argv[1:])

    both = queue()
    assert len(both) == 32  # the cheap pass over the queue, then the full one, in the same order
    cheap, lines = both[:16], both[16:]
    assert cheap == [line.replace(" --threads 1", " --prefilter-only --threads 1") for line in lines]
    assert all(flags(x).prefilter_only for x in cheap) and not any(flags(x).prefilter_only for x in lines)
    assert queue(CHEAP_FIRST="0") == lines and len(queue(PREFILTER="none")) == 16
    parsed = [flags(line) for line in lines]
    names = [Path(a.out).name for a in parsed]
    assert names[:5] == [
        "eval-atop-at-leekim",
        "eval-v6-leekim",
        "eval-ap-v6-leekim",
        "eval-v6-linf4",
        "eval-v6-linf12",
    ]
    assert names[5:8] == ["eval-atop-at-linf4", "eval-atop-at-linf12", "eval-atop-at-l2aa"]
    assert all("-v6-" in x for x in names[8:12])  # the rest of the standard-f rows' unseen runs
    assert names[12:] == ["eval-ap-at-leekim", "eval-ap-at-linf4", "eval-ap-at-linf12", "eval-ap-at-l2aa"]
    assert len(set(names)) == 16 and all(a.data == "somewhere" and a.n == 512 for a in parsed)
    pre = {Path(a.out).name: a.prefilter for a in parsed}
    assert pre.pop("eval-atop-at-leekim") == pre.pop("eval-atop-at-l2aa") == (50, 8, ("flow",))
    assert set(pre.values()) == {(50, 8)}
    assert all(a.prefilter is None for a in map(flags, queue(PREFILTER="none")))

    assert not any(a.reuse for a in parsed)  # no state files in OUT yet: nothing to reuse
    for donor in ("eval-v6-leekim", "eval-atop-at-leekim", "unseen-atopat-linf4"):
        (tmp_path / f"{donor}.state.json").write_text("{}")
    reuse = {Path(a.out).name: [Path(r).name for r in a.reuse] for a in map(flags, queue(CHEAP_FIRST="0"))}
    assert reuse["eval-v6-l2aa"] == ["eval-v6-leekim.state.json"]  # its l2 prefilter and PGD-200
    assert reuse["eval-atop-at-l2aa"] == ["eval-atop-at-leekim.state.json"]
    assert reuse["eval-atop-at-linf4"] == ["unseen-atopat-linf4.state.json"]
    assert sum(map(bool, reuse.values())) == 3
    # AToP over the AT f ran its leekim l2 PGD-200 without a prefilter: its l2aa run too
    assert flags(next(x for x in queue() if "eval-atop-at-l2aa " in x)).prefilter == (50, 8, ("flow",))
    (tmp_path / "eval-v6-leekim.json").write_text("{}")
    (tmp_path / "eval-ap-v6-leekim.state.json").write_text("{}")
    skipped = queue(CHEAP_FIRST="0")
    assert "[eval-v6-leekim] done, skipping" in skipped and len(skipped) == 16
    partials = [line for line in queue(PARTIAL="1") if line.startswith("atop eval")]
    # the runs with a state file and no JSON (eval-v6-leekim has its JSON now)
    assert [Path(flags(x).out).name for x in partials] == ["eval-atop-at-leekim", "eval-ap-v6-leekim"]
    run_line = next(line for line in lines if "eval-ap-v6-leekim " in line)
    assert partials[1] == run_line.replace("--threads 1", "--threads 1 --partial")
    assert flags(partials[1]).partial
