"""The MCC status page and /metrics against a real box: real brokers (both), the real stage
processes, a real heartbeat probing a gateway address where nothing listens (so the link goes
ISOLATED for real), the MCC as its own process over real HTTP, and headless Chromium.

Checked: a login is needed and a wrong password refused; the session cookie is HttpOnly and
SameSite=Strict; what the page and /metrics show matches the box (records counted by the
stages' own statuses, a bad record's DLQ entry with its rule, path and device and never the
value, a killed stage shown down, the link state).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mro_edge.cli import read_statuses
from mro_edge.simulator.records import valid_record
from tests.brokers import free_port, start_broker
from tests.pipeline import ROOT, Pipeline, wait_until

PASSWORD = "correct horse battery staple"
BIDI = "Torque checked \u202eKO\u202c"


@dataclass
class Box:
    pipeline: Pipeline
    url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=10)

    def login(self, client: httpx.Client, password: str = PASSWORD) -> httpx.Response:
        return client.post("/login", content=f"user=op&password={password.replace(' ', '+')}",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})

    def state(self, client: httpx.Client) -> dict:
        response = client.get("/api/state")
        assert response.status_code == 200, response.status_code
        return response.json()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def start_box(broker, tmp_path) -> Box:
    port = free_port()
    pipeline = Pipeline(broker, tmp_path / "data", MRO_MCC_LISTEN=f"127.0.0.1:{port}",
                        MRO_LINK_GATEWAY_URL=f"http://127.0.0.1:{free_port()}", MRO_LINK_PROBE_INTERVAL_S="0.3",
                        MRO_LINK_ISOLATE_AFTER="2", MRO_LINK_SLOW_PROBE_MS="500")
    added = subprocess.run([sys.executable, "-m", "mro_edge", "mcc", "user", "add", "op", "--password-stdin"],
                           input=PASSWORD + "\n", env=pipeline.env, cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert added.returncode == 0, added.stderr
    assert PASSWORD not in added.stdout + added.stderr
    users = tmp_path / "data" / "mcc" / "users"
    assert users.stat().st_mode & 0o777 == 0o600 and users.read_text().startswith("op:$7$210000$")
    box = Box(pipeline, f"http://127.0.0.1:{port}")
    try:
        pipeline.start()
        pipeline.start("heartbeat", "mcc", wait=False)
    except BaseException:
        pipeline.stop()
        raise

    def serving() -> bool:
        try:
            return httpx.get(box.url + "/login", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(serving, 60, 0.2, "the MCC to serve")
    except AssertionError:
        pipeline.stop()
        raise AssertionError(f"the MCC did not serve; its log:\n{pipeline.log_tail('mcc')}") from None
    return box


@pytest.fixture
def box(broker, tmp_path) -> Iterator[Box]:
    started = start_box(broker, tmp_path)
    yield started
    started.pipeline.stop()


def send_good_and_bad(box: Box) -> dict:
    tablet = box.pipeline.device("tablet", "TAB-07")
    rng = random.Random(12)
    records = [valid_record(rng, station="HGR1", device_kind="tablet", device_id="TAB-07") for _ in range(6)]
    bad = records.pop()
    bad["notes"] = BIDI
    for record in records:
        tablet.send(record["event_id"], json.dumps(record).encode())
    tablet.send(bad["event_id"], json.dumps(bad, ensure_ascii=False).encode(), expect="rejected")

    def answered() -> bool:
        tablet.resend_unreceipted()
        return all(s.final for s in tablet.sent.values())

    wait_until(answered, 60, 0.2, "every record answered")
    return bad


def test_the_page_needs_a_login_and_shows_the_real_box(box: Box) -> None:
    with box.client() as anonymous:
        assert anonymous.get("/").headers["location"] == "/login"
        assert anonymous.get("/api/state").status_code == 401
        assert anonymous.get("/events").status_code == 401
        refused = box.login(anonymous, "wrong password!!")
        assert refused.status_code == 401 and "mcc_session" not in refused.cookies
    with box.client() as operator:
        accepted = box.login(operator)
        assert accepted.status_code == 303
        cookie = accepted.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert operator.get("/").status_code == 200

        bad = send_good_and_bad(box)

        def shown() -> dict | None:
            state = box.state(operator)
            services = {s["name"]: s["state"] for s in state["services"]}
            ok = (all(services[n] == "up" for n in ("ingest", "validate", "sign", "heartbeat"))
                  and state["dlq"] and state["link"] and state["link"]["state"] == "ISOLATED"
                  and "TAB-07" in dict(state["devices"]))
            return state if ok else None

        state = wait_until(shown, 60, 0.3, "the page to show the stages up, the DLQ entry and the link")
        entry = state["dlq"][0]
        assert (entry["stage"], entry["device"], entry["errors"]) == ("ingest", "TAB-07",
                                                                      [["text_control_char", "$.notes"]])
        assert "U+202E" not in json.dumps(state) and bad["event_id"] not in json.dumps(state)
        assert [c["state"] for c in state["link_history"]][-1] == "ISOLATED"
        assert any(a["alarm"] == "link_isolated" for a in state["alarms"])

        # /metrics: the figures the stages themselves publish
        def metrics_match() -> bool:
            status = read_statuses(box.pipeline.config, 0.5)
            figures = box.metrics()
            # the stages publish their statuses every second: wait for the ones after the last
            # batch and after the rejection, or both sides could still agree on an earlier count
            if status["sign"]["records"]["out"] < 5 or status["ingest"]["records"]["rejected"] < 1:
                return False
            return all(figures.get((f"mro_stage_records_{field}_total", (("stage", stage),)))
                       == status[stage]["records"][field]
                       for stage in ("ingest", "validate", "sign") for field in ("in", "out", "rejected"))

        wait_until(metrics_match, 30, 0.5, "/metrics to match the stages' statuses")
        figures = box.metrics()
        assert figures[("mro_stage_records_out_total", (("stage", "sign"),))] == 5
        assert figures[("mro_stage_records_rejected_total", (("stage", "ingest"),))] == 1
        assert figures[("mro_stage_batch_commit_seconds_count", (("stage", "sign"),))] >= 1
        assert figures[("mro_link_state", (("state", "ISOLATED"),))] == 1
        assert figures[("mro_dlq_reports_total", (("stage", "ingest"),))] == 1

        box.pipeline.kill("validate")
        wait_until(lambda: {s["name"]: s["state"] for s in box.state(operator)["services"]}["validate"] == "down",
                   30, 0.3, "the killed stage shown down")
        assert box.metrics()[("mro_service_state", (("service", "validate"), ("state", "down")))] == 1

        operator.post("/logout")
        assert operator.get("/api/state").status_code == 401


def browser_tools() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium and chromedriver are missing: scripts/ensure-tools installs them (Debian packages "
                    "chromium, chromium-driver)")
    return chromium, driver


def test_headless_chromium_shows_what_the_box_does(tmp_path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    chromium, chromedriver = browser_tools()
    broker = start_broker("mosquitto", tmp_path / "data")
    try:
        box = start_box(broker, tmp_path)
    except BaseException:
        broker.stop()
        raise
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.get(box.url + "/")
        assert driver.current_url.endswith("/login")
        driver.find_element(By.ID, "user").send_keys("op")
        driver.find_element(By.ID, "password").send_keys("not the password")
        driver.find_element(By.ID, "login").click()
        wait_until(lambda: any("Wrong operator or password" in e.text for e in driver.find_elements(By.ID, "error")),
                   20, 0.2, "the refusal (answered after a deliberate delay)")
        driver.find_element(By.ID, "user").send_keys("op")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()
        # the page loads after the login's redirect: until then there is no #station to read
        wait_until(lambda: [e.text for e in driver.find_elements(By.ID, "station")] == ["HGR1"], 20, 0.2,
                   "the page")
        assert driver.execute_script("return document.cookie") == "", "the session cookie is HttpOnly"

        send_good_and_bad(box)

        def text(css: str) -> str:
            """The element's text now (read in one script: the page redraws every second)."""
            return driver.execute_script(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css)

        def service_state(name: str) -> str:
            return driver.execute_script(
                "const e = document.querySelector(arguments[0]); return e ? e.dataset.state : ''",
                f'#services tr[data-service="{name}"]')

        wait_until(lambda: all(service_state(n) == "up" for n in ("ingest", "validate", "sign")), 30, 0.3,
                   "the stages shown up")
        wait_until(lambda: text("#link-state") == "ISOLATED", 30, 0.3, "the link shown ISOLATED")
        assert "ISOLATED" in text("#link-history")
        dlq_row = wait_until(lambda: text('#dlq tr[data-stage="ingest"]'), 30, 0.3, "the DLQ entry")
        assert "TAB-07" in dlq_row and "text_control_char" in dlq_row and "$.notes" in dlq_row
        assert "\u202e" not in driver.page_source and "U+202E" not in driver.page_source
        assert "link_isolated" in wait_until(lambda: text("#alarms"), 30, 0.3, "the alarms")
        wait_until(lambda: text('#devices tr[data-device="TAB-07"]'), 30, 0.3, "the device's last seen")
        wait_until(lambda: int(text("#rate-total") or 0) >= 1, 90, 0.5, "records counted in the chart")
        assert driver.execute_script("return document.querySelectorAll('#rate-chart rect').length") >= 1
        # every stage reports its store's use against its cap (shared/runtime/status.py `store`)
        for stage in ("ingest", "validate", "sign"):
            cap = box.pipeline.config.store_cap_mb(stage)
            assert f"{cap} MB" in wait_until(lambda s=stage: text(f'#stores tr[data-store="{s}"]'), 30, 0.3,
                                             f"{stage}'s store in the disk section")
        assert driver.execute_script("return document.getElementById('disk').hidden") is False
        # ingest measures the data directory against the storage budget (shared/runtime/budget.py)
        classes = wait_until(lambda: text("#storage-classes"), 30, 0.3, "the storage budget section")
        assert all(name in classes for name in ("ledger", "intake", "logs")), classes
        assert text("#storage-budget") == "24.0 GiB"
        assert "MiB" in text("#storage-used") and text("#storage-refusing") == ""
        forecast = text("#storage-forecast")
        assert forecast == "not filling" or forecast.startswith("fills in about"), forecast
        # ingest says how many raw reads wait for a work session: none here
        assert wait_until(lambda: text("#unassigned-count"), 30, 0.3, "the unassigned reads") == "0"

        box.pipeline.kill("sign")
        wait_until(lambda: service_state("sign") == "down", 30, 0.3, "the killed stage shown down")
        driver.save_screenshot(str(tmp_path / "mcc.png"))  # for a person to look at after a failure
    finally:
        driver.quit()
        box.pipeline.stop()
        broker.stop()


def test_uplink_metrics_follow_a_real_outage(tmp_path) -> None:
    """The whole box with a real gateway behind a link fault: while the link is refused the
    backlog and the oldest unsent record's age grow on /metrics; once it passes again both go
    to zero and the acknowledged seq is the ledger's head, as the gateway's own /metrics says."""
    from tests.edge import EdgeStack, database

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with database("sqlite", tmp_path) as db_url, \
            EdgeStack(tmp_path, db_url, MRO_MCC_LISTEN=f"127.0.0.1:{port}") as edge:
        edge.pipeline.start("mcc", wait=False)
        box = Box(edge.pipeline, url)

        def figures() -> dict[tuple[str, tuple], float]:
            try:
                return box.metrics()
            except httpx.HTTPError:
                return {}

        edge.proxy.set("refuse")
        edge.wait_state("ISOLATED")
        edge.send(20)
        held = wait_until(lambda: (f := figures()).get(("mro_uplink_backlog_entries", ())) == 20
                          and f.get(("mro_link_state", (("state", "ISOLATED"),))) == 1 and f, 60, 0.5,
                          "/metrics to show the 20 entries held while ISOLATED")
        assert held[("mro_uplink_oldest_unsent_seconds", ())] > 0

        edge.proxy.set("pass")
        edge.wait_state("CONNECTED", timeout_s=60)
        head = edge.ledger()[-1].seq
        drained = wait_until(lambda: (f := figures()).get(("mro_uplink_backlog_entries", ())) == 0
                             and f.get(("mro_uplink_acked_seq", ())) == head and f, 60, 0.5,
                             "/metrics to show the backlog drained")
        assert drained[("mro_uplink_oldest_unsent_seconds", ())] == 0
        assert drained[("mro_link_state", (("state", "CONNECTED"),))] == 1
        central = httpx.get(edge.gateway.url + "/metrics", timeout=10).text
        heads = {s.labels["origin"]: s.value for family in text_string_to_metric_families(central)
                 for s in family.samples if s.name == "mro_gateway_head_seq"}
        assert heads[edge.origin] == head
