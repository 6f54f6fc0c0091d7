"""The /ui page in a real headless browser: Debian's chromium and chromedriver, driven by selenium,
against real ``atop serve`` processes on loopback.

Nothing is downloaded at run time: the browser and driver are /usr/bin's (selenium-manager is
never asked). Without them the tests skip, saying what to install; with ATOP_REQUIRE_BROWSER=1
(set by .ci/run, which installs them) they fail instead. A screenshot of each page is saved in
the test's tmp folder, and to $ATOP_UI_SCREENSHOT_DIR when that is set.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from model_store import default_store, get_version, list_versions
from service.routes.ui import STATIC
from tests import service_fixtures as sf

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PNG = {"content-type": "image/png"}
WAIT_S = 30


def need_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -c constraints.txt -e '.[dev]')")
    if missing:
        why = f"needs {', '.join(missing)} (apt-get install -y chromium chromium-driver)"
        if os.environ.get("ATOP_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test {why}; ATOP_REQUIRE_BROWSER=1 forbids skipping")
        pytest.skip(f"browser test {why}")


@pytest.fixture(scope="module")
def browser():
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)  # with the driver's path given: no selenium-manager
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1100,1400",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def serve(base: Path, store: Path, *flags: str) -> sf.ServiceProcess:
    common = ["--intra-op-threads", "1", "--inter-op-threads", "1", "--no-spinning", "--max-delay-ms", "2"]
    proc = sf.ServiceProcess(base / "serve.log", "--store", str(store), *common, *flags)
    proc.wait_ready()
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_version):
    base = tmp_path_factory.mktemp("browser")
    store = base / "store"
    sf.republish(store, tiny_version)
    proc = serve(base, store, "--poll-interval-s", "0.25")
    yield proc, store
    assert proc.stop() in (0, -15), proc.log()[-2000:]


# --- helpers ---------------------------------------------------------------------------------
def wait(driver, cond, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S).until(cond)
    except TimeoutException:
        status = driver.find_element("id", "status").text
        error = driver.find_element("id", "error").text
        pytest.fail(f"timed out waiting for {what}; status {status!r}, error {error!r}")


def answers(driver) -> int:
    return int(driver.find_element("id", "result").get_attribute("data-answers") or 0)


def next_answer(driver, before: int) -> None:
    def done(d) -> bool:
        return answers(d) > before and d.find_element("id", "result").get_attribute("data-state") == "done"

    wait(driver, done, "an answer")


def open_page(driver, url: str, version: int) -> None:
    driver.get(url + "/")
    assert driver.current_url == url + "/ui"  # the root redirects to the page
    card = f"version {version}"
    wait(driver, lambda d: card in d.find_element("id", "card-model").text, f"the card of v{version}")


def fill(driver, field: str, value: str) -> None:
    el = driver.find_element("id", field)
    el.clear()
    el.send_keys(value)


def picture(driver, element_id: str) -> tuple[int, int, str]:
    """(natural width, natural height, base64 PNG) of a shown picture."""
    el = driver.find_element("id", element_id)
    assert el.is_displayed(), f"#{element_id} is not shown"
    w, h, src = driver.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight, arguments[0].src]", el
    )
    assert src.startswith("data:image/png;base64,")
    return w, h, src.split(",", 1)[1]


def topk(driver, list_id: str) -> list[str]:
    names = driver.find_elements("css selector", f"#{list_id} li .name")
    return [el.text for el in names]


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()["width"], height + 150)
    out = tmp_path / name
    driver.save_screenshot(str(out))
    assert Image.open(out).size[0] > 300
    if os.environ.get("ATOP_UI_SCREENSHOT_DIR"):
        shutil.copy(out, Path(os.environ["ATOP_UI_SCREENSHOT_DIR"]) / name)
    return out


def clean_console(driver, url: str) -> None:
    """No error in the console (a CSP violation would be one), and no request off the server."""
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert names and all(n.startswith((url + "/", "data:")) for n in names), names


# --- the tests -------------------------------------------------------------------------------
def test_upload_shows_the_three_pictures_and_both_top_k(browser, server, tmp_path):
    proc, _ = server
    t0 = time.perf_counter()
    open_page(browser, proc.url, 1)
    fill(browser, "seed", "2024")
    fill(browser, "samples", "3")
    upload = tmp_path / "photo.jpg"
    sf.noise_image(60, 44, seed=9).save(upload, "JPEG")  # not 32x32, not square: the API's rules
    before = answers(browser)
    browser.find_element("id", "file").send_keys(str(upload))
    next_answer(browser, before)
    api = httpx.post(
        proc.url + "/inspect",
        files={"image": ("photo.jpg", upload.read_bytes(), "image/jpeg")},
        data={"seed": "2024", "samples": "3", "top_k": "5"},
        timeout=30,
    ).json()
    res = api["results"][0]
    assert picture(browser, "img-input") == (32, 32, res["views"]["input"])
    assert picture(browser, "img-transformed") == (32, 32, res["views"]["transformed"][0])
    assert picture(browser, "img-purified") == (32, 32, res["views"]["purified"][0])
    assert len(browser.find_elements("css selector", "#strip li")) == 3  # a strip of the 3 draws
    assert browser.find_element("id", "label").text == res["label"]
    assert topk(browser, "topk-defended") == [t["label"] for t in res["top_k"]]
    assert topk(browser, "topk-undefended") == [t["label"] for t in res["undefended_top_k"]]
    served = browser.find_element("id", "served").text
    assert f"{sf.MODEL} v1" in served and "seed 2024" in served and "3 draws" in served and "ms" in served
    assert "unmeasured" in browser.find_element("id", "card-robustness").text
    clean_console(browser, proc.url)
    shot = screenshot(browser, tmp_path, "ui-tiny.png")
    print(f"browser: upload to answer in {time.perf_counter() - t0:.1f}s; screenshot {shot}")


def test_seed_repeats_the_pictures_and_draw_again_changes_them(browser, server):
    proc, _ = server
    first = picture(browser, "img-transformed")[2]
    n = answers(browser)
    browser.find_element("id", "run").click()  # same seed
    next_answer(browser, n)
    assert picture(browser, "img-transformed")[2] == first
    assert browser.find_element("id", "seed").get_attribute("value") == "2024"
    n = answers(browser)
    browser.find_element("id", "redraw").click()
    next_answer(browser, n)
    assert browser.find_element("id", "seed").get_attribute("value") != "2024"
    assert picture(browser, "img-transformed")[2] != first


def test_usable_by_keyboard_and_at_phone_width(browser, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    proc, _ = server
    browser.set_window_size(390, 844)
    open_page(browser, proc.url, 1)
    seen = []
    for _ in range(20):  # Tab from the top: the file picker, the examples and the controls
        ActionChains(browser).send_keys(Keys.TAB).perform()
        el = browser.switch_to.active_element
        seen.append(el.get_attribute("id") or el.get_attribute("data-example"))
        if seen[-1] == "frog.png":
            break
    assert seen[0] == "file" and seen[-1] == "frog.png", seen
    n = answers(browser)
    ActionChains(browser).send_keys(Keys.ENTER).perform()  # the focused example, by keyboard
    next_answer(browser, n)
    assert "frog.png" in browser.find_element("id", "status").text
    fill(browser, "samples", "2")
    n = answers(browser)
    browser.find_element("id", "samples").send_keys(Keys.ENTER)  # Enter in a field runs again
    next_answer(browser, n)
    assert len(browser.find_elements("css selector", "#strip li")) == 2
    wide = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert wide <= 0, f"the page scrolls sideways by {wide}px at 390px"
    assert browser.find_element("id", "img-purified").rect["width"] >= 90
    screenshot(browser, tmp_path, "ui-phone.png")
    browser.set_window_size(1100, 1400)


def test_hot_swap_the_page_names_the_version_of_each_answer(browser, server, tiny_version):
    proc, store = server
    open_page(browser, proc.url, 1)
    browser.find_element("css selector", '#examples button[data-example="cat.png"]').click()
    next_answer(browser, 0)
    assert browser.find_element("id", "served").get_attribute("data-version") == "1"
    sf.republish(store, tiny_version)  # the store watcher swaps to v2
    end = time.monotonic() + WAIT_S
    while httpx.get(proc.url + "/readyz").json()["model"]["version"] != 2:
        assert time.monotonic() < end, proc.log()[-2000:]
        time.sleep(0.1)
    n = answers(browser)
    browser.find_element("id", "redraw").click()
    next_answer(browser, n)
    served = browser.find_element("id", "served")
    assert served.get_attribute("data-version") == "2" and "switched from v1" in served.text
    assert "version 2" in browser.find_element("id", "card-model").text


def test_the_default_says_what_it_is(browser, tmp_path_factory, tmp_path):
    """The embedded default (the newest version `atop serve` serves out of the box): no random
    transform and no purifier, said on the page; its recorded clean accuracy; the API's label."""
    default = max(mv.version for mv in list_versions(default_store(), sf.MODEL))
    manifest = get_version(default_store(), sf.MODEL, default).manifest
    has_views = "purified" in [o["name"] for o in manifest["graph"]["onnx"]["outputs"]]
    base = tmp_path_factory.mktemp("browser-default")
    flags = ("--pin-version", str(default), "--poll-interval-s", "0", "--max-batch-size", "4")
    proc = serve(base, default_store(), *flags)
    try:
        open_page(browser, proc.url, default)
        notes = browser.find_element("id", "card-notes").text
        assert "no purifier" in notes and ("exported before" in notes) is not has_views
        robustness = browser.find_element("id", "card-robustness").text
        clean = manifest["evaluation"]["clean_accuracy"]
        assert robustness.startswith(f"Recorded evaluation: {100 * clean:.1f}% clean")
        assert not browser.find_element("id", "samples").is_enabled()  # nothing random to draw
        browser.find_element("css selector", '#examples button[data-example="cat.png"]').click()
        next_answer(browser, 0)
        cat = (STATIC / "samples" / "cat.png").read_bytes()
        api = httpx.post(proc.url + "/classify", content=cat, headers=PNG, timeout=30)
        assert browser.find_element("id", "label").text == api.json()["results"][0]["label"]
        w, h, data = picture(browser, "img-input")
        assert (w, h) == (32, 32) and Image.open(io.BytesIO(base64.b64decode(data))).size == (32, 32)
        for name in ("transformed", "purified"):
            assert browser.find_element("id", f"img-{name}").is_displayed() is has_views
        assert len(topk(browser, "topk-defended")) == 5 == len(topk(browser, "topk-undefended"))
        clean_console(browser, proc.url)
        screenshot(browser, tmp_path, "ui-default.png")
    finally:
        assert proc.stop() in (0, -15), proc.log()[-2000:]
