"""``atop serve`` as a real uvicorn process on loopback, driven over HTTP by httpx.

Two servers share the module: ``main`` (normal limits, admin token, fast store watcher) for the
input forms, batching, seeds and the hot swap under load; ``strict`` (tight limits, API key, a
long batch delay, JSON logs, started on an empty store with --wait-for-model) for every error
status.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import service_fixtures as sf

pytestmark = pytest.mark.slow
PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_version):
    base = tmp_path_factory.mktemp("serve")
    main_store, strict_store = base / "main", base / "strict"
    sf.republish(main_store, tiny_version)
    common = ["--intra-op-threads", "1", "--inter-op-threads", "1", "--no-spinning"]
    main = sf.ServiceProcess(
        base / "main.log",
        *common,
        *("--store", str(main_store), "--admin-token", sf.ADMIN_TOKEN, "--poll-interval-s", "0.25"),
        *("--max-batch-size", "32", "--max-delay-ms", "15"),
    )
    strict = sf.ServiceProcess(
        base / "strict.log",
        *common,
        *("--store", str(strict_store), "--wait-for-model", "--poll-interval-s", "0.2"),
        *("--api-key", sf.API_KEY, "--max-body-bytes", "65536", "--max-pixels", "1000000"),
        *("--max-images", "4", "--max-samples", "16", "--max-batch-size", "32", "--queue-size", "32"),
        *("--max-delay-ms", "400", "--log-format", "json"),
    )
    procs = {"main": main, "strict": strict, "main_store": main_store, "early": {}}
    try:
        main.wait_ready()
        end = time.monotonic() + 60  # strict is live but has no model: 503 until one appears
        while True:
            try:
                r = httpx.get(strict.url + "/readyz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < end and strict.proc.poll() is None, strict.log()[-2000:]
                time.sleep(0.1)
        procs["early"]["readyz"] = r
        procs["early"]["classify"] = httpx.post(
            strict.url + "/classify", content=sf.png(), headers=PNG | {"x-api-key": sf.API_KEY}
        )
        sf.republish(strict_store, tiny_version)
        strict.wait_ready()
        yield procs
    finally:
        for p in (main, strict):  # graceful: uvicorn re-raises the SIGTERM after shutting down
            assert p.stop() in (0, -15) and "Application shutdown complete" in p.log(), p.log()[-2000:]


def post(url: str, **kw) -> httpx.Response:
    return httpx.post(url + "/classify", timeout=30, **kw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def check_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert body["request_id"] == r.headers["x-request-id"] and "Traceback" not in r.text


def test_every_input_form(servers):
    url, im = servers["main"].url, sf.noise_image(seed=4)
    for ctype, data in (
        ("image/png", sf.encode(im, "PNG")),
        ("image/jpeg", sf.encode(im, "JPEG")),
        ("image/webp", sf.encode(im, "WEBP")),
        ("image/bmp", sf.encode(im, "BMP")),
    ):
        r = post(url, content=data, headers={"content-type": ctype}, params={"top_k": 2})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["label"] in sf.CIFAR10 and len(res["top_k"]) == 2 and res["suspicion"] is not None
    files = [("images", (f"{i}.png", sf.png(seed=i), "image/png")) for i in range(3)]
    r = post(url, files=files, data={"samples": "2"})
    assert r.status_code == 200 and len(r.json()["results"]) == 3 and r.json()["samples"] == 2
    r = post(url, json={"images": [b64(sf.png(seed=i)) for i in range(3)], "top_k": 3})
    assert r.status_code == 200 and [x["index"] for x in r.json()["results"]] == [0, 1, 2]
    assert r.json()["model"]["name"] == "cifar10-atop" and r.json()["request_id"] == r.headers["x-request-id"]


def test_every_error_status(servers):
    url, key = servers["strict"].url, {"x-api-key": sf.API_KEY}
    early = servers["early"]
    check_error(early["readyz"], 503, "not_ready")
    check_error(early["classify"], 503, "not_ready")
    assert int(early["classify"].headers["retry-after"]) >= 1
    check_error(post(url, content=b"junk", headers=PNG | key), 400, "invalid_image")
    check_error(post(url, content=sf.png(), headers=PNG), 401, "unauthorized")
    check_error(post(url, content=sf.png(), headers=PNG | {"x-api-key": "wrong-key!"}), 403, "forbidden")
    check_error(httpx.get(url + "/no/such/route"), 404, "not_found")
    check_error(post(url, content=b"\0" * 70_000, headers=PNG | key), 413, "body_too_large")
    check_error(post(url, content=sf.bomb_png(4000, 4000), headers=PNG | key), 413, "image_too_large")
    check_error(post(url, json={"images": [b64(sf.png())] * 5}, headers=key), 413, "too_many_images")
    check_error(
        post(url, content=b"hi", headers={"content-type": "text/plain"} | key), 415, "unsupported_media_type"
    )
    gif = sf.encode(Image.new("RGB", (8, 8)), "GIF")
    check_error(
        post(url, content=gif, headers={"content-type": "image/png"} | key), 415, "unsupported_image_format"
    )
    check_error(
        post(url, content=sf.png(), headers=PNG | key, params={"samples": 17}), 422, "invalid_options"
    )
    check_error(post(url, json={"image": b64(sf.png()), "top_k": "x"}, headers=key), 422, "invalid_options")
    # 429: a 16-row request waits for its batch to fill (400 ms); 32 more rows do not fit
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, url, json={"image": b64(sf.png()), "samples": 16}, headers=key)
        time.sleep(0.15)
        r = post(url, json={"images": [b64(sf.png())] * 2, "samples": 16}, headers=key)
        check_error(r, 429, "queue_full")
        assert int(r.headers["retry-after"]) >= 1 and first.result().status_code == 200
    # 504: the request's deadline passes before the 400 ms batch delay
    check_error(
        post(url, content=sf.png(), headers=PNG | key, params={"deadline_ms": 50}), 504, "deadline_exceeded"
    )
    assert post(url, content=sf.png(), headers=PNG | key).status_code == 200  # nothing crashed


def test_concurrent_requests_form_batches(servers):
    url = servers["main"].url
    before = sf.histogram_buckets(httpx.get(url + "/metrics").text, "atop_batch_requests")
    with ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(lambda i: post(url, content=sf.png(seed=i), headers=PNG).status_code, range(64))
        )
    assert codes == [200] * 64
    after = sf.histogram_buckets(httpx.get(url + "/metrics").text, "atop_batch_requests")
    batches = after[float("inf")] - before.get(float("inf"), 0)
    single = after[1.0] - before.get(1.0, 0)
    assert batches < 64 and single < batches  # some batches merged several requests
    text = httpx.get(url + "/metrics").text
    assert (
        sf.metric(text, "atop_batch_size_count") > 0 and sf.metric(text, "atop_queue_wait_seconds_count") > 0
    )


def test_seeded_requests_reproduce(servers):
    url = servers["main"].url
    img = b64(sf.png(seed=11))

    def probs(images, i):
        r = post(url, json={"images": images, "seed": 2024, "samples": 3, "top_k": 10})
        assert r.status_code == 200
        return [t["probability"] for t in r.json()["results"][i]["top_k"]]

    a = probs([img], 0)
    assert np.allclose(a, probs([img], 0), atol=1e-6)
    assert np.allclose(a, probs([b64(sf.png(seed=1)), img], 1), atol=1e-5)


def test_hot_swap_under_load(servers, tiny_version):
    main, store = servers["main"], servers["main_store"]
    admin = {"authorization": f"Bearer {sf.ADMIN_TOKEN}"}
    stop, lock = threading.Event(), threading.Lock()
    answers: list[tuple[int, int | None]] = []  # (status, version)

    def client(seed: int) -> None:
        with httpx.Client(base_url=main.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/classify", content=sf.png(seed=seed), headers=PNG)
                version = r.json()["model"]["version"] if r.status_code == 200 else None
                with lock:
                    answers.append((r.status_code, version))

    def wait_for(pred, what: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < end, f"timed out waiting for {what}\n{main.log()[-3000:]}"
            time.sleep(0.05)

    def active() -> int:
        return httpx.get(main.url + "/v1/models").json()["active"]["version"]

    start = active()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(answers) > 20, "first answers")
        new = sf.republish(store, tiny_version)  # the watcher finds it, loads it beside, swaps
        wait_for(lambda: (200, new.version) in answers, f"answers from v{new.version}")
        bad = sf.republish(store, tiny_version)
        sf.corrupt(bad)
        wait_for(
            lambda: any(
                v["version"] == bad.version and v["status"] == "refused"
                for v in httpx.get(main.url + "/v1/models").json()["versions"]
            ),
            "the corrupt version to be refused",
        )
        n = len(answers)
        wait_for(lambda: len(answers) > n + 20, "answers after the refusal")
        r = httpx.post(main.url + f"/v1/admin/versions/{start}/activate", headers=admin, timeout=30)
        assert r.status_code == 200 and r.json()["result"] == "swapped"  # roll back, pinned
        n = len(answers)
        wait_for(lambda: len(answers) > n + 20, "answers after the rollback")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    statuses = {s for s, _ in answers}
    versions = {v for _, v in answers}
    assert len(answers) > 60 and statuses == {200}, (
        f"failed requests: {[a for a in answers if a[0] != 200][:5]}"
    )
    assert versions == {start, new.version} and bad.version not in versions
    assert answers[-1][1] == start and active() == start
    text = httpx.get(main.url + "/metrics").text
    assert sf.metric(text, "atop_model_reloads_total", result="refused") >= 1
    assert sf.metric(text, "atop_active_model_version", model="cifar10-atop") == start
    assert f"refused cifar10-atop v{bad.version}" in main.log()


def test_logs_carry_request_ids(servers):
    r = post(
        servers["strict"].url,
        content=sf.png(),
        headers=PNG | {"x-api-key": sf.API_KEY, "x-request-id": "trace-me-42"},
    )
    assert r.status_code == 200
    time.sleep(0.2)
    lines = [json.loads(line) for line in servers["strict"].log().splitlines() if line.startswith("{")]
    mine = [x for x in lines if x.get("request_id") == "trace-me-42"]
    assert mine and mine[-1]["status"] == 200 and mine[-1]["route"] == "/classify"
    assert "Traceback" not in servers["strict"].log() and "Traceback" not in servers["main"].log()
