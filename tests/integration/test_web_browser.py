"""The UI in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium),
against a real `edge-agent run` and a real `cloud-hub run`: log in, see a study sent by
storescu appear in the worklist without reloading, open it, see the overlay, reject a
finding, and see the review arrive at the hub. Screenshots are saved as test artefacts
(``$TEST_ARTIFACTS``, default ``test-artifacts/``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edge_agent.inference.reference_models import SEG_NAME, build_reference_packages
from edge_agent.samples import make_study
from tests.conftest import free_port, release_rig, start_agent, storescu, wait_ready

pytestmark = pytest.mark.dcmtk

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", "test-artifacts"))
PASSWORD = "correct horse battery staple"


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        if os.environ.get("REQUIRE_DCMTK"):  # make test installs them: missing is a failure
            pytest.fail("chromium/chromedriver not installed (make test installs them)")
        pytest.skip("chromium/chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        opts.add_argument(arg)
    opts.binary_location = chromium
    d = webdriver.Chrome(options=opts, service=Service(driver))
    d.set_page_load_timeout(30)
    try:
        yield d
    finally:
        d.quit()


def _wait(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_radiologist_rejects_a_finding_and_the_review_reaches_the_hub(
    tmp_path: Path, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    seg = next(r for r in build_reference_packages(tmp_path / "ref") if r.name.startswith(SEG_NAME))
    rig = release_rig(tmp_path, seg, "EDGE_UI")
    cfg = str(rig.cfg)
    cli = [sys.executable, "-m", "edge_agent"]
    subprocess.run([*cli, "models", "install", str(seg), "--config", cfg], check=True)
    subprocess.run(
        [*cli, "users", "add", "dr.house", "--role", "radiologist", "--config", cfg],
        check=True,
        env={**os.environ, "EDGE_USER_PASSWORD": PASSWORD},
    )
    web_port = free_port()
    log = rig.root / "agent.log"
    agent = start_agent(
        rig.cfg,
        log,
        env={
            "EDGE_WEB_PORT": str(web_port),
            "EDGE_WEB_BIND_ADDRESS": "127.0.0.1",
            "EDGE_WEB_REFRESH_S": "1",
            "EDGE_STUDIES_QUIET_PERIOD_S": "1",
        },
    )
    base = f"http://127.0.0.1:{web_port}"
    try:
        wait_ready(rig.port, "EDGE_UI", agent, log)

        def web_up() -> bool:  # the web server starts just after the DICOM listener
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                assert agent.poll() is None, log.read_text()[-3000:]
                return False

        _wait("the web UI", web_up)
        browser.get(base + "/worklist")
        assert "/login" in browser.current_url  # not logged in: sent to the login page
        browser.find_element(By.ID, "username").send_keys("dr.house")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "login-button").click()
        _wait("the worklist", lambda: browser.find_elements(By.ID, "worklist"))
        who = _wait("the user name", lambda: browser.find_elements(By.ID, "whoami"))
        assert "dr.house (radiologist)" in who[0].text
        browser.save_screenshot(str(ARTIFACTS / "1-worklist-empty.png"))

        # a study arrives while the page is open: it appears without a reload
        marker = browser.execute_script("window.__noReload = 42; return window.__noReload;")
        study = make_study(
            tmp_path / "ct",
            modality="CT",
            slices=12,
            size=128,
            seed="ui",
            patient_id="UI-7",
            patient_name="BROWSER^TEST",
        )
        assert storescu(rig.port, *study.files, aec="EDGE_UI").returncode == 0
        from selenium.common.exceptions import StaleElementReferenceException

        def arrived() -> str | None:
            # the table is re-rendered every refresh: read a row's text in one go
            try:
                for r in browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr"):
                    text = str(r.text)
                    if "BROWSER^TEST" in text and "result" in text:
                        return text
            except StaleElementReferenceException:
                pass
            return None

        row_text = _wait("the study in the worklist", arrived, timeout=60)
        assert browser.execute_script("return window.__noReload;") == marker  # same page
        assert "UI-7" in row_text and "DONE" in row_text
        browser.save_screenshot(str(ARTIFACTS / "2-worklist-study-arrived.png"))

        def open_study() -> bool:
            try:
                link = browser.find_element(
                    By.XPATH, "//table[@id='worklist']//tr[contains(., 'BROWSER^TEST')]//a"
                )
                link.click()
            except StaleElementReferenceException:
                return False
            return True

        _wait("a click on the study", open_study)
        title = _wait("the study page", lambda: browser.find_elements(By.ID, "study-title"))
        assert "BROWSER, TEST" in title[0].text and "/studies/" in browser.current_url
        img = _wait("the viewer", lambda: browser.find_elements(By.CSS_SELECTOR, "img.slice"))[0]
        assert "overlay=1" in img.get_attribute("src")
        # move to a slice with a finding and check the overlay is drawn (red pixels)
        cells = browser.find_elements(By.CSS_SELECTOR, ".measurements td")
        assert any("mm" in c.text for c in cells)  # measurements are shown
        browser.execute_script(
            "const r = document.querySelector('.index'); r.value = 6;"
            "r.dispatchEvent(new Event('input'));"
        )
        red = _wait(
            "the overlay",
            lambda: browser.execute_script(
                """
                const img = document.querySelector('img.slice');
                if (!img.complete || !img.naturalWidth || !img.src.includes('index=6')) return 0;
                const c = document.createElement('canvas');
                c.width = img.naturalWidth; c.height = img.naturalHeight;
                const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                const d = g.getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] > d[i + 1] + 60) n++;
                return n;
                """
            ),
        )
        assert red > 20
        browser.save_screenshot(str(ARTIFACTS / "3-study-overlay.png"))

        browser.find_element(By.CSS_SELECTOR, ".finding .reject").click()
        added = _wait(
            "the review",
            lambda: browser.find_elements(By.CSS_SELECTOR, "li.new-review"),
        )
        assert "dr.house: reject lesion" in added[0].text
        browser.save_screenshot(str(ARTIFACTS / "4-finding-rejected.png"))

        from cloud_hub.store.schema import records

        def at_hub() -> Any:
            with rig.hub_store.engine.connect() as conn:
                return conn.execute(
                    sa.select(records.c.key, records.c.payload).where(
                        records.c.key.like("review/%")
                    )
                ).all()

        (_key, payload) = _wait("the review at the hub", at_hub, timeout=60)[0]
        review = json.loads(payload)
        assert review["decision"] == "reject" and review["reviewer"] == "dr.house"
        assert review["finding"] == "lesion" and review["study_uid"] == study.study_uid
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        rig.hub.terminate()
        rig.hub.wait(10)
    audit = subprocess.run(
        [*cli, "users", "audit", "--config", cfg], check=True, capture_output=True, text=True
    ).stdout
    assert "login" in audit and "study.view" in audit and "review.create" in audit
