"""The HTTP surface in process (TestClient, lifespan on): every input form, options, errors, auth.

The model is the real tiny export (tests/conftest.py); a few tests swap in fake backends.
"""

from __future__ import annotations

import base64
import threading
import time

import numpy as np
import pytest
from fastapi import Request  # module level: the endpoints below name it in string annotations
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.service_fixtures import API_KEY, CIFAR10, bomb_png, encode, noise_image, png, republish


def make_settings(store, **kw) -> Settings:
    base = dict(
        store=store,
        intra_op_threads=1,
        inter_op_threads=1,
        spinning=False,
        poll_interval_s=0,
        max_delay_ms=2,
    )
    return Settings(**(base | kw))


@pytest.fixture
def client(service_store):
    with TestClient(create_app(make_settings(service_store, max_images=4, max_body_bytes=64 * 1024))) as c:
        yield c


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def err(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    assert body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_every_input_form_gives_the_same_answer(client):
    im = noise_image(seed=3)
    want = None
    forms = [
        {"content": encode(im, "PNG"), "headers": {"content-type": "image/png"}},
        {"content": encode(im, "BMP"), "headers": {"content-type": "image/bmp"}},
        {"content": encode(im, "WEBP", lossless=True), "headers": {"content-type": "image/webp"}},
        {"content": encode(im, "PNG"), "headers": {"content-type": "application/octet-stream"}},
        {"files": {"image": ("a.png", encode(im, "PNG"), "image/png")}},
        {"json": {"images": [b64(encode(im, "PNG"))]}},
        {"json": {"image": "data:image/png;base64," + b64(encode(im, "PNG"))}},
    ]
    for kw in forms:
        body = ok(client.post("/classify", params={"seed": 5, "top_k": 3}, **kw))
        assert body["model"] == {"name": "cifar10-atop", "version": 1} and body["seed"] == 5
        (res,) = body["results"]
        assert res["label"] in CIFAR10 and CIFAR10[res["class_index"]] == res["label"]
        probs = [t["probability"] for t in res["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and probs[0] == res["probability"]
        assert 0 <= res["suspicion"]["score"] <= 1 and isinstance(res["suspicion"]["suspicious"], bool)
        want = want or res["top_k"]
        assert np.allclose(
            [t["probability"] for t in res["top_k"]], [t["probability"] for t in want], atol=1e-5
        )
    jpeg = ok(client.post("/classify", content=encode(im, "JPEG"), headers={"content-type": "image/jpeg"}))
    assert jpeg["results"][0]["label"] in CIFAR10


def test_many_images_multipart_and_json_with_body_options(client):
    a, b = encode(noise_image(seed=1), "PNG"), encode(noise_image(seed=2), "PNG")
    files = [("images", ("a.png", a, "image/png")), ("images", ("b.png", b, "image/png"))]
    body = ok(client.post("/classify", files=files, data={"top_k": "2", "samples": "3", "seed": "9"}))
    assert [r["index"] for r in body["results"]] == [0, 1] and body["samples"] == 3
    assert all(len(r["top_k"]) == 2 for r in body["results"]) and sum(body["timing"]["batch_rows"]) >= 6
    js = ok(client.post("/classify", json={"images": [b64(a), b64(b)], "top_k": 2, "samples": 3, "seed": 9}))
    for x, y in zip(body["results"], js["results"], strict=True):
        assert x["label"] == y["label"] and abs(x["probability"] - y["probability"]) < 1e-5


def test_a_request_without_samples_gets_the_versions_default(tmp_path, tiny_version, caplog):
    root = tmp_path / "store"
    republish(root, tiny_version, serving={"samples": 3})
    im = b64(png(seed=4))
    with TestClient(create_app(make_settings(root))) as c:
        default = ok(c.post("/classify", json={"image": im, "seed": 8, "top_k": 10}))
        three = ok(c.post("/classify", json={"image": im, "seed": 8, "top_k": 10, "samples": 3}))
        one = ok(c.post("/classify", json={"image": im, "seed": 8, "top_k": 10, "samples": 1}))
    assert default["samples"] == 3 == sum(default["timing"]["batch_rows"]) and one["samples"] == 1
    assert default["results"] == three["results"] != one["results"]  # the same answer as samples=3
    with caplog.at_level("WARNING"), TestClient(create_app(make_settings(root, max_samples=2))) as c:
        assert ok(c.post("/classify", json={"image": im}))["samples"] == 2  # capped by the server
    assert "serving.samples=3 exceeds this server's max_samples=2" in caplog.text


def test_a_version_without_randomness_computes_one_draw_whatever_samples_says(tmp_path):
    """The identity RT (how a classifier that defends alone is exported): samples=8 would be 8
    identical rows; the service computes one and says so."""
    from tests.tiny_models import make_checkpoints
    from training import export

    root = tmp_path / "store"
    c, _ = make_checkpoints(tmp_path / "ck", "rt2", num_classes=10)
    export.run(export.ExportConfig(str(c), "none", str(root), name="cifar10-atop", formats=("onnx",)))
    im = b64(png(seed=4))
    with TestClient(create_app(make_settings(root))) as c:
        eight = ok(c.post("/classify", json={"image": im, "top_k": 10, "samples": 8}))
        again = ok(c.post("/classify", json={"image": im, "top_k": 10}))
    assert eight["samples"] == 1 == sum(eight["timing"]["batch_rows"])
    assert eight["results"] == again["results"]  # no randomness left: the same answer unseeded


def test_an_identity_rt_reuses_one_draw_and_a_random_one_draws_afresh():
    """make_rows computes an identity RT's draw once (the graph computes f(x) for any draw:
    tests/test_export.py); the shapes and masks are a fresh draw's, and a random RT still draws."""
    from atop import contract
    from service.predict import make_rows

    spec = {"kind": "rt1", "noise_std": 0.0, "block": 4, "missing": 0.0, "num_masks": 4, "image_size": 8}
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    rows, noise, masks = make_rows(x, spec, 2, None)
    fresh_noise, fresh_masks = contract.sample_rt(spec, 6, np.random.default_rng(5))
    assert rows.shape == (6, 3, 8, 8) and np.array_equal(rows[::2], x) and np.array_equal(rows[1::2], x)
    assert noise.shape == fresh_noise.shape and np.array_equal(masks, fresh_masks)
    assert np.array_equal(make_rows(x, spec, 2, None)[1], noise)  # the same draw, reused
    random = dict(spec, kind="rt2", noise_std=0.1)
    assert not np.array_equal(make_rows(x, random, 1, None)[1], make_rows(x, random, 1, None)[1])


def test_probabilities_and_request_id(client):
    r = client.post(
        "/classify?top_k=10", content=png(), headers={"content-type": "image/png", "x-request-id": "abc-123"}
    )
    body = ok(r)
    assert body["request_id"] == "abc-123" == r.headers["x-request-id"]
    probs = [t["probability"] for t in body["results"][0]["top_k"]]
    assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-5
    r = client.post(
        "/classify", content=png(), headers={"content-type": "image/png", "x-request-id": "bad id!"}
    )
    assert r.headers["x-request-id"] != "bad id!" and len(r.headers["x-request-id"]) == 32


def test_seed_reproduces_whatever_the_position_and_fresh_draws_differ(client):
    imgs = [b64(png(seed=s)) for s in (1, 2, 3)]
    alone = ok(client.post("/classify", json={"images": [imgs[2]], "seed": 42, "top_k": 10, "samples": 2}))
    mixed = ok(client.post("/classify", json={"images": imgs, "seed": 42, "top_k": 10, "samples": 2}))
    p1 = [t["probability"] for t in alone["results"][0]["top_k"]]
    p2 = [t["probability"] for t in mixed["results"][2]["top_k"]]
    assert np.allclose(p1, p2, atol=1e-5)
    draws = {
        tuple(
            round(t["probability"], 6)
            for t in ok(client.post("/classify?top_k=10", json={"image": imgs[0]}))["results"][0]["top_k"]
        )
        for _ in range(4)
    }
    assert len(draws) > 1  # unseeded requests draw fresh randomness


@pytest.mark.parametrize(
    "kw,status,code",
    [
        ({"content": b"junk", "headers": {"content-type": "image/png"}}, 400, "invalid_image"),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "no_images"),
        ({"json": {"images": ["***"]}}, 400, "invalid_base64"),
        ({"json": {"images": []}}, 400, "no_images"),
        ({"json": {"images": "x"}}, 400, "invalid_request"),
        ({"json": [1, 2]}, 400, "invalid_request"),
        ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        (
            {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}},
            400,
            "no_images",
        ),
        ({"content": bomb_png(5000, 5000), "headers": {"content-type": "image/png"}}, 413, "image_too_large"),
        ({"json": {"images": [b64(png())] * 5}}, 413, "too_many_images"),
        ({"content": b"x" * 70_000, "headers": {"content-type": "image/png"}}, 413, "body_too_large"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"hello"}, 415, "unsupported_media_type"),
        (
            {"content": encode(Image.new("RGB", (4, 4)), "GIF"), "headers": {"content-type": "image/png"}},
            415,
            "unsupported_image_format",
        ),
        ({"json": {"image": b64(png()), "top_k": 0}}, 422, "invalid_options"),
        ({"json": {"image": b64(png()), "top_k": 11}}, 422, "invalid_options"),
        ({"json": {"image": b64(png()), "samples": 17}}, 422, "invalid_options"),
        ({"json": {"image": b64(png()), "seed": -1}}, 422, "invalid_options"),
        ({"json": {"image": b64(png()), "sample": 2}}, 422, "invalid_options"),
        ({"json": {"image": b64(png()), "deadline_ms": 0}}, 422, "invalid_options"),
        (
            {"content": png(), "headers": {"content-type": "image/png"}, "params": {"top_k": "many"}},
            422,
            "invalid_options",
        ),
    ],
)
def test_bad_requests_get_the_right_status_and_code(client, kw, status, code):
    body = err(client.post("/classify", **kw), status, code)
    assert body["error"]["message"]


def test_multipart_limits(client):
    many = [("images", (f"{i}.png", png(w=8, h=8), "image/png")) for i in range(9)]
    err(client.post("/classify", files=many), 413, "too_many_images")
    err(client.post("/classify", files=many[:5]), 413, "too_many_images")
    ok(client.post("/classify", files=many[:4]))
    bad = {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}
    err(client.post("/classify", **bad), 400, "invalid_multipart")


def test_unknown_route_and_method(client):
    err(client.get("/nope"), 404, "not_found")
    err(client.get("/classify"), 405, "method_not_allowed")
    err(client.post("/v1/admin/versions/99/activate"), 404, "version_not_found")


def test_body_over_the_limit_is_refused_while_streaming(client):
    def chunks():
        for _ in range(20):
            yield b"x" * 8192  # no content-length: the limit is enforced on the stream

    err(
        client.post("/classify", content=chunks(), headers={"content-type": "image/png"}),
        413,
        "body_too_large",
    )


def test_api_key_and_admin_token(service_store):
    s = make_settings(service_store, api_key=API_KEY, admin_token="admin-token-xyz")
    with TestClient(create_app(s)) as c:
        post = {"content": png(), "headers": {"content-type": "image/png"}}
        err(c.post("/classify", **post), 401, "unauthorized")
        err(
            c.post(
                "/classify", content=png(), headers={"content-type": "image/png", "x-api-key": "wrong-key-0"}
            ),
            403,
            "forbidden",
        )
        ok(c.post("/classify", content=png(), headers={"content-type": "image/png", "x-api-key": API_KEY}))
        r = c.post("/v1/admin/reload")
        assert err(r, 401, "unauthorized") and r.headers["www-authenticate"] == "Bearer"
        err(c.get("/v1/admin/versions", headers={"authorization": "Bearer nope"}), 403, "forbidden")
        assert ok(c.get("/v1/admin/versions", headers={"authorization": "Bearer admin-token-xyz"}))["name"]
        ok(c.get("/v1/models"))  # public
        ok(c.get("/healthz"))


def test_queue_full_is_429_with_retry_after_and_deadline_is_504(service_store):
    s = make_settings(service_store, max_batch_size=32, queue_size=32, max_delay_ms=400)
    with TestClient(create_app(s)) as c:
        first = {}
        t = threading.Thread(
            target=lambda: first.update(r=c.post("/classify", json={"image": b64(png()), "samples": 16}))
        )
        t.start()
        time.sleep(0.15)  # the first request's 16 rows wait for the batch to fill
        r = c.post("/classify", json={"images": [b64(png())] * 2, "samples": 16})
        t.join()
        err(r, 429, "queue_full")
        assert int(r.headers["retry-after"]) >= 1 and first["r"].status_code == 200
        r = c.post("/classify", json={"image": b64(png()), "deadline_ms": 50})  # flush only at 400 ms
        err(r, 504, "deadline_exceeded")


def test_not_ready_is_503_and_internal_errors_are_json_500(client):
    class Empty:
        active = None

        def acquire(self):
            from service.registry import NotReady

            raise NotReady()

    # the lifespan's state, which every request's request.state copies (the routes read it there)
    state, real = client.app_state, dict(client.app_state)
    state["registry"] = Empty()
    r = client.post("/classify", content=png(), headers={"content-type": "image/png"})
    err(r, 503, "not_ready")
    assert r.headers["retry-after"]
    err(client.get("/readyz"), 503, "not_ready")
    state.update(real)

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("secret internals")

    state["metrics"] = Broken()
    r = client.post("/classify", content=png(), headers={"content-type": "image/png"})
    assert "secret internals" not in r.text
    err(r, 500, "internal_error")
    state.update(real)
    ok(client.post("/classify", content=png(), headers={"content-type": "image/png"}))  # still serving


def test_ops_endpoints(client):
    assert ok(client.get("/healthz")) == {"status": "ok"}
    assert ok(client.get("/readyz"))["model"]["version"] == 1
    ok(client.post("/classify", content=png(), headers={"content-type": "image/png"}))
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in (
        'atop_requests_total{route="/classify",status="200"}',
        "atop_request_duration_seconds_bucket",
        "atop_queue_wait_seconds_bucket",
        "atop_inference_seconds_bucket",
        "atop_batch_size_bucket",
        "atop_queue_depth",
        'atop_active_model_version{model="cifar10-atop"} 1.0',
        'atop_model_reloads_total{result="loaded"} 1.0',  # the first version: no swap
        'atop_model_reloads_total{result="swapped"} 0.0',
        "atop_attack_suspicions_total",
        "atop_images_classified_total 1.0",
    ):
        assert name in m.text, name
    models = ok(client.get("/v1/models"))
    assert models["active"]["version"] == 1 and models["active"]["manifest"]["classes"] == list(CIFAR10)
    assert models["active"]["raw_logits"] and models["versions"] == [
        {"version": 1, "status": "active", "reason": None, "evaluated": False, "classes": 10}
    ]
    assert ok(client.get("/openapi.json"))["paths"]["/classify"]["post"]
    assert client.get("/docs").status_code == 200


def test_small_images_decode_on_the_loop_and_large_ones_in_the_threadpool(client, monkeypatch):
    """A thread hop costs more than decoding a 32x32 image, so small requests skip it; a large
    image must never decode on the event loop, and neither must bytes whose header is odd."""
    from service.decode import INLINE_PIXELS, small_images
    from service.routes import classify as route

    hops = []
    real = route.run_in_threadpool

    async def spy(fn, *args):
        hops.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(route, "run_in_threadpool", spy)
    small = ok(client.post("/classify", content=png(32, 32), headers={"content-type": "image/png"}))
    assert hops == []
    big = encode(noise_image(256, 256), "JPEG", quality=50)  # under the fixture's 64 KiB body cap
    large = ok(client.post("/classify", content=big, headers={"content-type": "image/jpeg"}))
    assert hops == ["_prepare"]
    assert small["results"][0]["label"] and large["results"][0]["label"]
    side = int(INLINE_PIXELS**0.5)
    assert small_images([png(side, side)], 32) is not None and small_images([png(side, side + 1)], 32) is None
    assert small_images([png(96, 96), png(96, 96)], 32) is None  # the request's total counts
    assert small_images([b"not an image"], 32) is None and small_images([bomb_png(10**5, 10**5)], 32) is None


def test_a_direct_route_refuses_what_it_would_not_run():
    """/classify skips FastAPI's dependency solver (service.deps.DirectRoute): a dependency or
    parameter it does not run itself must fail when the app is built, never be skipped silently."""
    from fastapi import APIRouter, Depends, FastAPI

    from service.deps import DirectRoute, get_registry, require_api_key

    async def fine(request: Request):
        return None

    async def with_param(request: Request, top_k: int = 1):
        return None

    ok_router = APIRouter(route_class=DirectRoute)
    ok_router.post("/a", dependencies=[Depends(require_api_key)])(fine)
    FastAPI().include_router(ok_router)
    for build in (
        lambda r: r.post("/b", dependencies=[Depends(get_registry)])(fine),
        lambda r: r.post("/c")(with_param),
    ):
        with pytest.raises(TypeError, match="DirectRoute"):
            build(APIRouter(route_class=DirectRoute))
    router = APIRouter(route_class=DirectRoute)
    router.post("/d")(fine)
    app = FastAPI()
    app.include_router(router, dependencies=[Depends(get_registry)])
    with pytest.raises(TypeError, match="DirectRoute"):  # added by include_router: FastAPI
        TestClient(app).post("/d")  # resolves such a route when it first routes a request


def test_classify_answers_the_same_served_directly_or_through_the_router(service_store, monkeypatch):
    """/classify is served from the request middleware (DirectRoute.direct), skipping the router
    and the framework's inner layers; an app built without that must answer every request, good
    or bad, the same way: same status, error code, headers that matter, and answer."""
    import service.app as app_module

    settings = make_settings(service_store, api_key=API_KEY, max_images=4, max_body_bytes=64 * 1024)
    key = {"x-api-key": API_KEY}
    cases = [
        ("/classify?seed=3&top_k=3", png(), {"content-type": "image/png"} | key),
        ("/classify?seed=5", encode(noise_image(), "JPEG", quality=90), {"content-type": "image/jpeg"} | key),
        ("/classify", png(), {"content-type": "image/png"}),  # no key: 401
        ("/classify", png(), {"content-type": "image/png", "x-api-key": "wrong-key-0"}),  # 403
        ("/classify", b"junk", {"content-type": "image/png"} | key),  # 400
        ("/classify", png(), {"content-type": "text/plain"} | key),  # 415
        ("/classify?top_k=0", png(), {"content-type": "image/png"} | key),  # 422
        ("/classify", b"x" * (65 * 1024), {"content-type": "image/png"} | key),  # 413
    ]

    def run(app) -> list:
        out = []
        with TestClient(app) as c:
            for url, body, headers in cases:
                r = c.post(url, content=body, headers=headers)
                doc = r.json()
                doc.pop("request_id", None), doc.pop("timing", None)
                out.append((r.status_code, r.headers.get("www-authenticate"), doc))
            metrics = c.get("/metrics").text
        assert 'atop_requests_total{route="/classify",status="200"} 2.0' in metrics
        return out

    from service.deps import DirectRoute

    served, real = [], DirectRoute.direct

    async def spy(self, scope, receive, send):
        served.append(scope["path"])
        await real(self, scope, receive, send)

    monkeypatch.setattr(DirectRoute, "direct", spy)
    direct = run(create_app(settings))
    assert served == ["/classify"] * len(cases)  # every case took the direct path
    monkeypatch.setattr(app_module, "DirectRoute", type("NoDirectRoutes", (), {}))
    assert run(create_app(settings)) == direct and len(served) == len(cases)  # router this time
    assert [s for s, _, _ in direct] == [200, 200, 401, 403, 400, 415, 422, 413]
