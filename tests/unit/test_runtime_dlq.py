"""The DLQ budget, its summary and the per-device rate limit, on the runtime's in-memory unit of
work (`shared.runtime.testing`) with the real ingest handler."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mro_edge.simulator.records import valid_record
from services.ingest.ratelimit import RateLimiter
from services.ingest.stage import Ingest
from shared.runtime import dlq
from shared.runtime.clock import utc_now
from shared.runtime.config import Config, LimitsConfig
from shared.runtime.delivery import run_batch
from shared.runtime.handler import DeviceMessage
from shared.runtime.testing import STATION, MemoryTables, MemoryUnitOfWork
from shared.runtime.topics import Topics

TOPICS = Topics(STATION)
GARBAGE = b"garbage " * 8192  # the red team's message: 64 KiB that is not JSON


def ingest_stage(**limits) -> Ingest:
    stage = Ingest()
    stage.open(SimpleNamespace(config=Config(station=STATION, limits=LimitsConfig(**limits)), topics=TOPICS))
    return stage


def message(device_id: str, payload: bytes, kind: str = "tablet") -> DeviceMessage:
    return DeviceMessage(TOPICS.device_in(kind, device_id), payload, utc_now())


def good(device_id: str, seed: int) -> DeviceMessage:
    record = valid_record(random.Random(seed), station=STATION, device_kind="tablet", device_id=device_id)
    return message(device_id, json.dumps(record).encode())


def batch(stage, tables, messages, budget: int | None) -> MemoryUnitOfWork:
    uow = MemoryUnitOfWork(stage, tables, dlq_budget=budget)
    run_batch(stage, messages, uow)
    return uow


def alarms(uow) -> list[dict]:
    return [json.loads(p) for topic, p, _, _ in uow.outgoing if topic == TOPICS.alarm]


def test_a_stored_row_is_small_whatever_arrived():
    stage, tables = ingest_stage(), MemoryTables()
    uow = batch(stage, tables, [message("TAB-1", GARBAGE)], None)
    [row] = uow.dlq()
    assert row["raw_truncated"] is True and len(row["raw_b64"]) <= 4096 * 4 // 3 + 4
    assert uow.meta("dlq_bytes") == len(tables.table(dlq.DLQ)[b"\0" * 8]) + 8 < 6 * 1024


def test_a_row_keeps_at_most_row_errors_and_counts_the_rest():
    report = {"stage": "ingest", "received_at": utc_now(),
              "errors": [{"path": f"$.f{i}", "rule": "unknown_field", "expected": "x", "received": None}
                         for i in range(dlq.ROW_ERRORS + 7)]}
    stored = dlq.stored_form(report)
    assert len(stored["errors"]) == dlq.ROW_ERRORS and stored["errors_omitted"] == 7
    assert dlq.stored_form({**report, "errors": report["errors"][:3]})["errors"] == report["errors"][:3]


def test_at_the_budget_rejections_are_answered_and_counted_not_stored_and_good_records_flow():
    stage, tables = ingest_stage(), MemoryTables()
    budget = 20 * 1024
    uows = [batch(stage, tables, [message("FLOOD-1", GARBAGE), good("TAB-2", seed)], budget) for seed in range(12)]
    stored = len(tables.table(dlq.DLQ))
    assert 1 <= stored < 12 and uows[-1].meta("dlq_bytes") <= budget
    dropped = 12 - stored
    assert uows[-1].meta("dlq_dropped") == dropped
    assert uows[-1].dlq_summary() == {("FLOOD-1", "json"): dropped}
    for uow in uows:  # every garbage message still got its rejected receipt and its DLQ topic report
        assert [(d, r.status) for d, r in uow.receipts()] == [("FLOOD-1", "rejected"), ("TAB-2", "received")]
        assert [t for t, *_ in uow.outgoing if t == TOPICS.dlq("ingest")] == [TOPICS.dlq("ingest")]
        assert len(uow.forwarded) == 1
    raised = [a for uow in uows for a in alarms(uow)]
    assert [a["alarm"] for a in raised] == ["dlq_full"]  # once, not per dropped report
    assert raised[0]["budget_bytes"] == budget


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "C"]), st.integers(0, 3000)), max_size=40),
       st.integers(0, 40_000))
def test_the_budget_is_never_exceeded_and_every_rejection_is_kept_or_counted(sizes, budget):
    stage, tables = ingest_stage(), MemoryTables()
    last = None
    for device_id, size in sizes:
        last = batch(stage, tables, [message(device_id, b"\xff" * size)], budget)
    if last is None:
        return
    rows = tables.table(dlq.DLQ)
    assert last.meta("dlq_bytes") == sum(len(v) + 8 for v in rows.values()) <= budget
    assert len(rows) + last.meta("dlq_dropped") == len(sizes)
    assert sum(last.dlq_summary().values()) == last.meta("dlq_dropped")


def test_the_alarm_comes_again_only_after_the_dlq_had_room_again():
    stage, tables = ingest_stage(), MemoryTables()
    first = [alarms(batch(stage, tables, [message("FLOOD-1", b"{")], 0)) for _ in range(3)]
    assert [len(a) for a in first] == [1, 0, 0]
    assert not alarms(batch(stage, tables, [message("FLOOD-1", b"{")], 10_000))  # a larger budget: stored
    assert [len(alarms(batch(stage, tables, [message("FLOOD-1", b"{")], 0))) for _ in range(2)] == [1, 0]


def test_summary_rows_are_bounded(monkeypatch):
    monkeypatch.setattr(dlq, "SUMMARY_ROWS", 3)
    stage, tables = ingest_stage(), MemoryTables()
    uow = batch(stage, tables, [message(f"DEV-{i}", b"{") for i in range(6)], 0)
    assert uow.dlq_summary() == {("DEV-0", "json"): 1, ("DEV-1", "json"): 1, ("DEV-2", "json"): 1,
                                 ("*", "json"): 3}


def test_a_flooding_device_is_rate_limited_and_another_is_not():
    stage, tables = ingest_stage(device_rate_per_s=1, device_burst=5), MemoryTables()
    flood = [good("FLOOD-1", seed) for seed in range(20)]
    quiet = [good("TAB-2", 100 + seed) for seed in range(3)]
    uow = batch(stage, tables, [*flood[:10], quiet[0], *flood[10:], quiet[1], quiet[2]], None)
    receipts = uow.receipts()
    flooded = [r for d, r in receipts if d == "FLOOD-1"]
    assert [r.status for r in flooded] == ["received"] * 5 + ["rejected"] * 15
    limited = flooded[5]
    assert [e.rule for e in limited.errors or []] == ["rate_limited"]
    assert limited.event_id == json.loads(flood[5].payload)["event_id"]  # the device knows which one
    assert [r.status for d, r in receipts if d == "TAB-2"] == ["received"] * 3
    assert uow.dlq() == [] and uow.dlq_summary() == {("FLOOD-1", "rate_limited"): 15}
    assert not [t for t, *_ in uow.outgoing if t == TOPICS.dlq("ingest")]  # counted, not published
    assert [(a["alarm"], a["device_id"]) for a in alarms(uow)] == [("rate_limited", "FLOOD-1")]
    assert uow.failed == 15 and len(uow.forwarded) == 8
    again = batch(stage, tables, [good("FLOOD-1", 999)], None)
    assert alarms(again) == []  # one alarm per episode, not per batch


def test_a_rate_limited_record_sent_again_later_is_received():
    now = [0.0]
    stage, tables = ingest_stage(device_rate_per_s=1, device_burst=1), MemoryTables()
    stage.limiter = RateLimiter(1, 1, clock=lambda: now[0])
    first, second = good("TAB-3", 1), good("TAB-3", 2)
    uow = batch(stage, tables, [first, second], None)
    assert [r.status for _, r in uow.receipts()] == ["received", "rejected"]
    now[0] = 1.0
    uow = batch(stage, tables, [second], None)
    assert [r.status for _, r in uow.receipts()] == ["received"]  # no fate was kept for the refused copy


@given(st.floats(0.1, 1000), st.integers(1, 50), st.lists(st.floats(0, 5), max_size=200))
def test_token_bucket_never_allows_more_than_burst_plus_rate_times_elapsed(rate, burst, gaps):
    now = [0.0]
    limiter = RateLimiter(rate, burst, clock=lambda: now[0])
    allowed = 0
    for gap in gaps:
        now[0] += gap
        allowed += limiter.allow("D")
    assert allowed <= burst + rate * now[0] + 1e-6
    assert all(limiter.allow(f"other-{i}") for i in range(3))  # other devices have their own bucket


def test_bucket_memory_is_bounded():
    now = [0.0]
    limiter = RateLimiter(10, 2, max_devices=100, clock=lambda: now[0])
    for i in range(1000):
        now[0] += 1
        limiter.allow(f"D{i}")
    assert len(limiter._buckets) <= 101


def test_rate_zero_turns_the_limit_off():
    limiter = RateLimiter(0, 0)
    assert all(limiter.allow("D") for _ in range(10_000))


def test_usage_and_summary_read_back_from_lmdb(tmp_path):
    from shared.runtime.stage import RUNTIME_TABLES
    from shared.runtime.store import Store
    from shared.runtime.work import LmdbUnitOfWork

    stage = ingest_stage()
    store = Store(tmp_path, RUNTIME_TABLES)
    try:
        for _ in range(3):
            with store.write() as txn:
                run_batch(stage, [message("FLOOD-1", GARBAGE)],
                          LmdbUnitOfWork(stage, TOPICS, store, txn, None, dlq_budget=12 * 1024))
        usage = dlq.usage(store)
        assert usage.rows == 2 and usage.dropped == 1 and 0 < usage.bytes <= 12 * 1024
        assert dlq.summary(store) == [("FLOOD-1", "json", 1)]
    finally:
        store.close()


def test_config_defaults_are_documented():
    limits, stage = msgspec.structs.asdict(LimitsConfig()), Config().stage
    text = open("config/edge.toml").read()
    for key in ("device_rate_per_s", "device_burst", "max_raw_in_report"):
        assert f"\n{key} = " in text, key
    assert "\ndlq_budget_kb = 65536\n" in text and stage.dlq_budget_kb == 65536
    assert limits["max_raw_in_report"] == 4096


@pytest.mark.parametrize("payload", [GARBAGE, b"[" * 100_000, b"{}", b'{"event_id": 1}'])
def test_rate_limited_garbage_is_answered_without_an_event_id(payload):
    stage, tables = ingest_stage(device_rate_per_s=1, device_burst=0), MemoryTables()
    uow = batch(stage, tables, [message("FLOOD-1", payload)], None)
    [(_, receipt)] = uow.receipts()
    assert receipt.status == "rejected" and receipt.event_id is None


@pytest.mark.parametrize("station", ["HGR1\n", "a/b", "+", "", "x" * 33])
def test_a_station_id_is_matched_whole_in_the_config(station):
    from shared.runtime.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="not a station id"):
        load_config(env={"MRO_STATION": station})
