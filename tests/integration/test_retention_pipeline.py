"""Retention end to end: Mosquitto, the real stages, uplink and a gateway on PostgreSQL.

Nothing is pruned while the gateway holds nothing (no uplink: it never acknowledged or
cosigned); once it has acknowledged and cosigned, every stage prunes the fates past the
dedupe window, and not before: a re-send inside the window is still answered as a duplicate
with its original seq. After pruning, the ledger is whole and verifies, and the gateway holds
exactly it; a re-send after that is the window's documented consequence: signed again, and
flagged a business duplicate by the gateway. Days pass through the retention clock file
(`MRO_RETENTION_CLOCK_FILE`), never by sleeping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from shared.runtime import dlq, retention
from shared.runtime.messages import json_encode
from shared.runtime.retention import DAY_S
from shared.runtime.stage import RUNTIME_TABLES
from shared.runtime.store import Store, u64
from tests.edge import EdgeStack, database
from tests.pipeline import ROOT, STAGES, wait_until
from tests.support.gateway import gateway_reader

PRUNERS = (*STAGES, "uplink")


def retention_of(edge: EdgeStack, stage: str) -> dict:
    statuses = [s for s in edge.status_of(stage) if "retention" in s]
    return statuses[-1]["retention"] if statuses else {}


def rounds_after(edge: EdgeStack, stage: str, rounds: int) -> dict:
    """The stage's retention figures once it finished more than `rounds` rounds."""
    return wait_until(lambda: (r := retention_of(edge, stage)) and r["rounds"] > rounds and r, 30, 0.1,
                      f"{stage} finishing a retention round after round {rounds}")


def test_retention_prunes_only_what_the_gateway_holds(tmp_path) -> None:
    clock = tmp_path / "retention-clock"
    clock.write_text("0")
    with database("postgres", tmp_path) as db_url, EdgeStack(
            tmp_path, db_url, start_link=False, MRO_RETENTION_INTERVAL_S="0.3",
            MRO_RETENTION_CLOCK_FILE=str(clock), MRO_LEDGER_CHECKPOINT_INTERVAL_S="1",
            MRO_LEDGER_CHECKPOINT_MIN_INTERVAL_S="0.5") as edge:
        edge.send(40)

        # The gateway holds nothing (the uplink never ran): 31 days on, every fate stays.
        clock.write_text(str(31 * DAY_S))
        before = {stage: rounds_after(edge, stage, 0)["rounds"] for stage in STAGES}
        for stage in STAGES:
            figures = rounds_after(edge, stage, before[stage])
            assert figures["seen_pruned"] == 0 and figures["prunable_below"] is None, (stage, figures)

        # Inside the window: the gateway acknowledges and cosigns, yet nothing goes.
        clock.write_text("0")
        edge.start_uplink()
        edge.start_heartbeat()
        edge.wait_state("CONNECTED")
        edge.wait_uplink(lambda s: s.get("cosigned_size", 0) >= 40 and s.get("acked_seq") == 39, 60,
                         "the gateway acknowledging and cosigning all 40 entries")
        for stage in PRUNERS:
            wait_until(lambda st=stage: (retention_of(edge, st).get("prunable_below") or 0) >= 40, 30, 0.1,
                       f"{stage} hearing what the gateway holds")
            figures = rounds_after(edge, stage, retention_of(edge, stage)["rounds"])
            assert figures["seen_pruned"] == 0, (stage, figures)
        device = edge.devices()[0]
        event_id, sent = next(iter(device.sent.items()))
        original = sent.final
        assert original is not None
        sent.receipts.clear()
        device.send(event_id, sent.payload)
        answer = wait_until(lambda: sent.final, 30, 0.1, "the re-send's answer")
        assert answer["status"] == "duplicate" and answer["seq"] == original["seq"], (answer, original)

        # Past the window: every stage prunes what the gateway holds.
        clock.write_text(str(31 * DAY_S))
        for stage in PRUNERS:
            wait_until(lambda st=stage: retention_of(edge, st).get("seen_pruned", 0) >= 40, 30, 0.1,
                       f"{stage} pruning the 40 fates the gateway holds")
        assert all(retention_of(edge, stage)["seen_pruned"] <= 41 for stage in PRUNERS)

        assert not [a for a in edge.alarms() if a.get("alarm") == "hop_auth"], edge.alarms()

        # The ledger is untouched: whole, at the gateway, and it verifies.
        edge.assert_gateway_has_ledger(40)
        audit = tmp_path / "audit"
        env = edge.pipeline.env
        exported = subprocess.run([sys.executable, "-m", "mro_edge", "audit", "export", "--out", str(audit)],
                                  env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert exported.returncode == 0, exported.stderr
        verified = subprocess.run([sys.executable, "-m", "mro_edge", "audit", "verify", str(audit)],
                                  env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert verified.returncode == 0 and verified.stdout.startswith("OK: 40 entries"), \
            verified.stdout + verified.stderr

        # The window's consequence: a re-send after its fate was pruned is a new record, signed
        # again, and the gateway flags it a business duplicate of the first (its own window).
        sent.receipts.clear()
        device.send(event_id, sent.payload)
        late = wait_until(lambda: sent.final, 30, 0.1, "the late re-send's answer")
        assert late["status"] == "recorded" and late["seq"] == 40, late
        wait_until(lambda: edge.gateway_count() == 41, 60, 0.2, "the gateway holding the late re-send")
        with gateway_reader(db_url) as tx:
            [row] = tx.entries(edge.origin, 40, 1)
        assert row["duplicate_of"] == original["seq"], row


def test_dlq_export_writes_whole_rows_then_marks_them(tmp_path) -> None:
    """`mro-edge dlq export`: the file holds every row with its record; the stage's mark names the
    last id exported; a second export never overwrites the file."""
    data = tmp_path / "data"
    store = Store(data / "validate", RUNTIME_TABLES, map_size_mb=16)
    try:
        with store.write() as txn:
            for i in range(3):
                txn.put(u64(i), json_encode({"stage": "validate", "received_at": "2026-12-01T00:00:00.000Z",
                                             "errors": [], "record": {"n": i}}), db=store.table(dlq.DLQ))
    finally:
        store.close()
    env = dict(os.environ, MRO_DATA_DIR=str(data), PYTHONPATH=str(ROOT))
    out = tmp_path / "dlq.jsonl"

    def export() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mro_edge", "dlq", "export", "--out", str(out)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    done = export()
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["dlq_id"], r["stage"], r["record"]) for r in rows] == [(i, "validate", {"n": i}) for i in range(3)]
    mark = retention.read_exported(data / "validate")
    assert mark is not None and mark.through == 2
    again = export()
    assert again.returncode != 0 and "exists" in again.stderr and len(out.read_text().splitlines()) == 3
