"""Link faults between the box and the gateway, through a TCP proxy the tests control.

Real processes throughout (Mosquitto, ingest/validate/sign, uplink, heartbeat, the gateway on
SQLite), probes every 0.3 s with a 500 ms threshold. For each fault the heartbeat must walk
exactly CONNECTED -> DEGRADED -> ISOLATED and, once the link is back, ISOLATED -> RECONCILING
-> CONNECTED; records sent during the fault must reach the ledger (with `recorded` receipts)
while nothing goes out, and the gateway must end with exactly the local ledger.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.edge import EdgeStack, database
from tests.linkfault import LinkFault
from tests.pipeline import wait_until
from tests.support.gateway import ThreadedGateway

pytestmark = pytest.mark.timeout(300)

FAULTS = {
    "latency": {"mode": "latency", "latency_s": 0.4},  # a probe takes ~800 ms; the threshold is 500 ms
    "timeout": {"mode": "latency", "latency_s": 3.0},  # beyond the probe's timeout (threshold + 1 s)
    "refused": {"mode": "refuse"},
    "dropped": {"mode": "drop"},
    "http_503": {"mode": "http_error", "status": 503},
    "http_500": {"mode": "http_error", "status": 500},
    "blackhole": {"mode": "blackhole"},
    "answer_lost": {"mode": "cut"},
}
OUTAGE = ["CONNECTED", "DEGRADED", "ISOLATED", "RECONCILING", "CONNECTED"]


def test_the_proxy_does_what_it_says(tmp_path) -> None:
    """tests/linkfault.py itself, against the real gateway: each mode, and a mode switch reaching
    a kept-alive connection at once."""
    with ThreadedGateway(f"sqlite:///{tmp_path}/gw.db") as gateway, LinkFault(gateway.port) as proxy, \
            httpx.Client(base_url=proxy.url, timeout=2.0) as http:
        assert http.get("/health").status_code == 200
        proxy.set("latency", latency_s=0.2)
        start = time.monotonic()
        assert http.get("/health").status_code == 200
        assert time.monotonic() - start >= 0.4, "a round trip pays the latency both ways"
        proxy.set("http_error", status=500)
        assert http.get("/health").status_code == 500
        assert proxy.requests_since(0)[-1].startswith("GET /health ")
        proxy.set("refuse")
        with pytest.raises(httpx.ConnectError):
            http.get("/health")
        proxy.set("drop")
        with pytest.raises(httpx.TransportError):
            http.get("/health")
        proxy.set("blackhole")
        with pytest.raises(httpx.ReadTimeout):
            http.get("/health", timeout=0.5)
        proxy.set("cut")
        with pytest.raises(httpx.TransportError):
            http.get("/health")
        proxy.set("health_only", status=503)
        assert http.get("/health").status_code == 200
        assert http.get("/v1/head").status_code == 503
        proxy.set("pass")
        assert http.get("/health").status_code == 200
        # a kept-alive connection opened in pass mode is cut by a switch: the next request fails
        proxy.set("pass")
        assert http.get("/health").status_code == 200
        proxy.set("blackhole")
        with pytest.raises(httpx.HTTPError):
            http.get("/health", timeout=0.5)
        with pytest.raises(ValueError):
            proxy.set("sideways")


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("link")
    with database("sqlite", tmp) as url, EdgeStack(tmp, url) as stack:
        yield stack


@pytest.fixture
def link(edge):
    """The shared stack, with the link up and the box CONNECTED and in sync at the start."""
    edge.proxy.set("pass")
    edge.wait_state("CONNECTED")
    edge.wait_uplink(lambda s: s.get("in_sync") and s.get("link") == "CONNECTED", what="uplink in sync")
    yield edge
    edge.proxy.set("pass")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_isolates_records_keep_flowing_and_the_box_reconciles(link, fault) -> None:
    edge = link
    start = time.monotonic()
    edge.proxy.set(**FAULTS[fault])
    edge.wait_state("ISOLATED", timeout_s=30)
    edge.wait_uplink(lambda s: s.get("link") == "ISOLATED", what="the uplink to see ISOLATED")
    head_at_isolation = edge.gateway_head()
    ledger_before = len(edge.ledger())
    isolated_at = time.monotonic()

    edge.send(300)  # waits for every `recorded` receipt
    assert len(edge.ledger()) == ledger_before + 300, "records keep flowing into the ledger"
    status = edge.wait_uplink(lambda s: s.get("backlog", 0) >= 300, what="the backlog to show")
    assert status["link"] == "ISOLATED" and status["in_sync"] is False
    time.sleep(1.0)
    assert edge.gateway_head() == head_at_isolation, "nothing was uploaded while ISOLATED"
    assert all(line.startswith("GET /health ") for line in edge.proxy.requests_since(isolated_at)), \
        "while ISOLATED only the heartbeat's probes go out"
    assert edge.state() == "ISOLATED"

    edge.proxy.set("pass")
    edge.wait_state("CONNECTED", timeout_s=30)
    assert edge.states(since=start) == OUTAGE
    edge.assert_gateway_has_ledger(edge.sent)
    connectivity = edge.connectivity[-1].payload
    assert connectivity["backlog"] in (0, None) or connectivity["state"] == "CONNECTED"


def test_one_slow_probe_degrades_and_a_good_one_reconnects(link) -> None:
    edge = link
    start = time.monotonic()
    edge.proxy.set("latency", latency_s=0.4)
    wait_until(lambda: "DEGRADED" in edge.states(since=start), 10, 0.01, "DEGRADED")
    edge.proxy.set("pass")
    edge.wait_state("CONNECTED")
    time.sleep(1.0)
    assert edge.states(since=start) == ["CONNECTED", "DEGRADED", "CONNECTED"]
    edge.send(50)
    edge.wait_uplink(lambda s: s.get("in_sync"), what="uplink in sync")
    edge.assert_gateway_has_ledger(edge.sent)


def test_the_link_dropping_while_reconciling_isolates_again(link) -> None:
    edge = link
    start = time.monotonic()
    edge.proxy.set("refuse")
    edge.wait_state("ISOLATED")
    edge.wait_uplink(lambda s: s.get("link") == "ISOLATED", what="the uplink to see ISOLATED")
    edge.send(200)
    # probes get through again but uploads do not: RECONCILING, and it cannot finish
    edge.proxy.set("health_only", status=503)
    edge.wait_state("RECONCILING")
    time.sleep(1.5)
    assert edge.state() == "RECONCILING", "not CONNECTED while the backlog cannot be delivered"
    assert edge.uplink_status()["in_sync"] is False
    assert any(line.startswith("POST /v1/entries ") for line in edge.proxy.requests_since(start)), \
        "the uplink tried to deliver while RECONCILING"
    edge.proxy.set("refuse")
    edge.wait_state("ISOLATED")
    edge.proxy.set("pass")
    edge.wait_state("CONNECTED")
    assert edge.states(since=start) == ["CONNECTED", "DEGRADED", "ISOLATED", "RECONCILING", "ISOLATED",
                                        "RECONCILING", "CONNECTED"]
    edge.assert_gateway_has_ledger(edge.sent)


def test_breaker_opens_half_opens_and_closes_visibly_in_status(tmp_path) -> None:
    """A gateway that answers 503 to everything while the heartbeat never isolates (isolate_after
    is huge): the uplink's breaker must open, try again after reset_s, and close once the
    gateway is back, every state showing in `status/uplink`."""
    settings = {"MRO_LINK_ISOLATE_AFTER": "100000", "MRO_UPLINK_BREAKER_FAILURES": "2",
                "MRO_UPLINK_RETRY_ATTEMPTS": "1", "MRO_UPLINK_BREAKER_RESET_S": "0.5"}
    with database("sqlite", tmp_path) as url, EdgeStack(tmp_path, url, **settings) as edge:
        start = time.monotonic()

        def breaker_walk() -> list[str]:
            walked: list[str] = []
            for message in edge.recorder.of(edge.topics.status("uplink")):
                state = message.payload.get("breaker")
                if message.at >= start and state and (not walked or walked[-1] != state):
                    walked.append(state)
            return walked

        def has(*states: str):
            def seen() -> bool:
                walked = breaker_walk()
                return any(walked[i:i + len(states)] == list(states) for i in range(len(walked)))
            return seen

        edge.proxy.set("http_error", status=503)
        edge.wait_state("DEGRADED")
        edge.send(100)
        wait_until(has("CLOSED", "OPEN", "HALF_OPEN", "OPEN", "HALF_OPEN", "OPEN"), 20, 0.05,
                   "the breaker to open, try, and open again")
        assert edge.gateway_count() == 0
        edge.proxy.set("pass")
        edge.wait_uplink(lambda s: s.get("breaker") == "CLOSED" and s.get("in_sync"),
                         what="breaker CLOSED, in sync")
        edge.wait_state("CONNECTED")
        walked = breaker_walk()
        legal = {("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "OPEN"), ("HALF_OPEN", "CLOSED")}
        assert all(pair in legal for pair in zip(walked, walked[1:], strict=False)), walked
        assert walked[0] == "CLOSED" and walked[-2:] == ["HALF_OPEN", "CLOSED"], walked
        assert edge.states(since=start) == ["CONNECTED", "DEGRADED", "CONNECTED"]
        edge.assert_gateway_has_ledger(edge.sent)


def test_a_restarted_heartbeat_keeps_the_isolated_state(link) -> None:
    """kill -9 of the heartbeat while ISOLATED: the new one resumes from its retained state
    instead of claiming CONNECTED for a link nobody has probed yet."""
    edge = link
    start = time.monotonic()
    edge.proxy.set("refuse")
    edge.wait_state("ISOLATED")
    edge.pipeline.kill("heartbeat")
    restarted = time.monotonic()
    edge.pipeline.start("heartbeat")
    time.sleep(1.0)
    assert edge.states(since=restarted) == ["ISOLATED"]
    edge.proxy.set("pass")
    edge.wait_state("CONNECTED")
    assert edge.states(since=start) == OUTAGE


def test_status_command_shows_the_link(link) -> None:
    """`mro-edge status --service uplink|heartbeat --check` (the compose health checks) and the
    link figures in `mro-edge status --json`."""
    import json
    import subprocess
    import sys

    from tests.pipeline import ROOT

    edge = link

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mro_edge", *args], env=edge.pipeline.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    for service in ("uplink", "heartbeat"):
        assert cli("status", "--service", service, "--check").returncode == 0, service
    statuses = json.loads(cli("status", "--json").stdout)
    assert statuses["connectivity"]["state"] == "CONNECTED"
    uplink = statuses["uplink"]
    assert uplink["breaker"] == "CLOSED" and uplink["backlog"] == 0 and uplink["in_sync"] is True
    assert uplink["acked_seq"] == edge.sent - 1 == uplink["local_head"] == uplink["gateway_head"]
    edge.pipeline.kill("uplink")
    try:
        checked = cli("status", "--service", "uplink", "--check")
        assert checked.returncode == 1, "a dead uplink fails its check"
    finally:
        edge.pipeline.start("uplink")


def test_a_refused_token_alarms_and_a_new_one_is_picked_up_without_a_restart(link) -> None:
    edge = link
    start = time.monotonic()
    token_path = edge.data_dir / "uplink" / "token"
    edge.pipeline.kill("uplink")
    token_path.write_text("not-a-registered-token\n")
    edge.pipeline.start("uplink")
    edge.send(50)
    wait_until(lambda: any(a.get("service") == "uplink" and a.get("alarm") == "invalid_token"
                           for a in edge.alarms()), 30, 0.1, "an invalid_token alarm")
    assert edge.uplink_status()["in_sync"] is False
    token_path.write_text(edge.token + "\n")
    edge.wait_uplink(lambda s: s.get("in_sync") and s.get("acked_seq") == edge.sent - 1, timeout_s=30,
                     what="delivery with the right token")
    assert edge.states(since=start) == ["CONNECTED"], "the link itself was fine all along"
    edge.assert_gateway_has_ledger(edge.sent)


# --- issues 8 item 5, 9 items 7 and 10 -------------------------------------------------------

def uplink_statuses(edge: EdgeStack, since: float, until: float = float("inf")) -> list[dict]:
    return [m.payload for m in edge.recorder.of(edge.topics.status("uplink")) if since <= m.at <= until]


def test_connected_only_once_the_gateway_holds_the_ledger_after_a_blackhole(link) -> None:
    """Probes every 0.3 s, a black-holed probe times out after 1.5 s: the heartbeat's inbox
    fills with uplink statuses during the outage, the oldest from just after the cut saying
    in_sync:true. CONNECTED must wait until the gateway holds the whole ledger, ended by a
    status the uplink computed after RECONCILING began."""
    edge = link
    start = time.monotonic()
    edge.proxy.set("blackhole")
    edge.wait_state("ISOLATED", timeout_s=30)
    edge.wait_uplink(lambda s: s.get("link") == "ISOLATED", what="the uplink to see ISOLATED")
    edge.send(2000, timeout_s=180)
    edge.wait_uplink(lambda s: s.get("backlog", 0) >= 2000, what="the backlog to show")
    time.sleep(2.0)  # more statuses wait while the probes hang
    assert edge.state() == "ISOLATED"

    restored = time.monotonic()
    edge.proxy.set("pass")
    connected = edge.wait_state("CONNECTED", timeout_s=60)
    held = edge.gateway_count()  # at once: CONNECTED says the gateway holds it all
    local = edge.ledger()
    assert held == len(local) == edge.sent, f"CONNECTED while the gateway held {held} of {len(local)}"
    assert edge.gateway_head() == (local[-1].seq, local[-1].hash)
    assert edge.states(since=start) == OUTAGE
    reconciling = min(m.at for m in edge.connectivity
                      if m.at >= restored and m.payload["state"] == "RECONCILING")
    last = uplink_statuses(edge, reconciling, connected)[-1]
    assert last["link"] == "RECONCILING" and last["in_sync"] is True and last["backlog"] == 0, last
    assert last["gateway_head"] == last["local_head"] == local[-1].seq, last
    assert last["link_epoch"] == edge.connectivity[-1].payload["epoch"] - 1, "the RECONCILING it ended"
    edge.assert_gateway_has_ledger(edge.sent)


def test_a_restarted_uplink_calls_nothing_while_isolated(link) -> None:
    """kill -9 of the uplink while ISOLATED, with a backlog: the new one starts knowing nothing
    about the link and learns ISOLATED from the retained state; it must not call the gateway
    in between. The proxy answers 503 to everything and keeps every request line."""
    edge = link
    start = time.monotonic()
    edge.proxy.set("http_error", status=503)
    edge.wait_state("ISOLATED")
    edge.wait_uplink(lambda s: s.get("link") == "ISOLATED", what="the uplink to see ISOLATED")
    edge.send(100)
    edge.wait_uplink(lambda s: s.get("backlog", 0) >= 100, what="the backlog to show")
    for _ in range(3):
        edge.pipeline.kill("uplink")
        restarted = time.monotonic()
        edge.pipeline.start("uplink")
        pid = edge.pipeline.procs["uplink"].pid
        edge.wait_uplink(lambda s, pid=pid: s.get("pid") == pid and s.get("link") == "ISOLATED",
                         what="the restarted uplink to see ISOLATED")
        time.sleep(2.0)
        lines = edge.proxy.requests_since(restarted)
        assert lines, "the heartbeat kept probing"
        calls = [line for line in lines if not line.startswith("GET /health ")]
        assert calls == [], f"the restarted uplink called the gateway while ISOLATED: {calls}"
    assert edge.states(since=start) == ["CONNECTED", "DEGRADED", "ISOLATED"]
    edge.proxy.set("pass")
    edge.wait_state("CONNECTED")
    edge.assert_gateway_has_ledger(edge.sent)


def test_link_state_is_published_once_per_transition_and_alarms(link) -> None:
    """status/connectivity: once per transition, and an unchanged state again only after
    link.state_refresh_s (4 s here), never on every probe (0.3 s). ISOLATED raises an alarm, so
    does DEGRADED lasting over link.degraded_alarm_s (1 s; a black-holed probe takes 1.5 s).
    status/uplink at stage.status_interval_s (1 s here) while nothing changes."""
    edge = link
    time.sleep(0.5)
    quiet = time.monotonic()
    time.sleep(5.0)
    refreshes = [m.payload for m in edge.connectivity if m.at >= quiet]
    assert 1 <= len(refreshes) <= 2, f"{len(refreshes)} connectivity messages in 5 quiet seconds"
    assert {p["state"] for p in refreshes} == {"CONNECTED"} and len({p["epoch"] for p in refreshes}) == 1
    uplink = uplink_statuses(edge, quiet, quiet + 5.0)
    assert 3 <= len(uplink) <= 7, f"{len(uplink)} uplink statuses in 5 quiet seconds (status_interval_s 1)"

    start = time.monotonic()
    edge.proxy.set("blackhole")
    edge.wait_state("ISOLATED", timeout_s=30)
    edge.proxy.set("pass")
    edge.wait_state("CONNECTED", timeout_s=30)
    time.sleep(0.5)
    messages = [m for m in edge.connectivity if m.at >= start]
    walked = [m.payload["state"] for m in messages]
    assert [s for i, s in enumerate(walked) if i == 0 or walked[i - 1] != s] == OUTAGE[1:], walked
    for before, after in zip(messages, messages[1:], strict=False):
        if before.payload["state"] == after.payload["state"]:
            assert after.at - before.at >= 3.5, f"{after.payload['state']} published twice: {walked}"
            assert after.payload["epoch"] == before.payload["epoch"], "a refresh keeps the epoch"
        else:
            assert after.payload["epoch"] > before.payload["epoch"], "every transition has a new epoch"
    raised = [m.payload for m in edge.recorder.of(edge.topics.alarm)
              if m.at >= start and m.payload.get("service") == "heartbeat"]
    assert [a["alarm"] for a in raised] == ["link_degraded", "link_isolated", "link_restored"], raised
    assert [a["link"] for a in raised] == ["DEGRADED", "ISOLATED", "CONNECTED"]


def test_an_uplink_started_before_sign_has_its_ledger_table(tmp_path) -> None:
    """The uplink starts while sign's store exists without its `ledger` table (sign starting,
    or not started yet): its status says the ledger is empty, it keeps running and hearing,
    and once sign runs it delivers everything, without a restart."""
    from shared.runtime.store import Store

    with database("sqlite", tmp_path) as url, \
            EdgeStack(tmp_path, url, start_link=False, stages=("ingest", "validate")) as edge:
        Store(edge.data_dir / "sign", ("meta",), map_size_mb=64).close()
        started = time.monotonic()
        edge.start_uplink()
        pid = edge.pipeline.procs["uplink"].pid
        edge.start_heartbeat()
        edge.wait_state("CONNECTED")
        time.sleep(2.5)
        assert edge.pipeline.alive("uplink")
        ours = [s for s in uplink_statuses(edge, started) if s.get("pid") == pid and s.get("state") == "up"]
        assert len(ours) >= 2 and all(s["local_head"] == -1 for s in ours), ours
        edge.start_stage("sign")
        edge.send(100)
        edge.wait_uplink(lambda s: s.get("in_sync") and s.get("acked_seq") == 99, what="all 100 delivered")
        assert edge.pipeline.procs["uplink"].pid == pid and edge.pipeline.alive("uplink")
        edge.assert_gateway_has_ledger(100)
