"""Versions and hot swap in process: verify, self-test, robustness gate, pin and roll back, the
store watcher, leases across a swap; plus settings, the CLI, the TorchScript backend, and the
promise that serving imports no torch."""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service import cli
from service.app import create_app
from service.backends import load_backend
from service.metrics import Metrics
from service.registry import Registry
from service.selftest import robustness_regressions
from service.settings import Settings
from tests.service_fixtures import REPO, corrupt, metric, png, republish
from tests.test_service_unit import err, make_settings, ok

ADMIN = {"authorization": "Bearer admin-token-xyz"}


def classify(c, **params) -> dict:
    return ok(c.post("/classify", params=params, content=png(), headers={"content-type": "image/png"}))


def robust(acc: float) -> dict:
    row = {"attack": "apgd-ce", "norm": "Linf", "eps": 8 / 255, "steps": 10, "eot": 4, "n_images": 8}
    return {"clean_accuracy": 0.8, "n_images": 8, "robust": [row | {"accuracy": acc}]}


def test_reload_swaps_refuses_a_corrupt_candidate_and_keeps_serving(service_store, tiny_version, caplog):
    s = make_settings(service_store, admin_token="admin-token-xyz")
    with TestClient(create_app(s)) as c:
        assert classify(c)["model"]["version"] == 1
        assert ok(c.post("/v1/admin/reload", headers=ADMIN))["result"] == "unchanged"
        republish(service_store, tiny_version)
        out = ok(c.post("/v1/admin/reload", headers=ADMIN))
        assert out["result"] == "swapped" and out["active_version"] == 2
        assert classify(c)["model"]["version"] == 2
        bad = republish(service_store, tiny_version)
        corrupt(bad)
        with caplog.at_level(logging.WARNING, logger="atop.service"):
            out = ok(c.post("/v1/admin/reload", headers=ADMIN))
        assert out["result"] == "refused" and out["active_version"] == 2 and "model.onnx" in out["message"]
        assert any("refused cifar10-atop v3" in r.getMessage() for r in caplog.records)
        assert classify(c)["model"]["version"] == 2  # the old version keeps serving
        models = ok(c.get("/v1/models"))
        assert models["active"]["version"] == 2 and models["last_reload"]["result"] == "refused"
        v3 = [v for v in models["versions"] if v["version"] == 3][0]
        assert v3["status"] == "refused" and "sha256" in v3["reason"]
        text = c.get("/metrics").text
        assert metric(text, "atop_model_reloads_total", result="refused") == 1
        assert metric(text, "atop_model_reloads_total", result="loaded") == 1  # at startup
        assert metric(text, "atop_model_reloads_total", result="swapped") == 1
        assert metric(text, "atop_active_model_version", model="cifar10-atop") == 2
        # a refused version is not retried by every poll, only when asked for explicitly
        assert ok(c.post("/v1/admin/reload", headers=ADMIN))["result"] == "unchanged"
        err(c.post("/v1/admin/versions/3/activate", headers=ADMIN), 409, "version_refused")


def test_activate_pins_and_rolls_back_and_unpin_moves_forward(service_store, tiny_version):
    republish(service_store, tiny_version)
    with TestClient(create_app(make_settings(service_store))) as c:
        assert classify(c)["model"]["version"] == 2
        assert ok(c.post("/v1/admin/versions/1/activate"))["result"] == "swapped"
        assert classify(c)["model"]["version"] == 1 and ok(c.get("/v1/models"))["pinned"] == 1
        republish(service_store, tiny_version)
        assert ok(c.post("/v1/admin/reload"))["message"] == "pinned to v1"
        assert ok(c.post("/v1/admin/versions/1/activate"))["result"] == "unchanged"
        out = ok(c.post("/v1/admin/reload", params={"unpin": True}))
        assert out["result"] == "swapped" and out["active_version"] == 3
        assert ok(c.get("/v1/models"))["pinned"] is None


class Broken:
    """Wraps a real backend and breaks it in one way."""

    def __init__(self, inner, how: str):
        self.inner, self.how = inner, how
        self.name, self.device, self.has_raw = inner.name, inner.device, inner.has_raw

    def run(self, image, noise, masks):
        logits, raw = self.inner.run(image, noise, masks)
        if self.how == "nan":
            logits[0, 0] = np.nan
        elif self.how == "batch":
            logits = logits + len(image)  # a row's answer depends on its batch
        elif self.how == "shape":
            logits = logits[:, :5]
        return logits, raw

    def close(self):
        self.inner.close()


@pytest.mark.parametrize(
    "how,reason", [("nan", "NaN"), ("batch", "depends on the rest of its batch"), ("shape", "shape")]
)
def test_self_test_refuses_a_broken_candidate(service_store, tiny_version, how, reason):
    def loader(path, manifest, settings):
        be = load_backend(path, manifest, settings)
        return Broken(be, how) if manifest["version"] == 2 else be

    with TestClient(create_app(make_settings(service_store), loader=loader)) as c:
        republish(service_store, tiny_version)
        out = ok(c.post("/v1/admin/reload"))
        assert out["result"] == "refused" and reason in out["message"]
        assert classify(c)["model"]["version"] == 1


def test_robustness_gate_on_automatic_swaps_only(tmp_path, tiny_version):
    store = tmp_path / "store"
    republish(store, tiny_version, evaluation=robust(0.50))
    with TestClient(create_app(make_settings(store))) as c:
        republish(store, tiny_version, evaluation=robust(0.40))
        out = ok(c.post("/v1/admin/reload"))
        assert out["result"] == "refused" and "0.4000 < 0.5000" in out["message"]
        assert ok(c.post("/v1/admin/versions/2/activate"))["result"] == "swapped"  # explicit override


def test_robustness_gate_compares_like_with_like():
    def manifest(k: int | None, acc: float, single: float | None = None) -> dict:
        ev = robust(acc)
        if single is not None:
            ev["robust"][0]["accuracy_single_draw"] = single
        return {"evaluation": ev | ({"scoring": {"samples": k}} if k else {})}

    assert robustness_regressions(manifest(2, 0.3), manifest(2, 0.5), 0.01)  # same vote size
    assert not robustness_regressions(manifest(2, 0.3), manifest(8, 0.5), 0.01)  # not comparable
    worse = robustness_regressions(manifest(2, 0.6, 0.30), manifest(8, 0.5, 0.40), 0.01)
    assert worse == ["apgd-ce Linf eps=0.031373: 0.3000 < 0.4000 (single draw; votes of 2 and 8 differ)"]
    assert not robustness_regressions(manifest(2, 0.3, 0.45), manifest(8, 0.5, 0.40), 0.01)


def test_watcher_picks_up_a_new_version(service_store, tiny_version):
    with TestClient(create_app(make_settings(service_store, poll_interval_s=0.1))) as c:
        republish(service_store, tiny_version)
        end = time.monotonic() + 10
        while time.monotonic() < end and ok(c.get("/readyz"))["model"]["version"] != 2:
            time.sleep(0.05)
        assert classify(c)["model"]["version"] == 2


def test_startup_skips_bad_versions_and_fails_without_any(service_store, tiny_version, tmp_path):
    corrupt(republish(service_store, tiny_version))
    with TestClient(create_app(make_settings(service_store))) as c:
        assert classify(c)["model"]["version"] == 1
    with TestClient(create_app(make_settings(service_store, pin_version=1))) as c:
        assert ok(c.get("/v1/models"))["pinned"] == 1
    with (
        pytest.raises(RuntimeError, match="no loadable version"),
        TestClient(create_app(make_settings(service_store, pin_version=2))),
    ):
        pass
    with (
        pytest.raises(RuntimeError, match="no model 'cifar10-atop'"),
        TestClient(create_app(make_settings(tmp_path / "empty"))),
    ):
        pass


def test_leased_version_finishes_its_request_after_a_swap(service_store, tiny_version):
    async def go():
        reg = Registry(make_settings(service_store), Metrics("cifar10-atop"))
        await reg.start()
        old = reg.acquire()
        republish(service_store, tiny_version)
        assert (await reg.reload()).result == "swapped" and reg.active.version == 2
        x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
        from atop.contract import sample_rt

        noise, masks = sample_rt(old.facts.spec, 2, np.random.default_rng(0))
        job = await old.batcher.infer(x, noise, masks, timeout_s=5)  # still served by v1
        assert job.done == 2 and old.retired and old.backend.session is not None
        reg.release(old)
        await asyncio.sleep(0.2)
        assert old.backend.session is None  # closed once its last request finished
        await reg.aclose()

    asyncio.run(go())


def test_torchscript_backend_matches_onnx(service_store):
    answers = []
    for backend in ("onnx", "torchscript"):
        with TestClient(create_app(make_settings(service_store, backend=backend))) as c:
            body = classify(c, seed=7, samples=2, top_k=10)
            assert ok(c.get("/v1/models"))["active"]["backend"] == backend
            answers.append(body["results"][0])
    a, b = answers
    assert a["label"] == b["label"] and b["suspicion"] is not None
    assert np.allclose(
        [t["probability"] for t in a["top_k"]], [t["probability"] for t in b["top_k"]], atol=1e-4
    )


def test_settings_fail_fast_and_read_the_environment(monkeypatch):
    with pytest.raises(ValidationError, match="queue_size"):
        Settings(max_batch_size=64, queue_size=32)
    with pytest.raises(ValidationError):
        Settings(max_batch_size=0)
    with pytest.raises(ValidationError, match="at least 8"):
        Settings(api_key="short")
    with pytest.raises(ValidationError):
        Settings(backend="tensorflow")
    monkeypatch.setenv("ATOP_MAX_BATCH_SIZE", "48")
    monkeypatch.setenv("ATOP_SPINNING", "false")
    s = Settings()
    assert s.max_batch_size == 48 and s.spinning is False


def test_cli_flags_mirror_every_setting(monkeypatch):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    helps = {a.dest: a.help for a in p._actions if a.dest != "help"}
    assert set(helps) == set(Settings.model_fields) and all(helps.values())
    monkeypatch.setenv("ATOP_PORT", "9999")
    args = p.parse_args(["--max-batch-size", "8", "--queue-size", "16", "--no-spinning", "--backend", "onnx"])
    s = cli.settings_from_args(args)
    assert (s.max_batch_size, s.queue_size, s.spinning, s.port) == (8, 16, False, 9999)
    with pytest.raises(ValueError):
        cli.settings_from_args(p.parse_args(["--max-batch-size", "64", "--queue-size", "8"]))


NO_TORCH = """
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
s = Settings(store=sys.argv[1], intra_op_threads=1, spinning=False, poll_interval_s=0)
with TestClient(create_app(s)) as c:
    r = c.post("/classify", content=open(sys.argv[2], "rb").read(), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training", "onnx"))
assert not bad, bad
print("ok")
"""


def test_serving_imports_no_torch_and_no_training_code(service_store, tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(png())
    res = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(service_store), str(img)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_reference_logits_from_the_exporter_are_checked(tiny_version):
    from atop.contract import sample_rt
    from service.backends import OnnxBackend
    from service.selftest import Refused, known_answer, manifest_facts

    facts = manifest_facts(tiny_version.manifest)
    be = OnnxBackend(tiny_version.path / "model.onnx", intra_op_threads=1, spinning=False)
    rng, refs = np.random.default_rng(3), []
    for b in (1, 3):  # the exporter's parity draw: images, then sample_rt, from one generator
        x = rng.random((b, 3, 32, 32), dtype=np.float32)
        refs.append(be.run(x, *sample_rt(facts.spec, b, rng))[0].tolist())
    parity = {"seed": 3, "batches": [1, 3], "tolerance": 1e-4, "reference_logits": refs}
    assert known_answer(be, facts, parity) is True
    assert known_answer(be, facts, {"seed": 3, "batches": [1]}) is None  # nothing recorded
    refs[1][2][0] += 0.1
    with pytest.raises(Refused, match="reference logits not reproduced"):
        known_answer(be, facts, parity)


def test_a_version_swapped_out_is_freed_although_startup_froze_the_heap(service_store, tiny_version):
    """Startup calls gc.freeze() (service/app.py): whatever it built is out of the collector's
    reach. The first version is built at startup, so once a swap retires it, it must still be
    freed — by reference counting, with no cycle left behind for the frozen heap to keep."""
    import gc
    import weakref

    s = make_settings(service_store, admin_token="admin-token-xyz")
    with TestClient(create_app(s)) as c:
        registry = c.app_state["registry"]
        assert classify(c)["model"]["version"] == 1
        first = weakref.ref(registry.active.backend)
        assert first() is not None
        republish(service_store, tiny_version)
        assert ok(c.post("/v1/admin/reload", headers=ADMIN))["result"] == "swapped"
        assert classify(c)["model"]["version"] == 2
        for _ in range(50):  # the retired slot closes once its last lease is released
            gc.collect()
            if first() is None:
                break
            time.sleep(0.05)
        assert first() is None, gc.get_referrers(first())
