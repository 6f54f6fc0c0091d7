"""POST /inspect and the /ui page in process (TestClient): the same answer, limits, errors,
batching and metrics as /classify, plus the pictures; the version card; the embedded v8 (no
image outputs, identity transform) described honestly; the page's assets served offline."""

from __future__ import annotations

import asyncio
import base64
import re

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from atop import contract
from model_store import default_store, get_version, list_versions
from service.app import create_app
from service.backends import load_backend
from service.batcher import Batcher
from service.decode import decode_image
from service.routes.ui import STATIC
from service.views import robustness_line
from tests import service_fixtures as sf
from tests.test_service_unit import make_settings as settings
from tests.test_service_unit import ok
from tests.ui_fixtures import expected_picture, picture, strip_views

ROUTES = ("/classify", "/inspect")
PNG = {"content-type": "image/png"}


@pytest.fixture
def client(service_store):
    with TestClient(create_app(settings(service_store, max_images=4, max_body_bytes=64 * 1024))) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def labels(scores: list[dict]) -> list[str]:
    return [t["label"] for t in scores]


def probs(scores: list[dict]) -> list[float]:
    return [t["probability"] for t in scores]


def test_inspect_answers_as_classify_and_draws_every_draw(client, tiny_version):
    blob = sf.encode(sf.noise_image(48, 40, seed=3), "PNG")  # not square: cropped and resized
    opts = {"seed": 5, "samples": 3, "top_k": 4}
    got = ok(client.post("/inspect", content=blob, headers={"content-type": "image/png"}, params=opts))
    want = ok(client.post("/classify", content=blob, headers={"content-type": "image/png"}, params=opts))
    (res,), (ref,) = got["results"], want["results"]
    assert got["model"] == want["model"] == {"name": sf.MODEL, "version": 1}
    assert (got["samples"], got["seed"]) == (3, 5) and sum(got["timing"]["batch_rows"]) == 3
    assert res["label"] == ref["label"] and labels(res["top_k"]) == labels(ref["top_k"])
    assert np.allclose(probs(res["top_k"]), probs(ref["top_k"]), atol=1e-6)
    assert res["suspicion"] == pytest.approx(ref["suspicion"])
    und = res["undefended_top_k"]
    assert len(und) == 4 and und[0]["label"] == res["suspicion"]["undefended_label"]
    assert probs(und) == sorted(probs(und), reverse=True)
    # the pictures are the graph's own outputs for this seed's draws, 8 bits
    x = decode_image(blob, size=32, max_pixels=10**6)
    views = res["views"]
    assert np.array_equal(picture(views["input"]), np.rint(np.moveaxis(x, 0, -1) * 255).astype(np.uint8))
    noise, masks = contract.sample_rt(tiny_version.manifest["rt"], 3, np.random.default_rng(5))
    sess = ort.InferenceSession(str(tiny_version.path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"image": np.repeat(x[None], 3, 0), "noise": noise, "masks": masks}
    transformed, purified = sess.run(list(contract.VIEW_OUTPUTS), feeds)
    assert len(views["transformed"]) == len(views["purified"]) == 3
    for j in range(3):
        t, g = picture(views["transformed"][j]), picture(views["purified"][j])
        assert t.shape == g.shape == (32, 32, 3)
        assert np.abs(t.astype(int) - expected_picture(transformed[j], masks[j])).max() <= 1
        assert np.abs(g.astype(int) - expected_picture(purified[j])).max() <= 1
        holes = masks[j, 0, 0] > 0.5
        assert holes.any() and (t[holes] == (255, 0, 255)).all()  # the mask is visible
    assert views["transformed"][0] != views["transformed"][1]  # three different draws
    card = got["card"]
    assert card["version"] == 1 and card["random"] and card["purifier"] and card["images"]
    assert card["notes"] == [] and card["transform"].startswith("RT2") and "unmeasured" in card["robustness"]


def test_seed_reproduces_the_pictures_and_fresh_seeds_differ(client):
    def views(seed):
        r = ok(client.post("/inspect", json={"image": b64(sf.png(seed=2)), "seed": seed}))
        return r["results"][0]["views"], r["results"][0]["top_k"]

    a, b, c = views(11), views(11), views(12)
    assert a == b and a[0]["transformed"] != c[0]["transformed"] and a[0]["input"] == c[0]["input"]


BAD = [
    ({"content": b"junk", "headers": {"content-type": "image/png"}}, 400, "invalid_image"),
    ({"json": {"images": []}}, 400, "no_images"),
    ({"json": {"images": ["***"]}}, 400, "invalid_base64"),
    ({"content": sf.bomb_png(5000, 5000), "headers": {"content-type": "image/png"}}, 413, "image_too_large"),
    ({"json": {"images": [b64(sf.png())] * 5}}, 413, "too_many_images"),
    ({"content": b"x" * 70_000, "headers": {"content-type": "image/png"}}, 413, "body_too_large"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    (
        {"content": sf.encode(Image.new("RGB", (4, 4)), "GIF"), "headers": {"content-type": "image/png"}},
        415,
        "unsupported_image_format",
    ),
    ({"json": {"image": b64(sf.png()), "samples": 17}}, 422, "invalid_options"),
    ({"json": {"image": b64(sf.png()), "top_k": 11}}, 422, "invalid_options"),
    ({"json": {"image": b64(sf.png()), "sample": 2}}, 422, "invalid_options"),
]


@pytest.mark.parametrize("kw,status,code", BAD)
def test_inspect_refuses_what_classify_refuses(client, kw, status, code):
    for route in ROUTES:
        r = client.post(route, **kw)
        assert r.status_code == status and r.json()["error"]["code"] == code, (route, r.text)
        assert r.json()["request_id"] == r.headers["x-request-id"] and "Traceback" not in r.text


def test_inspect_caps_images_times_samples_and_classify_does_not(service_store):
    """Each /inspect draw is two PNGs in the answer: images x samples has its own cap, checked
    before any work; the same request to /classify is fine."""
    with TestClient(create_app(settings(service_store, max_images=4, max_inspect_draws=6))) as c:
        body = {"images": [b64(sf.png(seed=i)) for i in range(2)], "samples": 3}
        ok(c.post("/inspect", json=body))  # 2 x 3 = 6 draws: at the cap
        before = c.get("/metrics").text
        r = c.post("/inspect", json=body | {"samples": 4})  # 8 draws
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_draws", r.text
        assert "2 images x 4 samples = 8" in r.json()["error"]["message"]
        assert ok(c.post("/classify", json=body | {"samples": 4}))["samples"] == 4
        # refused before the batcher: the only batch since `before` is /classify's
        after = c.get("/metrics").text
        batches = [sf.metric(t, "atop_batch_size_count") for t in (before, after)]
        assert batches[1] - batches[0] == 1 and batches[0] > 0


def test_api_key_guards_inspect_not_the_page(service_store):
    with TestClient(create_app(settings(service_store, api_key=sf.API_KEY))) as c:
        post = {"content": sf.png(), "headers": {"content-type": "image/png"}}
        assert c.post("/inspect", **post).status_code == 401
        bad = {"content-type": "image/png", "x-api-key": "wrong-key-0"}
        assert c.post("/inspect", content=sf.png(), headers=bad).status_code == 403
        ok(c.post("/inspect", content=sf.png(), headers=PNG | {"x-api-key": sf.API_KEY}))
        assert c.get("/ui").status_code == 200 and ok(c.get("/ui/info"))["api_key_required"] is True


def test_inspect_is_counted_in_the_same_metrics(client):
    before = client.get("/metrics").text
    ok(client.post("/inspect", json={"images": [b64(sf.png(seed=i)) for i in range(3)], "samples": 2}))
    after = client.get("/metrics").text

    def delta(name, **labels):
        return sf.metric(after, name, **labels) - sf.metric(before, name, **labels)

    assert delta("atop_requests_total", route="/inspect", status="200") == 1
    assert delta("atop_images_classified_total") == 3
    assert delta("atop_batch_size_sum") == 6 and delta("atop_inference_seconds_count") >= 1


class ViewFake:
    """A backend whose outputs identify their rows: logits = row value, t(x) = x, g(t(x)) = x/2."""

    name, device, has_raw, has_views = "fake", "cpu", True, True

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def run(self, image, noise, masks):
        self.calls.append(("run", len(image)))
        logits = np.repeat(image[:, :1, 0, 0], 3, axis=1)
        return logits, -logits

    def run_views(self, image, noise, masks):
        self.calls.append(("run_views", len(image)))
        logits, raw = self.run(image, noise, masks)
        self.calls.pop()
        return logits, raw, image[:, None].copy(), image / 2

    def close(self):
        pass


def test_batches_mix_inspect_and_classify_jobs_and_split_views_by_row():
    def rows(first, n):
        image = np.broadcast_to(
            np.arange(first, first + n, dtype=np.float32)[:, None, None, None], (n, 3, 4, 4)
        )
        return image.copy(), np.zeros((n, 3, 4, 4), np.float32), np.zeros((n, 1, 1, 4, 4), np.float32)

    async def go():
        fake = ViewFake()
        b = Batcher(fake, max_batch_size=8, max_delay_ms=200, queue_size=64)
        b.start()
        jobs = [b.submit(*rows(0, 3), 5.0, views=True), b.submit(*rows(3, 2), 5.0)]
        jobs.append(b.submit(*rows(5, 6), 5.0, views=True))
        done = [await b.wait(j) for j in jobs]
        await b.aclose()
        return fake.calls, done

    calls, (a, plain, split) = asyncio.run(go())
    assert calls == [("run_views", 8), ("run_views", 3)]  # 3 + 2 + 3 rows, then the rest of the split job
    assert plain.transformed is None and plain.purified is None and plain.logits[:, 0].tolist() == [3, 4]
    for job, first in ((a, 0), (split, 5)):
        want = np.arange(first, first + job.rows, dtype=np.float32)
        assert np.array_equal(job.transformed[:, 0, 0, 0, 0], want)
        assert np.array_equal(job.purified[:, 0, 0, 0], want / 2)
        assert np.array_equal(job.logits[:, 0], want)


class BrokenViews:
    """A real backend whose image outputs break the contract in one way."""

    def __init__(self, inner, how):
        self.inner, self.how = inner, how
        self.name, self.device, self.has_raw, self.has_views = inner.name, inner.device, inner.has_raw, True

    def run(self, *a):
        return self.inner.run(*a)

    def run_views(self, *a):
        logits, raw, transformed, purified = self.inner.run_views(*a)
        if self.how == "shape":
            purified = purified[:, :, :16]
        elif self.how == "holes":
            transformed = transformed + 0.5
        return logits, raw, transformed, purified

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("how,reason", [("shape", "purified has shape"), ("holes", "keeps pixels")])
def test_self_test_refuses_broken_image_outputs(service_store, tiny_version, how, reason):
    def loader(path, manifest, s):
        be = load_backend(path, manifest, s)
        return BrokenViews(be, how) if manifest["version"] == 2 else be

    with TestClient(create_app(settings(service_store), loader=loader)) as c:
        assert ok(c.get("/v1/models"))["active"]["selftest"]["views"] is True
        sf.republish(service_store, tiny_version)
        out = ok(c.post("/v1/admin/reload"))
        assert out["result"] == "refused" and reason in out["message"]


def test_a_version_exported_before_the_image_outputs_serves_and_says_so(tiny_version, tmp_path):
    old = strip_views(tiny_version, tmp_path / "old")
    with TestClient(create_app(settings(old.path.parents[1]))) as c:
        body = ok(c.post("/inspect", json={"image": b64(sf.png()), "seed": 1, "samples": 2}))
        ok(c.post("/classify", json={"image": b64(sf.png())}))
        info = ok(c.get("/ui/info"))
    views, card = body["results"][0]["views"], body["card"]
    assert views["transformed"] is None and views["purified"] is None
    assert picture(views["input"]).shape == (32, 32, 3)
    assert card["images"] is False and card["random"] and any("exported before" in n for n in card["notes"])
    assert body["samples"] == 2 and info["card"] == card


def test_before_any_version_loads_the_page_waits_and_inspect_is_503(tmp_path):
    with TestClient(create_app(settings(tmp_path / "empty", wait_for_model=True, poll_interval_s=30))) as c:
        info = ok(c.get("/ui/info"))
        r = c.post("/inspect", content=sf.png(), headers=PNG)
        assert c.get("/ui").status_code == 200
    assert info["ready"] is False and info["card"] is None and info["examples"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"]


def test_hot_swap_each_answer_names_the_version_that_served_it(client, service_store, tiny_version):
    first = ok(client.post("/inspect", json={"image": b64(sf.png())}))
    sf.republish(service_store, tiny_version)
    assert ok(client.post("/v1/admin/reload"))["result"] == "swapped"
    second = ok(client.post("/inspect", json={"image": b64(sf.png())}))
    assert (first["model"]["version"], first["card"]["version"]) == (1, 1)
    assert (second["model"]["version"], second["card"]["version"]) == (2, 2)
    assert ok(client.get("/ui/info"))["card"]["version"] == 2


EMBEDDED = [mv.version for mv in list_versions(default_store(), sf.MODEL)]


DEFAULT = max(EMBEDDED)  # the version `atop serve` serves out of the box


def test_the_embedded_default_is_described_as_it_is():
    """The default (an adversarially trained classifier exported with --purifier none) has no
    random transform and no purifier: one draw whatever is asked, t(x) = g(t(x)) = x when its
    graph returns them at all, and the card says so; its recorded robustness in a line, with
    the figures of its own manifest."""
    manifest = get_version(default_store(), sf.MODEL, DEFAULT).manifest
    has_views = "purified" in [o["name"] for o in manifest["graph"]["onnx"]["outputs"]]
    s = settings(default_store(), pin_version=DEFAULT, max_batch_size=4, queue_size=64)
    with TestClient(create_app(s)) as c:
        blob = (STATIC / "samples" / "cat.png").read_bytes()
        body = ok(c.post("/inspect", content=blob, headers=PNG, params={"samples": 4}))
        info = ok(c.get("/ui/info"))
    res, card = body["results"][0], body["card"]
    cat = np.asarray(Image.open(STATIC / "samples" / "cat.png"))
    assert body["samples"] == 1 and np.array_equal(picture(res["views"]["input"]), cat)
    if has_views:  # the identity transform and no purifier: both pictures are x itself
        assert np.array_equal(picture(res["views"]["purified"][0]), cat)
    else:
        assert res["views"]["transformed"] is None and res["views"]["purified"] is None
    assert card == info["card"] and card["version"] == DEFAULT and not card["random"]
    assert card["purifier"] is False and card["transform"] == "identity: no noise, no masks"
    assert card["images"] is has_views
    assert any("no purifier" in n for n in card["notes"])
    clean = manifest["evaluation"]["clean_accuracy"]
    assert card["robustness"].startswith(
        f"{100 * clean:.1f}% clean (10,000 images); robust (worst attack, 512 images)"
    )


def test_robustness_line_states_the_protocol():
    assert "unmeasured" in robustness_line({}) and "unmeasured" in robustness_line(None)
    ev = {
        "clean_accuracy": 0.861,
        "n_images": 1000,
        "robust": [
            dict(attack="pgd", norm="Linf", eps=8 / 255, steps=50, eot=8, n_images=256, accuracy=0.07),
            dict(attack="square", norm="Linf", eps=8 / 255, steps=5000, eot=1, n_images=256, accuracy=0.12),
            dict(attack="pgd", norm="L2", eps=0.5, steps=20, eot=4, n_images=128, accuracy=0.48),
        ],
    }
    assert robustness_line(ev) == (
        "86.1% clean (1,000 images); robust (worst attack): ℓ∞ 8/255: 7.0% (pgd-50 EOT 8, square-5000; "
        "256 images) · ℓ2 0.5: 48.0% (pgd-20 EOT 4; 128 images)"
    )


def test_openapi_documents_inspect_and_the_page_info(client):
    spec = ok(client.get("/openapi.json"))
    post = spec["paths"]["/inspect"]["post"]
    schema = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/InspectResponse")
    assert {"400", "413", "415", "422", "429", "503", "504"} <= set(post["responses"])
    assert {"image/png", "multipart/form-data", "application/json"} <= set(post["requestBody"]["content"])
    schemas = spec["components"]["schemas"]
    assert {"ImageViews", "InspectResult", "VersionCard"} <= set(schemas)
    assert "undefended_top_k" in schemas["InspectResult"]["properties"] and "/ui/info" in spec["paths"]
    assert "/ui" not in spec["paths"] and "/" not in spec["paths"]


def test_the_page_is_served_from_the_package_and_needs_nothing_else(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "ui"
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    text = {p.name: p.read_text() for p in STATIC.glob("*.*")}
    for name, body in text.items():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body, re.I), f"{name} links outside"
        assert "@import" not in body and "url(" not in body
    refs = re.findall(r'(?:src|href)="([^"#]+)"', text["index.html"])
    assert refs and all(not ref.startswith(("/", "http")) for ref in refs)
    for ref in refs:
        if ref.startswith("ui/static/"):
            assert client.get("/" + ref).status_code == 200, ref
    assert sum(len(b.encode()) for b in text.values()) < 40_000  # small: no framework, no build
    info = ok(client.get("/ui/info"))
    assert info["examples"] and len(info["examples"]) <= 8
    for name in info["examples"]:
        r = client.get(f"/ui/static/samples/{name}")
        assert r.status_code == 200 and len(r.content) < 4096
        assert Image.open(STATIC / "samples" / name).size == (32, 32)
    assert info["max_samples"] == 16 and info["ready"] and info["card"]["version"] == 1
