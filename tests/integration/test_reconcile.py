"""Outage and reconcile: 10,000 records while ISOLATED, then the link comes back.

Real processes throughout: Mosquitto, ingest/validate/sign, uplink, heartbeat and the gateway
(its own process, so it can be kill -9'd), on SQLite and on a real PostgreSQL server (which
must be reachable: these tests fail without it, they never skip). Each scenario ends with the
gateway holding exactly the local ledger (same count, same bytes, chain and signatures
verified, same head hash) and the box CONNECTED:

- a clean outage and drain;
- the link flapping during the drain (refused, reset, answers lost after the gateway stored
  the batch, 503s);
- kill -9 of the uplink mid-drain, and kill -9 of the gateway mid-drain;
- the gateway restored from an older backup (it lost entries it had acknowledged).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tests.edge import EdgeStack, assert_legal_walk, database
from tests.pipeline import wait_until

pytestmark = pytest.mark.timeout(600)

N = 10_000
OUTAGE = ["CONNECTED", "DEGRADED", "ISOLATED", "RECONCILING", "CONNECTED"]
# Small batches for the mid-drain scenarios, so the drain lasts long enough to be interrupted.
MID_DRAIN = {"MRO_UPLINK_BATCH": "250"}


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


def isolate_and_record(edge: EdgeStack, count: int) -> float:
    """Cut the link, wait for ISOLATED, record `count` records (every one `recorded`), and wait
    until the uplink holds them all. Returns when the outage began."""
    start = time.monotonic()
    edge.proxy.set("refuse")
    edge.wait_state("ISOLATED")
    edge.wait_uplink(lambda s: s.get("link") == "ISOLATED", what="the uplink to see ISOLATED")
    edge.send(count, timeout_s=240)
    assert len(edge.ledger()) == edge.sent, "records keep flowing into the ledger while ISOLATED"
    edge.wait_uplink(lambda s: s.get("queued") == count and s.get("backlog") == count, timeout_s=60,
                     what=f"the uplink to hold all {count} entries")
    assert edge.state() == "ISOLATED"
    assert edge.gateway_count() == 0, "nothing went out while ISOLATED"
    return start


def wait_mid_drain(edge: EdgeStack, count: int, fraction: float = 0.2) -> int:
    """Until the gateway holds at least `fraction` of the backlog; returns its head seq then."""
    def progressed():
        seq = edge.gateway_head()[0]
        return seq + 1 if seq + 1 >= count * fraction else None

    held = wait_until(progressed, 60, 0.005, "the drain to get going")
    assert held < count, "the drain finished before the test could interrupt it; use smaller batches"
    return held


def assert_reconciled(edge: EdgeStack, start: float, expected_walk: list[str] | None = None) -> list[str]:
    edge.wait_state("CONNECTED", timeout_s=120)
    status = edge.wait_uplink(lambda s: s.get("in_sync") and s.get("acked_seq") == edge.sent - 1,
                              what="every entry acknowledged, in sync")
    assert status["backlog"] == 0 and status["queued"] == 0 and status["breaker"] == "CLOSED"
    edge.assert_gateway_has_ledger(edge.sent)
    walked = edge.states(since=start)
    assert_legal_walk(walked)
    if expected_walk is not None:
        assert walked == expected_walk
    return walked


def test_outage_of_10000_records_then_reconcile(tmp_path, backend) -> None:
    with database(backend, tmp_path) as url, EdgeStack(tmp_path, url) as edge:
        start = isolate_and_record(edge, N)
        restored = time.monotonic()
        edge.proxy.set("pass")
        edge.send(500, wait=False)  # live records during the drain: taken in, not starved
        connected = edge.wait_state("CONNECTED", timeout_s=120)
        edge.wait_recorded()
        assert_reconciled(edge, start, OUTAGE)
        # CONNECTED only once drained: the first CONNECTED after the outage came with the last entry
        assert connected - restored < 60
        assert_connected_only_when_drained(edge, restored)
        # the live records were acknowledged after CONNECTED; the connectivity status carries the
        # uplink's figures as of its last publication (on a change, else every MRO_LINK_STATE_REFRESH_S)
        wait_until(lambda: edge.connectivity[-1].payload["last_acked_seq"] == edge.sent - 1, 30, 0.2,
                   "the connectivity status to show every record acknowledged")
        assert edge.connectivity[-1].payload["state"] == "CONNECTED"
        # the box's receipt: a checkpoint of its ledger, checked against the held entries and cosigned
        status = edge.wait_uplink(lambda s: (s.get("cosigned_size") or 0) > 0, timeout_s=30,
                                  what="a checkpoint cosigned by the gateway")
        assert status["cosigned_size"] <= edge.sent


def assert_connected_only_when_drained(edge: EdgeStack, restored: float) -> None:
    """The uplink said in_sync (drained, heads equal) before the heartbeat said CONNECTED, and not
    before it had drained: every status between the restore and that report showed a backlog."""
    connected = min(m.at for m in edge.connectivity if m.at >= restored and m.payload["state"] == "CONNECTED")
    statuses = [m for m in edge.recorder.of(edge.topics.status("uplink")) if restored <= m.at <= connected]
    assert statuses, "no uplink status between the restore and CONNECTED"
    last = statuses[-1].payload
    assert last["in_sync"] and last["backlog"] == 0
    assert last["acked_seq"] == last["local_head"] == last["gateway_head"]
    for message in statuses[:-1]:
        status = message.payload
        assert not status["in_sync"] or status["backlog"] == 0, status


def test_link_flapping_during_the_drain(tmp_path, backend) -> None:
    with database(backend, tmp_path) as url, EdgeStack(tmp_path, url, **MID_DRAIN) as edge:
        start = isolate_and_record(edge, N)
        edge.proxy.set("pass")
        wait_mid_drain(edge, N, 0.1)
        faults = [{"mode": "refuse"}, {"mode": "cut"}, {"mode": "drop"},
                  {"mode": "http_error", "status": 503}, {"mode": "cut"}]
        interrupted = 0
        for fault in faults:
            if edge.gateway_head()[0] >= N - 1:
                break
            edge.proxy.set(**fault)
            time.sleep(0.4)
            edge.proxy.set("pass")
            interrupted += 1
            time.sleep(0.3)
        assert interrupted >= 2, "the drain ended before the link could flap"
        walked = assert_reconciled(edge, start)
        assert walked[:4] == ["CONNECTED", "DEGRADED", "ISOLATED", "RECONCILING"]
        assert walked[-1] == "CONNECTED"


def test_kill_9_of_the_uplink_mid_drain(tmp_path, backend) -> None:
    with database(backend, tmp_path) as url, EdgeStack(tmp_path, url, **MID_DRAIN) as edge:
        start = isolate_and_record(edge, N)
        edge.proxy.set("pass")
        wait_mid_drain(edge, N)
        edge.pipeline.kill("uplink")
        held = edge.gateway_count()
        assert 0 < held < N, held
        time.sleep(1.0)
        assert edge.state() == "RECONCILING", "a dead uplink cannot end RECONCILING"
        edge.pipeline.restart("uplink")
        assert_reconciled(edge, start, OUTAGE)


def test_kill_9_of_the_gateway_mid_drain(tmp_path, backend) -> None:
    with database(backend, tmp_path) as url, EdgeStack(tmp_path, url, **MID_DRAIN) as edge:
        start = isolate_and_record(edge, N)
        edge.proxy.set("pass")
        wait_mid_drain(edge, N)
        edge.gateway.kill()
        held = edge.gateway_count()
        assert 0 < held < N, held
        edge.wait_state("ISOLATED")
        edge.send(200)  # recorded while the central side is down
        edge.gateway.start()
        assert_reconciled(edge, start, OUTAGE[:-1] + ["ISOLATED", "RECONCILING", "CONNECTED"])


def test_gateway_restored_from_an_older_backup_gets_the_lost_entries_again(tmp_path) -> None:
    """The central database is rolled back to a backup: it lost entries it had acknowledged.
    The box notices (the gateway's head is behind its acknowledged seq), raises an alarm and
    sends them again from its own ledger."""
    with database("sqlite", tmp_path) as url, EdgeStack(tmp_path, url) as edge:
        db_path = Path(url.removeprefix("sqlite:///"))
        backup = tmp_path / "backup.db"
        edge.send(300)
        edge.wait_uplink(lambda s: s.get("in_sync") and s.get("acked_seq") == 299, what="300 acknowledged")
        with sqlite3.connect(db_path) as source, sqlite3.connect(backup) as target:
            source.backup(target)
        edge.send(200)
        edge.wait_uplink(lambda s: s.get("in_sync") and s.get("acked_seq") == 499, what="500 acknowledged")
        edge.gateway.stop()
        for suffix in ("-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        backup.replace(db_path)
        edge.gateway.start()
        assert edge.gateway_count() == 300
        wait_until(lambda: any(a.get("alarm") == "gateway_behind" for a in edge.alarms()), 30, 0.1,
                   "a gateway_behind alarm")
        edge.wait_uplink(lambda s: s.get("in_sync") and s.get("acked_seq") == 499, timeout_s=60,
                         what="the lost entries sent again")
        edge.wait_state("CONNECTED")
        edge.assert_gateway_has_ledger(500)
