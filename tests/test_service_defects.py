"""Defects a new user found (issue 18): deep JSON, a client that goes away mid-body, /docs on an
offline host and the options in the OpenAPI schema, a port already in use, invalid settings,
the first load counted as a swap."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import socket
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from swagger_ui_bundle import swagger_ui_path

from service import cli
from service.app import create_app
from tests.service_fixtures import REPO, ServiceProcess, metric, png, republish
from tests.test_browser_ui import CHROMEDRIVER, CHROMIUM, need_browser
from tests.test_service_unit import b64, err, make_settings, ok

OPTIONS = ("top_k", "samples", "seed", "deadline_ms")


@pytest.fixture
def client(service_store):
    with TestClient(create_app(make_settings(service_store, max_body_bytes=1024 * 1024))) as c:
        yield c


def atop(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """``atop *args`` in a child process: (its result, wall seconds)."""
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "atop.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    return res, time.perf_counter() - t0


# --- 1. JSON nested deeper than the parser's recursion limit --------------------------------------
@pytest.mark.parametrize("depth", [900, 2_000, 100_000])
def test_deeply_nested_json_is_a_4xx_at_any_depth(client, depth):
    nested_list = "[" * depth + "]" * depth
    nested_dict = '{"a": ' * depth + "1" + "}" * depth
    for body in (
        '{"images": ' + nested_list + "}",
        '{"image": "' + b64(png()) + '", "top_k": ' + nested_dict + "}",
        nested_list,
    ):
        r = client.post("/classify", content=body, headers={"content-type": "application/json"})
        code = r.json()["error"]["code"]
        if depth > 1000:  # deeper than the parser goes
            assert (r.status_code, code) == (400, "invalid_json"), r.text[:300]
        else:  # parsed: refused for what it holds (not a list of strings, not an integer)
            assert (r.status_code, code) in ((400, "invalid_request"), (422, "invalid_options")), r.text
    ok(client.post("/classify", json={"image": b64(png())}))  # still serving


# --- 2. a client that goes away: mid-body, or while its images wait for a batch ------------------
def classify_scope(client, body: bytes) -> dict:
    """The ASGI scope uvicorn builds for ``POST /classify`` with a PNG body."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/classify",
        "raw_path": b"/classify",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": client.app_state.copy(),  # the lifespan's registry and metrics
    }


def assert_counted_as_gone(client, caplog, sent) -> str:
    """Nothing was sent, nothing logged as an error, one 499 access line and metric; the
    service still answers. Returns the metrics text."""
    assert not sent  # nobody to answer
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    access = [r for r in caplog.records if r.name == "atop.access" and "/classify" in r.getMessage()]
    assert len(access) == 1 and access[0].levelno == logging.INFO and " 499 " in access[0].getMessage()
    text = client.get("/metrics").text
    assert metric(text, "atop_requests_total", route="/classify", status="499") == 1
    assert metric(text, "atop_requests_total", route="/classify", status="500") == 0
    assert metric(text, "atop_requests_total", route="/classify", status="200") == 0
    ok(client.post("/classify", content=png(), headers={"content-type": "image/png"}))
    return text


def test_a_client_gone_mid_body_is_counted_apart_and_logged_without_a_traceback(client, caplog):
    """The ASGI messages uvicorn sends for a client that closes its connection mid-body."""
    body = png()
    messages = [
        {"type": "http.request", "body": body[:20], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    with caplog.at_level(logging.DEBUG):
        client.portal.call(client.app, classify_scope(client, body), receive, send)
    assert_counted_as_gone(client, caplog, sent)


def test_a_client_gone_while_queued_costs_no_compute_and_is_counted_apart(service_store, caplog):
    """The whole body arrives, the images wait for a batch (the batcher holds the first request
    for max_delay_ms = 1.5 s), and the client closes its connection after 0.1 s: the request ends
    at once as 499 with no answer, its rows leave the queue and never reach the model."""
    settings = make_settings(service_store, max_delay_ms=1500, deadline_ms=10_000)
    body, sent = png(), []
    with TestClient(create_app(settings)) as c:
        state = {"read": False}

        async def receive():
            if not state["read"]:
                state["read"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(0.1)  # uvicorn: the next message is the disconnect, when it comes
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        t0 = time.perf_counter()
        with caplog.at_level(logging.DEBUG):
            c.portal.call(c.app, classify_scope(c, body), receive, send)
        assert time.perf_counter() - t0 < 1.0  # not held until the batch would have flushed
        text = c.get("/metrics").text
        assert metric(text, "atop_queue_depth") == 0  # its room given back
        assert metric(text, "atop_batch_size_count") == 0  # its rows never reached the model
        assert_counted_as_gone(c, caplog, sent)  # ... which answers one more request
        assert metric(c.get("/metrics").text, "atop_batch_size_count") == 1  # that one's batch


# --- 3. /docs offline, and the options in the OpenAPI schema ---------------------------------
def test_docs_load_everything_from_the_service_itself(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert not re.search(r"https?://", page.text), "the /docs page links outside the service"
    refs = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assets = [ref for ref in refs if ref != "/openapi.json"]
    assert len(assets) >= 3 and all(ref.startswith("/docs/") for ref in assets), refs
    for ref in assets:
        r = client.get(ref)
        assert r.status_code == 200 and len(r.content) > 500, ref
    js = next(ref for ref in assets if ref.endswith(".js"))
    assert b"SwaggerUIBundle" in client.get(js).content
    assert client.get("/docs/assets/index.html").status_code == 404  # only what the page loads
    assert swagger_ui_path.name.startswith("swagger-ui-5.")  # 4.x cannot render OpenAPI 3.1
    assert ok(client.get("/openapi.json"))["openapi"].startswith("3.1")  # Swagger UI 5 renders 3.1


@pytest.mark.slow
def test_docs_render_in_a_browser_that_has_no_internet(service_store, tmp_path):
    """Swagger UI draws every operation, and /classify's options, with every host but the
    service's unreachable (chromium's resolver maps them to nothing)."""
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.add_argument("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
    server = ServiceProcess(tmp_path / "serve.log", "--store", str(service_store), "--intra-op-threads", "1")
    driver = None
    try:
        server.wait_ready()
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
        driver.get(server.url + "/docs")
        end = time.monotonic() + 30
        while not driver.find_elements(By.CSS_SELECTOR, ".opblock-summary"):
            assert time.monotonic() < end, driver.find_element(By.TAG_NAME, "body").text[:500]
            time.sleep(0.2)
        ops = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary")]
        assert any("/classify" in op for op in ops) and any("/inspect" in op for op in ops), ops
        next(
            e for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary") if "/classify" in e.text
        ).click()
        end = time.monotonic() + 10
        while not driver.find_elements(By.CSS_SELECTOR, "tr[data-param-name]"):
            assert time.monotonic() < end
            time.sleep(0.2)
        shown = {
            e.get_attribute("data-param-name")
            for e in driver.find_elements(By.CSS_SELECTOR, "tr[data-param-name]")
        }
        assert set(OPTIONS) <= shown, shown
    finally:
        if driver is not None:
            driver.quit()
        server.stop()


@pytest.mark.parametrize("route", ["/classify", "/inspect"])
def test_openapi_lists_the_options_as_query_parameters(client, route):
    params = ok(client.get("/openapi.json"))["paths"][route]["post"]["parameters"]
    query = {p["name"]: p for p in params if p["in"] == "query"}
    assert set(query) == set(OPTIONS)
    for name in OPTIONS:
        assert query[name]["description"] and not query[name].get("required", False)
    assert query["top_k"]["schema"] == {"type": "integer", "minimum": 1, "default": 1}
    assert query["samples"]["schema"] == {"type": "integer", "minimum": 1}
    assert query["seed"]["schema"]["type"] == "integer" and query["seed"]["schema"]["minimum"] == 0
    assert query["deadline_ms"]["schema"] == {"type": "number", "exclusiveMinimum": 0}
    assert "x-api-key" in {p["name"].lower() for p in params if p["in"] == "header"}


@pytest.mark.parametrize("route", ["/classify", "/inspect"])
def test_options_are_still_taken_from_the_query_and_the_body_wins(client, route):
    raw = {"content": png(), "headers": {"content-type": "image/png"}}
    a = ok(client.post(route, **raw, params={"top_k": "3", "samples": "2", "seed": "7"}))
    assert len(a["results"][0]["top_k"]) == 3 and (a["samples"], a["seed"]) == (2, 7)
    files = [("images", ("x.png", png(), "image/png"))]
    b = ok(client.post(route, files=files, data={"top_k": "2"}, params={"top_k": "5", "seed": "7"}))
    assert len(b["results"][0]["top_k"]) == 2 and b["seed"] == 7
    # a body option overrides the query one before anything is validated, as before
    c = ok(client.post(route, json={"image": b64(png()), "top_k": 4}, params={"top_k": "many"}))
    assert len(c["results"][0]["top_k"]) == 4
    err(client.post(route, **raw, params={"top_k": "many"}), 422, "invalid_options")
    err(client.post(route, **raw, params={"deadline_ms": "0"}), 422, "invalid_options")
    ok(client.post(route, **raw, params={"unknown": "x"}))  # unknown query parameters are ignored


# --- 4. port already in use --------------------------------------------------------------------
def test_a_port_in_use_fails_at_once_with_one_line(service_store):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        res, seconds = atop(
            *("serve", "--host", "127.0.0.1", "--port", str(port), "--store", str(service_store)),
            *("--intra-op-threads", "1", "--no-spinning"),
        )
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=f"127.0.0.1:{port}.*in use"):
            cli.check_port("127.0.0.1", port)
        assert time.perf_counter() - t0 < 1.0
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0] and "--port" in lines[0]
    assert seconds < 20  # interpreter start and imports only: nothing was loaded (about 1 s idle)
    cli.check_port("127.0.0.1", port)  # free again
    cli.check_port("127.0.0.1", 0)  # any free port


# --- 5. invalid settings: one line per problem ------------------------------------------------
@pytest.mark.parametrize(
    "flags, env, wanted",
    [
        (
            ["--max-batch-size", "64", "--queue-size", "10"],
            {},
            ["queue_size (10) must be >= max_batch_size (64)"],
        ),
        (["--max-batch-size", "5000", "--port", "70000"], {}, ["--port 70000: ", "--max-batch-size 5000: "]),
        ([], {"ATOP_MAX_SAMPLES": "0"}, ["ATOP_MAX_SAMPLES=0: "]),
        ([], {"ATOP_ADMIN_TOKEN": "short-1"}, ["admin_token must be at least 8 characters"]),
        ([], {"ATOP_BACKEND": "tensorflow"}, ["ATOP_BACKEND=tensorflow: Input should be 'onnx' or"]),
        ([], {"ATOP_API_KEY": "short-1"}, ["api_key must be at least 8 characters"]),
    ],
    ids=["cross-check", "two-flags", "env", "secret-admin", "env-choice", "secret-api"],
)
def test_invalid_settings_give_one_line_per_problem(flags, env, wanted, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    with pytest.raises(ValueError) as e:
        cli.settings_from_args(p.parse_args(flags))
    lines = str(e.value).splitlines()
    assert len(lines) == len(wanted), lines
    for line, want in zip(lines, wanted, strict=True):
        assert want in line and "http" not in line and "[type=" not in line
    assert "short-1" not in str(e.value)  # a secret's value is never shown


def test_invalid_settings_on_the_command_line_print_one_line():
    res, _ = atop("serve", "--max-batch-size", "64", "--queue-size", "10")
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, lines
    assert "queue_size (10) must be >= max_batch_size (64)" in lines[0]
    assert "http" not in lines[0] and "Traceback" not in res.stderr and "validation error" not in lines[0]


# --- 6. the first load is not a swap ---------------------------------------------------------------
def test_the_first_load_counts_as_loaded_not_as_a_swap(service_store, tiny_version):
    s = make_settings(service_store)
    with TestClient(create_app(s)) as c:
        text = c.get("/metrics").text
        assert metric(text, "atop_model_reloads_total", result="loaded") == 1
        assert metric(text, "atop_model_reloads_total", result="swapped") == 0
        assert ok(c.get("/v1/models"))["last_reload"]["result"] == "loaded"
        republish(service_store, tiny_version)
        assert ok(c.post("/v1/admin/reload"))["result"] == "swapped"
        text = c.get("/metrics").text
        assert metric(text, "atop_model_reloads_total", result="loaded") == 1
        assert metric(text, "atop_model_reloads_total", result="swapped") == 1


def test_a_first_load_found_by_the_watcher_is_loaded_too(tmp_path, tiny_version):
    store = tmp_path / "store"
    s = make_settings(store, wait_for_model=True, poll_interval_s=0.05)
    with TestClient(create_app(s)) as c:
        assert c.get("/readyz").status_code == 503
        republish(store, tiny_version)
        end = time.monotonic() + 30
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.05)
        text = c.get("/metrics").text
        assert metric(text, "atop_model_reloads_total", result="loaded") == 1
        assert metric(text, "atop_model_reloads_total", result="swapped") == 0


def test_two_workers_answer_without_a_nagle_stall(tmp_path, service_store):
    """--workers 2 used to add ~40 ms to every keep-alive request (no TCP_NODELAY on the
    connections accepted from uvicorn's shared socket: Nagle waited for the delayed ACK)."""
    import httpx

    server = ServiceProcess(tmp_path / "serve.log", "--store", str(service_store), "--workers", "2")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for _ in range(5):  # both workers warm, the connection open
                c.get("/healthz")
            times = []
            for _ in range(21):
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                times.append(time.perf_counter() - t0)
        assert sorted(times)[10] < 0.025, f"median {1000 * sorted(times)[10]:.1f} ms: {server.log()[-1500:]}"
    finally:
        server.stop()
