"""Torque controller results at ingest (what the Open Protocol bridge publishes): a tightening
becomes a torque_event within the session at the controller's place, matched by the identifier
field, once per (controller, tightening id); every outcome is answered with a receipt naming
the result's event id (the bridge's condition for MID 0062). In-memory unit of work."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest

from mro_edge.simulator.openprotocol import SimulatedController
from services.ingest import sessions as book
from services.ingest.stage import Ingest
from services.torque.mids import TighteningResult, encode
from services.torque.telegram import SCHEMA, ResultTelegram, ToolCalibration, encode_telegram, result_event_id
from shared.contract import TorqueEvent, check_rules
from shared.runtime.config import Config, LimitsConfig, PlaceConfig
from shared.runtime.delivery import run_batch
from shared.runtime.handler import DeviceMessage
from shared.runtime.messages import ReceivedRecord
from shared.runtime.testing import STATION, MemoryTables, MemoryUnitOfWork
from shared.runtime.topics import Topics

TOPICS = Topics(STATION)
PLACES = {"BAY1": PlaceConfig(controllers=["TQC-01"]), "BAY2": PlaceConfig(controllers=["TQC-02"])}
NOW = datetime.now(UTC)
RECEIVED = NOW.strftime("%Y-%m-%dT%H:%M:%S.000Z")
TOOL = ToolCalibration(serial_number="B0742134", last_calibration=date(2026, 11, 1),
                       calibration_due=date(2026, 11, 1) + timedelta(days=365))


def tightening(identifier: str = "WO-1001", torque: str = "24.5", **changes) -> TighteningResult:
    sim = SimulatedController(zone="Europe/Berlin")
    sim.tighten(torque_nm=Decimal(torque), identifier=identifier, at=NOW - timedelta(minutes=1))
    result = sim.results[0]
    return TighteningResult(**{**{f: getattr(result, f) for f in result.__struct_fields__}, **changes})


def payload(result: TighteningResult | bytes, tool: ToolCalibration | None = TOOL, revision: int = 7) -> bytes:
    telegram = result if isinstance(result, bytes) else encode(result, revision)[:-1]
    return encode_telegram(ResultTelegram(schema=SCHEMA, telegram=telegram.decode("latin-1"), received_at=RECEIVED,
                                          zone="Europe/Berlin", tool=tool))


@pytest.fixture
def ingest() -> Ingest:
    stage = Ingest()
    stage.open(SimpleNamespace(config=Config(station=STATION, places=PLACES, limits=LimitsConfig()), topics=TOPICS))
    return stage


def publish(stage: Ingest, tables: MemoryTables, body: bytes, controller: str = "TQC-01") -> MemoryUnitOfWork:
    uow = MemoryUnitOfWork(stage, tables)
    run_batch(stage, [DeviceMessage(TOPICS.device_in("torque_controller", controller), body, RECEIVED)], uow)
    return uow


def open_session(tables: MemoryTables, place: str = "BAY1", wo: str = "WO-1001", command_id: str = "c1") -> None:
    entry = book.opened_entry({"id": command_id, "place": place, "work_order_id": wo,
                               "aircraft": {"registration": "N327HA", "serial_number": "4521"}, "ata": "32-41",
                               "technician": {"cert_no": "3512874", "cert_kind": "FAA-AP"},
                               "part_action": "install"}, station=STATION, places=PLACES,
                              at=RECEIVED, operator="t")
    tables.table(book.SESSIONS)[place.encode()] = book._encode(entry)


def receipt_statuses(uow: MemoryUnitOfWork) -> list[tuple[str, str | None]]:
    return [(r.status, r.event_id) for _, r in uow.receipts()]


def test_a_result_in_a_session_is_a_torque_event_with_the_tools_own_calibration_and_the_telegram_hash(ingest):
    tables = MemoryTables()
    open_session(tables)
    result = tightening()
    uow = publish(ingest, tables, payload(result))
    [made] = uow.forwarded_as(ReceivedRecord)
    record = made.record
    assert isinstance(record, TorqueEvent) and record.work_order_id == "WO-1001"
    assert record.event_id == result_event_id("TQC-01", encode(result, 7)[:-1].decode())
    assert str(record.torque_nm) == "24.5" and record.result == "OK" and record.tightening_id == 1
    assert record.tool.serial_number == "B0742134" and record.tool.calibration_due == TOOL.calibration_due
    assert hashlib.sha256(encode(result, 7)[:-1]).hexdigest() in str(record.notes)
    assert made.device.kind == "torque_wrench" and made.device.id == "TQC-01"
    assert receipt_statuses(uow) == [("received", record.event_id)]


def test_a_result_sent_again_is_a_duplicate_even_in_another_session(ingest):
    tables = MemoryTables()
    open_session(tables)
    first = publish(ingest, tables, payload(tightening()))
    [made] = first.forwarded_as(ReceivedRecord)
    tables.table(book.SESSIONS).clear()
    open_session(tables, command_id="c2")
    again = publish(ingest, tables, payload(tightening()))
    assert again.forwarded_as(ReceivedRecord) == []
    assert receipt_statuses(again) == [("duplicate", made.record.event_id)]


def test_without_a_session_a_result_is_kept_and_answered_and_once(ingest):
    tables = MemoryTables()
    uow = publish(ingest, tables, payload(tightening()))
    [kept] = book.unassigned(uow)
    assert kept.reason == "no_session" and kept.place == "BAY1" and kept.assignable
    event_id = result_event_id("TQC-01", encode(tightening(), 7)[:-1].decode())
    assert receipt_statuses(uow) == [("received", event_id)]
    again = publish(ingest, tables, payload(tightening()))
    assert receipt_statuses(again) == [("duplicate", event_id)] and len(book.unassigned(again)) == 1


def test_the_identifier_field_matches_the_work_order(ingest):
    tables = MemoryTables()
    open_session(tables, place="BAY2", wo="WO-2002")
    # TQC-01 stands at BAY1 (no session) but names BAY2's work order: that session takes it
    [made] = publish(ingest, tables, payload(tightening(identifier="WO-2002"))).forwarded_as(ReceivedRecord)
    assert made.record.work_order_id == "WO-2002"
    # another work order than the session at the controller's own place: kept, never misfiled
    uow = publish(ingest, tables, payload(tightening(identifier="WO-9999", tightening_id=2)), controller="TQC-02")
    assert uow.forwarded_as(ReceivedRecord) == [] and book.unassigned(uow)[0].reason == "work_order_mismatch"


def test_a_result_without_the_tools_own_calibration_is_kept_not_guessed(ingest):
    tables = MemoryTables()
    open_session(tables)
    uow = publish(ingest, tables, payload(tightening(), tool=None))
    [kept] = book.unassigned(uow)
    assert kept.reason == "tool_calibration_unknown" and not kept.assignable
    other = ToolCalibration(serial_number="OTHER", last_calibration=TOOL.last_calibration,
                            calibration_due=TOOL.calibration_due)
    uow = publish(ingest, tables, payload(tightening(tightening_id=2), tool=other))
    assert uow.forwarded_as(ReceivedRecord) == [] and book.unassigned(uow)[1].reason == "tool_calibration_unknown"


@pytest.mark.parametrize(("body", "rule"), [
    (b"00450061007         garbage that is no result", "op_telegram"),
    (None, "op_result"),  # lbf.ft: refused rather than converted on a guessed factor
])
def test_a_result_that_cannot_be_read_goes_to_the_dlq_whole_and_is_answered(ingest, body, rule):
    tables = MemoryTables()
    open_session(tables)
    telegram = body if body is not None else encode(tightening(torque_unit=2), 7)[:-1]
    uow = publish(ingest, tables, payload(telegram))
    [report] = uow.dlq()
    assert [e["rule"] for e in report["errors"]] == [rule] and report["raw_b64"]
    event_id = result_event_id("TQC-01", telegram.decode("latin-1"))
    assert report["event_id"] == event_id and receipt_statuses(uow) == [("rejected", event_id)]
    assert receipt_statuses(publish(ingest, tables, payload(telegram))) == [("duplicate", event_id)]


def test_a_tool_past_its_own_calibration_interval_is_refused_by_the_contract(ingest):
    tables = MemoryTables()
    open_session(tables)
    overdue = ToolCalibration(serial_number="B0742134", last_calibration=date(2025, 1, 2),
                              calibration_due=date(2026, 1, 2))
    [made] = publish(ingest, tables, payload(tightening(), tool=overdue)).forwarded_as(ReceivedRecord)
    errors = check_rules(made.record, received_at=NOW)
    assert [(e.path, e.rule) for e in errors] == [("$.tool.calibration_due", "calibration_overdue")]


@pytest.mark.parametrize("revision", [1, 2, 5])
def test_every_result_revision_makes_a_record_and_a_blank_revision_reads_as_1(ingest, revision):
    tables = MemoryTables()
    open_session(tables)
    telegram = encode(tightening(), revision)[:-1]
    if revision == 1:
        telegram = telegram[:8] + b"   " + telegram[11:]  # some controllers leave the revision blank
    [made] = publish(ingest, tables, payload(telegram)).forwarded_as(ReceivedRecord)
    assert f"MID 0061 revision {revision}," in str(made.record.notes) and str(made.record.torque_nm) == "24.5"


def test_a_recorded_results_telegram_is_kept_under_the_sha256_its_notes_name(ingest):
    tables = MemoryTables()
    open_session(tables)
    telegram = encode(tightening(), 7)[:-1]
    [made] = publish(ingest, tables, payload(tightening())).forwarded_as(ReceivedRecord)
    digest = hashlib.sha256(telegram).hexdigest()
    assert f"telegram SHA-256 {digest}" in str(made.record.notes)
    assert tables.table(book.RAW_PAYLOADS) == {digest.encode(): telegram}
