"""The collector's web page in a real browser: Debian's chromium, headless, driven by selenium.

The page loads with no console error, the job of a real training loop appears (its id, which
holds markup, as text), a phase change the collector detected appears, and a wrong password
gets 401. With `THERMOSCOPE_SCREENSHOT=FILE`, the first test saves what the browser shows there
(.assets/web-page.png was taken so)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from thermoscope.cli.collector_process import CollectorProcess, start_collector_process
from thermoscope.collector.exposition.passwords import hash_password

from helpers.demo_run import DemoRun

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)

JOB = 'web<b>job</b>&"x"'  # a user's name that is also markup: it must show as text
USER, PASSWORD = "admin", "right horse battery"
WAIT = 90  # seconds, generous: each wait ends at its event


def _header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorProcess]:
    users = tmp_path / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD)}\n")
    process = start_collector_process(tmp_path / "events.db", None, "--metrics-basic-auth", str(users))
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_window_size(1200, 1400)
    try:
        yield driver
    finally:
        driver.quit()


def _authorize(driver: webdriver.Chrome, header: str) -> None:
    """Every request of the page (its scripts, its API calls) carries this Authorization header."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": header}})


def _api(collector: CollectorProcess, path: str) -> dict:
    url = collector.metrics_url.removesuffix("metrics") + path
    request = urllib.request.Request(url, headers={"Authorization": _header(USER, PASSWORD)})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def _console_errors(driver: webdriver.Chrome) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_page_shows_a_real_training_job_appearing_and_the_phase_change_the_collector_detected(
    collector: CollectorProcess, browser: webdriver.Chrome
) -> None:
    page = collector.metrics_url.removesuffix("metrics")
    _authorize(browser, _header(USER, PASSWORD))
    browser.get(page)
    wait = WebDriverWait(browser, WAIT, poll_frequency=0.2)
    # before any job: the page says so (its script ran)
    wait.until(lambda d: d.find_element(By.ID, "no-jobs").is_displayed())
    with DemoRun(collector.grpc_target, JOB, steps=250) as run:
        row = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr a"))[0]
        assert row.text == JOB  # the id as text: no <b> element was made of it
        assert browser.find_elements(By.CSS_SELECTOR, "#jobs b") == []
        # the demo's run leaves type_i within its first steps: the job's first transition
        first = wait.until(
            lambda d: [
                tr.find_elements(By.TAG_NAME, "td")
                for tr in d.find_elements(By.CSS_SELECTOR, "#events tbody tr")
                if tr.find_elements(By.TAG_NAME, "td")[1].text == "job"
            ]
        )[-1]
        shown = (int(first[0].text), first[3].text, first[4].text)
        detected = [
            (e["step"], e["from"], e["to"]) for e in _api(collector, "api/v1/jobs/" + _quote(JOB))["events"]
        ]
        assert shown in detected and shown[1] == "type_i", (shown, detected)
        assert browser.find_element(By.ID, "job-name").text == JOB
        # the charts were drawn (uPlot's canvases) and the heatmap has a row per layer
        assert len(browser.find_elements(By.CSS_SELECTOR, "#energy canvas, #temperature canvas")) == 2
        run.done.wait(WAIT)
    # the phase the collector holds at the end is the one the jobs table shows
    phase = _api(collector, "api/v1/jobs")["jobs"][0]["phase"]
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#jobs tbody td.phase").text == phase)
    assert phase != "type_i"
    if os.environ.get("THERMOSCOPE_SCREENSHOT"):
        browser.save_screenshot(os.environ["THERMOSCOPE_SCREENSHOT"])
    assert _console_errors(browser) == []


def _quote(name: str) -> str:
    return urllib.request.quote(name, safe="")


@pytest.mark.parametrize("header", [_header(USER, "wrong"), None], ids=["wrong-password", "no-password"])
def test_a_browser_without_the_right_password_gets_401_and_no_page(
    collector: CollectorProcess, browser: webdriver.Chrome, header: str | None
) -> None:
    if header is not None:
        _authorize(browser, header)
    browser.get(collector.metrics_url.removesuffix("metrics"))
    status = browser.execute_script('return performance.getEntriesByType("navigation")[0].responseStatus')
    assert status == 401
    assert browser.find_elements(By.ID, "jobs") == []  # chromium shows nothing of a 401's body
