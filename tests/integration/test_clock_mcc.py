"""The MCC page (headless Chromium), /metrics and `mro-edge status` show whether the box's clock is
synchronised and what the time rules do meanwhile; the clock is moved through the test seam."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.brokers import start_broker
from tests.integration.test_mcc import PASSWORD, browser_tools, start_box
from tests.pipeline import ROOT, wait_until


def test_the_page_metrics_and_status_show_the_clock(tmp_path, monkeypatch) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    seam = tmp_path / "clock.json"
    seam.write_text(json.dumps({"offset_s": 0, "synchronised": False}))
    monkeypatch.setenv("MRO_CLOCK_OFFSET_FILE", str(seam))
    monkeypatch.setenv("MRO_CLOCK_REQUIRE_SYNC", "true")
    chromium, chromedriver = browser_tools()
    broker = start_broker("mosquitto", tmp_path / "data")
    try:
        box = start_box(broker, tmp_path)
    except BaseException:
        broker.stop()
        raise
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.get(box.url + "/")
        driver.find_element(By.ID, "user").send_keys("op")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()

        def text(css: str) -> str:
            return driver.execute_script(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css)

        wait_until(lambda: text("#clock-sync").startswith("NO (seam)"), 30, 0.3, "the clock shown unsynchronised")
        assert text("#clock-rules") == "held until the clock is synchronised (0 held)"
        wait_until(lambda: box.metrics().get(("mro_clock_synchronised", ())) == 0.0, 30, 0.3, "the gauge at 0")
        status = subprocess.run([sys.executable, "-m", "mro_edge", "status"], env=box.pipeline.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert "clock: NOT synchronised (seam): records are held in validate until it is" in status.stdout, \
            status.stdout

        seam.write_text(json.dumps({"offset_s": 0, "synchronised": True}))
        time.sleep(0.5)
        wait_until(lambda: text("#clock-sync") == "yes (seam)", 30, 0.3, "the clock shown synchronised")
        assert text("#clock-rules") == "judged"
        wait_until(lambda: box.metrics().get(("mro_clock_synchronised", ())) == 1.0, 30, 0.3, "the gauge at 1")
    finally:
        driver.quit()
        box.pipeline.stop()
        broker.stop()
