"""Device contract v1, `check_rules`: rules across fields and against the receive time, at each boundary."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from mro_edge.simulator.records import valid_record
from shared.contract import check_rules, decode_record, normalize, record_from_body

STATION, KIND, DEVICE = "HGR1", "torque_wrench", "tw-07"
OCCURRED = datetime(2024, 5, 20, 14, 30, tzinfo=UTC)


def decoded(record_type: str = "torque_event", *, occurred_at: str | None = None, tool_due: str | None = None,
            **fields):
    data = valid_record(random.Random(3), station=STATION, device_kind=KIND, device_id=DEVICE,
                        record_type=record_type, occurred_at=OCCURRED)
    data.update(fields)
    if occurred_at is not None:
        data["occurred_at"] = occurred_at
    if tool_due is not None:
        data["tool"]["calibration_due"] = tool_due
    return decode_record(json.dumps(data).encode(), station=STATION, device_kind=KIND, device_id=DEVICE)


def rules(record, received_at: datetime = OCCURRED, **kwargs) -> list[tuple[str, str]]:
    return [(e.path, e.rule) for e in check_rules(record, received_at=received_at, **kwargs)]


# --- time -------------------------------------------------------------------------------------------

def test_clock_skew_boundary():
    record = decoded()
    assert rules(record, OCCURRED - timedelta(seconds=300)) == []
    assert rules(record, OCCURRED - timedelta(seconds=301)) == [("$.occurred_at", "occurred_in_future")]
    just_over = OCCURRED - timedelta(seconds=300, microseconds=1)
    assert rules(record, just_over) == [("$.occurred_at", "occurred_in_future")]


def test_backdate_boundary():
    record = decoded()
    assert rules(record, OCCURRED + timedelta(days=30)) == []
    assert rules(record, OCCURRED + timedelta(days=30, seconds=1)) == [("$.occurred_at", "occurred_too_old")]


def test_time_limits_are_configurable():
    record = decoded()
    assert rules(record, OCCURRED - timedelta(seconds=10), clock_skew_s=10) == []
    assert rules(record, OCCURRED - timedelta(seconds=11), clock_skew_s=10) == [
        ("$.occurred_at", "occurred_in_future")]
    assert rules(record, OCCURRED + timedelta(hours=1), max_backdate_s=3600) == []
    assert rules(record, OCCURRED + timedelta(hours=1, seconds=1), max_backdate_s=3600) == [
        ("$.occurred_at", "occurred_too_old")]


def test_time_is_judged_against_receive_time_not_now():
    record = decoded(occurred_at="2019-03-01T08:00:00Z", tool_due="2019-06-01")
    assert rules(record, datetime(2019, 3, 1, 8, 0, 5, tzinfo=UTC)) == []


def test_receive_time_in_another_zone_is_the_same_instant():
    record = decoded()
    received = (OCCURRED + timedelta(seconds=5)).astimezone(timezone(timedelta(hours=-5)))
    assert rules(record, received) == []


def test_naive_receive_time_is_a_programming_error():
    with pytest.raises(ValueError, match="timezone-aware"):
        check_rules(decoded(), received_at=datetime(2024, 5, 20, 14, 30))


def test_time_error_text():
    error = check_rules(decoded(), received_at=OCCURRED - timedelta(hours=1))[0]
    assert error.received == "2024-05-20T14:30:00Z"
    assert "300 s" in error.expected and "2024-05-20T13:30:00Z" in error.expected


# --- torque -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("torque", "low", "high", "result", "expected"), [
    (24.5, 20, 25, "OK", []),
    (20, 20, 25, "OK", []),
    (25, 20, 25, "OK", []),
    (25, 25, 25, "OK", []),
    (19.99, 20, 25, "NOK", []),
    (25.01, 20, 25, "NOK", []),
    (25.01, 20, 25, "OK", [("$.result", "torque_result")]),
    (19.99, 20, 25, "OK", [("$.result", "torque_result")]),
    (20, 20, 25, "NOK", [("$.result", "torque_result")]),
    (25, 20, 25, "NOK", [("$.result", "torque_result")]),
    (0, 0, 0, "OK", []),
    (22, 25, 20, "OK", [("$.torque_max_nm", "torque_range")]),
    (22, 25.001, 25, "NOK", [("$.torque_max_nm", "torque_range")]),
])
def test_torque_rules(torque, low, high, result, expected):
    record = decoded(torque_nm=torque, torque_min_nm=low, torque_max_nm=high, result=result)
    assert rules(record) == expected


def test_torque_comparison_is_exact():
    # 25.000000000000000001 is above 25, though it is 25.0 as a float.
    payload = json.dumps(valid_record(random.Random(3), station=STATION, device_kind=KIND, device_id=DEVICE,
                                      record_type="torque_event", occurred_at=OCCURRED)
                         | {"torque_nm": 7777.5, "torque_min_nm": 20, "torque_max_nm": 25, "result": "OK"})
    payload = payload.replace("7777.5", "25.000000000000000001").encode()
    record = decode_record(payload, station=STATION, device_kind=KIND, device_id=DEVICE)
    assert rules(record) == [("$.result", "torque_result")]


def test_torque_error_text_carries_no_free_text():
    record = decoded(torque_nm=30, torque_min_nm=20, torque_max_nm=25, result="OK")
    error = check_rules(record, received_at=OCCURRED)[0]
    assert error.received == "OK"
    assert error.expected.startswith("NOK") and "30" in error.expected and "[20, 25]" in error.expected


# --- calibration ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("occurred_at", "due", "overdue"), [
    ("2024-05-20T14:30:00Z", "2024-05-20", False),
    ("2024-05-20T14:30:00Z", "2024-05-21", False),
    ("2024-05-20T14:30:00Z", "2024-05-19", True),
    ("2024-05-20T23:59:59.999999Z", "2024-05-20", False),
    ("2024-05-21T00:00:00Z", "2024-05-20", True),
    ("2024-03-01T00:00:00Z", "2024-02-29", True),
])
def test_calibration_is_judged_on_the_utc_day_of_the_work(occurred_at, due, overdue):
    record = decoded(occurred_at=occurred_at, tool_due=due)
    received = record.occurred_at + timedelta(seconds=1)
    assert rules(record, received) == ([("$.tool.calibration_due", "calibration_overdue")] if overdue else [])


def test_calibration_error_text():
    error = check_rules(decoded(tool_due="2024-05-19"), received_at=OCCURRED)[0]
    assert error.received == "2024-05-19"
    assert "2024-05-20" in error.expected


# --- together and across types ----------------------------------------------------------------------

def test_all_rule_errors_are_reported_together():
    record = decoded(torque_nm=30, torque_min_nm=20, torque_max_nm=25, result="OK", tool_due="2024-01-01")
    assert rules(record, OCCURRED + timedelta(days=31)) == [
        ("$.occurred_at", "occurred_too_old"), ("$.result", "torque_result"),
        ("$.tool.calibration_due", "calibration_overdue")]


@pytest.mark.parametrize("record_type", ["maintenance_action", "inspection", "part_removal",
                                         "part_installation", "part_receipt"])
def test_other_types_have_only_time_rules(record_type):
    record = decoded(record_type)
    assert rules(record, OCCURRED + timedelta(seconds=2)) == []
    assert rules(record, OCCURRED - timedelta(hours=1)) == [("$.occurred_at", "occurred_in_future")]


def test_rules_give_the_same_verdict_on_a_stored_body():
    record = decoded(torque_nm=30, torque_min_nm=20, torque_max_nm=25, result="OK", tool_due="2024-05-19")
    again = record_from_body(normalize(record))
    assert check_rules(again, received_at=OCCURRED) == check_rules(record, received_at=OCCURRED)
