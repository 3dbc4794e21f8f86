"""The MCC's model of the box (services/mcc/state.py) and its Prometheus exposition."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from services.mcc.metrics import exposition
from services.mcc.state import (
    ALARMS_KEPT,
    DEVICES_KEPT,
    DLQ_KEPT,
    LINK_HISTORY,
    LINK_STATES,
    RATE_MINUTES,
    STALE_AFTER_S,
    BoxState,
    RateBuckets,
)
from shared.runtime.status import COMMIT_BUCKETS_S, StageFigures

T0 = 1_800_000_000.0  # a minute boundary


def box() -> BoxState:
    return BoxState("HGR1", ("ingest", "validate", "sign", "uplink", "heartbeat"))


def test_each_service_shows_its_state_and_a_plain_reason() -> None:
    state = box()
    state.on_status("ingest", {"service": "ingest", "state": "up", "pid": 7}, T0)
    state.on_status("validate", {"service": "validate", "state": "frozen", "pid": 8}, T0)
    state.on_status("sign", {"service": "sign", "state": "down"}, T0)
    state.on_status("uplink", {"service": "uplink", "state": "contested", "pid": 9}, T0)
    views = {v.name: v for v in state.services(T0 + 1)}
    assert {n: v.state for n, v in views.items()} == {"ingest": "up", "validate": "frozen", "sign": "down",
                                                      "uplink": "contested", "heartbeat": "unknown"}
    assert "resume" in views["validate"].why and "last will" in views["sign"].why
    assert "two copies" in views["uplink"].why and "pid 7" in views["ingest"].why
    # an up service that stops publishing is `silent`, a down one stays down
    later = {v.name: v.state for v in state.services(T0 + STALE_AFTER_S + 1)}
    assert later["ingest"] == "silent" and later["sign"] == "down"


def test_the_link_timeline_keeps_each_change_once() -> None:
    state = box()
    for i, name in enumerate(["CONNECTED", "CONNECTED", "DEGRADED", "ISOLATED", "ISOLATED", "RECONCILING"]):
        epoch = {"CONNECTED": 1, "DEGRADED": 2, "ISOLATED": 3, "RECONCILING": 4}[name]
        state.on_status("connectivity", {"state": name, "epoch": epoch, "since": "2027-01-15T08:00:00.000Z"},
                        T0 + i)
    assert [c.state for c in state.link_history] == ["CONNECTED", "DEGRADED", "ISOLATED", "RECONCILING"]
    state.on_status("connectivity", {"state": "BOGUS"}, T0 + 9)
    assert state.link_history[-1].state == "RECONCILING"


def test_records_per_minute_come_from_the_intake_counter() -> None:
    state = box()
    for i, total in enumerate([100, 130, 130, 190]):
        state.on_status("ingest", {"state": "up", "processed": total}, T0 + 20 * i)
    series = state.snapshot(T0 + 70).rate_per_minute
    assert len(series) == RATE_MINUTES
    assert series[-2:] == [(T0, 30), (T0 + 60, 60)]  # the first status only sets the baseline


def test_oldest_unsent_and_drain_rate_from_the_uplink_status() -> None:
    state = box()
    state.on_status("uplink", {"state": "up", "acked_seq": 10, "backlog": 5,
                               "oldest_unsent_at": "2027-01-15T08:00:00.000Z"}, T0)
    state.on_status("uplink", {"state": "up", "acked_seq": 30, "backlog": 5,
                               "oldest_unsent_at": "2027-01-15T08:00:00.000Z"}, T0 + 10)
    now = T0 + 10
    assert state.drain_rate(now) == 2.0
    at = datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    assert state.oldest_unsent_s(now) == now - at


def test_dlq_entries_keep_rule_path_and_device_never_the_received_value() -> None:
    state = box()
    state.on_dlq("ingest", {"stage": "ingest", "device_id": "TQW-07", "errors": [
        {"path": "$.result", "rule": "torque_result", "expected": "OK|NOK", "received": "SECRET"}]}, T0)
    entry = state.snapshot(T0).dlq[0]
    assert (entry.stage, entry.device, entry.errors) == ("ingest", "TQW-07", [("torque_result", "$.result")])
    assert "SECRET" not in repr(state.snapshot(T0))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LINK_STATES), st.integers(0, 5), st.floats(0, 1e6)), max_size=600),
       st.lists(st.tuples(st.floats(0, 1e6), st.integers(-5, 1000)), max_size=600))
def test_history_and_rate_buckets_stay_bounded(changes, counts) -> None:
    state = box()
    for name, epoch, at in changes:
        state.on_status("connectivity", {"state": name, "epoch": epoch}, T0 + at)
    rate = RateBuckets()
    for at, count in counts:
        rate.add(T0 + at, count)
    assert len(state.link_history) <= LINK_HISTORY
    assert len(rate.buckets) <= RATE_MINUTES
    assert all(b[1] > 0 for b in rate.buckets)
    assert len(rate.series(T0 + 2e6)) == RATE_MINUTES


def test_dlq_alarms_devices_and_unknown_services_stay_bounded() -> None:
    state = box()
    for i in range(3000):
        state.on_dlq(f"stage{i}", {"errors": [{"rule": "r", "path": "$"}] * 50}, T0 + i)
        state.on_alarm({"service": "x", "alarm": f"kind{i}", "detail": "d" * 10_000}, T0 + i)
        state.on_receipt(f"DEV-{i}", T0 + i)
        state.on_status(f"stray{i}", {"state": "up"}, T0 + i)
    assert len(state.dlq) == DLQ_KEPT and len(state.alarms) == ALARMS_KEPT
    assert len(state.devices) == DEVICES_KEPT and "DEV-2999" in state.devices and "DEV-0" not in state.devices
    assert len(state.statuses) <= 2 * 5 + 8 and len(state.dlq_counts) <= 32 and len(state.alarm_counts) <= 64
    assert all(len(e.errors) <= 5 for e in state.dlq) and all(len(a.detail) <= 500 for a in state.alarms)


def test_stage_figures_make_a_cumulative_histogram() -> None:
    figures = StageFigures()
    for seconds in (0.0005, 0.003, 0.003, 100.0):
        figures.batch(received=10, passed=7, rejected=2, duplicates=1, seconds=seconds)
    payload = figures.payload()
    assert payload["records"] == {"in": 40, "out": 28, "rejected": 8, "duplicate": 4}
    buckets = dict((le, n) for le, n in payload["commit_seconds"]["buckets"])
    assert buckets[0.001] == 1 and buckets[0.005] == 3 and buckets[COMMIT_BUCKETS_S[-1]] == 3
    assert payload["commit_seconds"]["count"] == 4


def test_the_exposition_parses_and_matches_the_model() -> None:
    state = box()
    figures = StageFigures()
    figures.batch(received=5, passed=4, rejected=1, duplicates=0, seconds=0.002)
    state.on_status("sign", {"state": "up", "pid": 1, "queue_depth": 3, **figures.payload()}, T0)
    state.on_status("uplink", {"state": "up", "backlog": 12, "acked_seq": 40, "breaker": "OPEN",
                               "oldest_unsent_at": None}, T0)
    state.on_status("connectivity", {"state": "ISOLATED", "epoch": 3}, T0)
    state.on_dlq("validate", {"errors": []}, T0)
    text = exposition(state, threading.Lock(), lambda: T0 + 5).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("mro_stage_records_in_total", (("stage", "sign"),))] == 5
    assert samples[("mro_stage_records_rejected_total", (("stage", "sign"),))] == 1
    assert samples[("mro_stage_batch_commit_seconds_count", (("stage", "sign"),))] == 1
    assert samples[("mro_stage_batch_commit_seconds_bucket", (("le", "0.0025"), ("stage", "sign")))] == 1
    assert samples[("mro_stage_queue_depth_records", (("stage", "sign"),))] == 3
    assert samples[("mro_service_state", (("service", "sign"), ("state", "up")))] == 1
    assert samples[("mro_service_state", (("service", "ingest"), ("state", "unknown")))] == 1
    assert samples[("mro_uplink_backlog_entries", ())] == 12
    assert samples[("mro_uplink_breaker_state", (("state", "OPEN"),))] == 1
    assert samples[("mro_link_state", (("state", "ISOLATED"),))] == 1
    assert samples[("mro_link_state_seconds", ())] == 5
    assert samples[("mro_dlq_reports_total", (("stage", "validate"),))] == 1
    assert not any(name.startswith("mro_stage_store_") for name, _ in samples)  # no stage reports `store`
    state.on_status("sign", {"state": "up", **figures.payload(), "store": {"used_mb": 1.5, "map_mb": 8,
                                                                           "max_mb": 2}}, T0)
    text = exposition(state, threading.Lock(), lambda: T0 + 5).decode()
    stores = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
              if s.name.startswith("mro_stage_store_")}
    assert stores == {"mro_stage_store_used_bytes": 1.5 * 2**20, "mro_stage_store_map_bytes": 8 * 2**20,
                      "mro_stage_store_max_bytes": 2 * 2**20}
    assert not any(s.name == "mro_ingest_unassigned_reads" for family in text_string_to_metric_families(text)
                   for s in family.samples), "ingest has not said how many reads wait"
    state.on_status("ingest", {"state": "up", **figures.payload(), "unassigned_reads": 4}, T0)
    text = exposition(state, threading.Lock(), lambda: T0 + 5).decode()
    assert [s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "mro_ingest_unassigned_reads"] == [4]


def test_the_supervisors_word_is_added_to_the_reason() -> None:
    state = box()
    state.on_status("sign", {"state": "down"}, T0)
    state.on_status("supervisor", {"state": "up", "children": {
        "sign": {"state": "restarting", "restarts": 3, "hung": 1, "last_exit": 1},
        "ingest": {"state": "up", "restarts": 0, "hung": 0}}}, T0)
    views = {v.name: v for v in state.services(T0)}
    assert "supervisor: restarting, 3 restart(s), 1 hang(s), last exit 1" in views["sign"].why
    assert "supervisor" not in views["ingest"].why
