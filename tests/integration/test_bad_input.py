"""Bad input and floods end to end, on both brokers, real LMDB and the real services.

* a flood of 64 KiB garbage from one device against a small store and DLQ budget: intake never
  freezes (without the budget, 184 such messages froze a 16 MB store), the DLQ stays within its
  budget, every garbage message is still answered, and another device's records are recorded;
* a device over its rate is refused with `rate_limited` (and its records are recorded once it
  sends them again later) while another device is not slowed at all;
* a record with a duplicate key and one with a bidi override are rejected with their rules and
  never reach the ledger.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest

from mro_edge.cli import read_statuses
from mro_edge.simulator.devices import rate_limited
from mro_edge.simulator.records import valid_record
from shared.runtime import dlq
from shared.runtime.store import Store
from tests.pipeline import ROOT, Pipeline, wait_until

GARBAGE = b"garbage " * 8192  # 64 KiB, at the message size limit, not JSON


@pytest.fixture
def make_pipeline(broker, tmp_path):
    started: list[Pipeline] = []

    def make(**settings: str) -> Pipeline:
        pipe = Pipeline(broker, tmp_path / "data", **settings)
        pipe.start()
        started.append(pipe)
        return pipe

    yield make
    for pipe in started:
        pipe.stop()


def good_records(device, n: int, rng: random.Random) -> list[dict]:
    return [valid_record(rng, station="HGR1", device_kind=device.kind, device_id=device.device_id)
            for _ in range(n)]


def all_final(device, event_ids) -> bool:
    device.resend_unreceipted()
    return all(device.sent[e].final for e in event_ids)


def ledger_event_ids(pipeline) -> list[str]:
    return [json.loads(entry.entry)["body"]["event_id"] for entry in pipeline.ledger()]


def dlq_usage(pipeline, stage: str = "ingest") -> tuple[dlq.Usage, list]:
    store = Store(pipeline.data_dir / stage, (dlq.DLQ, dlq.SUMMARY, dlq.META), readonly=True)
    try:
        return dlq.usage(store), dlq.summary(store)
    finally:
        store.close()


def test_a_garbage_flood_cannot_freeze_intake_or_fill_the_store(make_pipeline):
    budget_kb, flood = 1024, 400
    pipeline = make_pipeline(MRO_STAGE_MAP_SIZE_MB="16", MRO_STAGE_DLQ_BUDGET_KB=str(budget_kb))
    pid = pipeline.procs["ingest"].pid
    flooder = pipeline.device("tablet", "FLOOD-1")
    honest = pipeline.device("torque_wrench", "TQW-02")
    records = good_records(honest, 60, random.Random(3))
    for i in range(flood):
        flooder.send(None, GARBAGE)
        if i % 8 == 0 and records:
            record = records.pop()
            honest.send(record["event_id"], json.dumps(record).encode())
    for record in records:
        honest.send(record["event_id"], json.dumps(record).encode())

    wait_until(lambda: all_final(honest, honest.sent), 120, 0.2, "the honest device's records to be recorded")
    assert {s.final["status"] for s in honest.sent.values()} == {"recorded"}  # type: ignore[index]
    assert set(honest.sent) <= set(ledger_event_ids(pipeline))
    wait_until(lambda: len(flooder.stray_receipts) >= flood, 60, 0.2, "a receipt for every garbage message")
    assert {(r["status"], r["errors"][0]["rule"]) for r in flooder.stray_receipts} == {("rejected", "json")}

    usage, summary = dlq_usage(pipeline)
    assert 0 < usage.bytes <= budget_kb * 1024
    assert usage.rows + usage.dropped == flood and usage.dropped > flood // 4
    assert summary == [("FLOOD-1", "json", usage.dropped)]
    rows = pipeline.dlq("ingest")
    assert all(r["raw_truncated"] and len(r["raw_b64"]) <= 4096 * 4 // 3 + 4 for r in rows)
    statuses = read_statuses(pipeline.config, 2.5)
    ingest = statuses["ingest"]
    assert ingest["state"] == "up" and ingest["pid"] == pid and pipeline.alive("ingest")
    assert ingest["dlq_bytes"] == usage.bytes and ingest["dlq_dropped"] == usage.dropped
    shown = subprocess.run([sys.executable, "-m", "mro_edge", "dlq", "summary", "--json"], env=pipeline.env,
                           cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    [row] = [s for s in json.loads(shown.stdout) if s["stage"] == "ingest"]
    assert (row["bytes"], row["budget_bytes"], row["dropped"]) == (usage.bytes, budget_kb * 1024, usage.dropped)
    assert row["counted"] == [{"device_id": "FLOOD-1", "rule": "json", "count": usage.dropped}]


def test_a_device_over_its_rate_is_refused_and_others_are_not(make_pipeline):
    rate, burst = 5, 20
    pipeline = make_pipeline(MRO_LIMITS_DEVICE_RATE_PER_S=str(rate), MRO_LIMITS_DEVICE_BURST=str(burst))
    rng = random.Random(5)
    fast = pipeline.device("tablet", "FAST-1", resend_after_s=3600)  # re-sends only when told below
    calm = pipeline.device("rfid_reader", "RFID-09")
    fast_records = good_records(fast, 80, rng)
    calm_records = good_records(calm, 10, rng)
    start = time.monotonic()
    for i, record in enumerate(fast_records):
        fast.send(record["event_id"], json.dumps(record).encode())
        if i % 8 == 0 and i // 8 < len(calm_records):
            calm_record = calm_records[i // 8]
            calm.send(calm_record["event_id"], json.dumps(calm_record).encode())

    def answered(sent) -> dict | None:
        return next((r for r in sent.receipts if r["status"] == "recorded" or rate_limited(r)), None)

    wait_until(lambda: all(answered(s) for s in fast.sent.values()), 60, 0.2, "an answer for every fast record")
    elapsed = time.monotonic() - start
    wait_until(lambda: all_final(calm, calm.sent), 60, 0.2, "the calm device's records")
    assert {s.final["status"] for s in calm.sent.values()} == {"recorded"}  # type: ignore[index]
    outcomes = {e: answered(s) for e, s in fast.sent.items()}
    recorded = {e for e, r in outcomes.items() if r and r["status"] == "recorded"}
    limited = set(fast.sent) - recorded
    assert burst <= len(recorded) <= burst + rate * elapsed + 1
    assert all(outcomes[e]["errors"][0]["expected"].startswith(f"at most {rate} messages/s")  # type: ignore[index]
               for e in limited)
    in_ledger = set(ledger_event_ids(pipeline))
    assert recorded | set(calm.sent) <= in_ledger and not limited & in_ledger
    _, summary = dlq_usage(pipeline)
    assert summary == [("FAST-1", "rate_limited", len(limited))]
    assert pipeline.dlq("ingest") == []  # counted, never stored whole

    # Nothing acknowledged is lost for a device that sends a refused record again later (the
    # simulator treats `rate_limited` as "not answered yet").
    fast.resend_after_s = 1.0
    wait_until(lambda: all_final(fast, fast.sent), 120, 0.5, "the refused records, sent again")
    assert {s.final["status"] for s in fast.sent.values()} == {"recorded"}  # type: ignore[index]
    ledger = ledger_event_ids(pipeline)
    assert sorted(ledger) == sorted(set(ledger)) and set(fast.sent) <= set(ledger)


def test_duplicate_keys_and_bidi_text_are_rejected_and_never_signed(make_pipeline):
    pipeline = make_pipeline()
    tablet = pipeline.device("tablet", "TAB-07")
    rng = random.Random(9)
    twice, bidi, fine = good_records(tablet, 3, rng)
    duplicate = json.dumps(twice).encode()[:-1] + b', "ata": ' + json.dumps(twice["ata"]).encode() + b"}"
    bidi["notes"] = "Torque checked \u202eKO\u202c"
    tablet.send(twice["event_id"], duplicate, expect="rejected")
    tablet.send(bidi["event_id"], json.dumps(bidi, ensure_ascii=False).encode(), expect="rejected")
    tablet.send(fine["event_id"], json.dumps(fine).encode())

    wait_until(lambda: all_final(tablet, tablet.sent), 60, 0.2, "all three receipts")
    finals = {e: s.final for e, s in tablet.sent.items()}
    assert finals[fine["event_id"]]["status"] == "recorded"  # type: ignore[index]
    for record, path, rule in ((twice, "$.ata", "duplicate_key"), (bidi, "$.notes", "text_control_char")):
        receipt = finals[record["event_id"]]
        assert receipt is not None and receipt["status"] == "rejected"
        assert [(e["path"], e["rule"]) for e in receipt["errors"]] == [(path, rule)]
    assert finals[bidi["event_id"]]["errors"][0]["received"] == "U+202E (bidi control) at character 16 of 19"  # type: ignore[index]
    assert ledger_event_ids(pipeline) == [fine["event_id"]]
    reports = {r.get("event_id"): r for r in pipeline.dlq("ingest")}
    assert reports[twice["event_id"]]["errors"][0]["rule"] == "duplicate_key"
    assert reports[bidi["event_id"]]["errors"][0]["rule"] == "text_control_char"
