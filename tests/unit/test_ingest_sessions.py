"""Work sessions at ingest: the read -> record mapping, the session matcher, and ingest's
handling of raw reads and session commands on the in-memory unit of work."""

from __future__ import annotations

import base64
import hashlib
import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.devices.epc import encode_adi_var
from services.devices.profiles.partmark_15434.parser import parse_partmark
from services.ingest import sessions as book
from services.ingest.reads import RawRead, event_id_of, reads_of, record_body
from services.ingest.stage import Ingest
from shared.contract import PartInstallation, PartReceipt, PartRemoval, decode_record
from shared.runtime.config import Config, LimitsConfig, PlaceConfig
from shared.runtime.delivery import run_batch
from shared.runtime.handler import DeviceMessage
from shared.runtime.messages import ReceivedRecord, WorkSessionClosed, WorkSessionOpened, json_encode
from shared.runtime.testing import STATION, MemoryTables, MemoryUnitOfWork
from shared.runtime.topics import Topics

TOPICS = Topics(STATION)
PLACES = {"BAY1": PlaceConfig(readers=["ZB-1"], scanners=["SC-1"]), "BAY2": PlaceConfig(readers=["ZB-2"])}
RS, GS, EOT = "\x1e", "\x1d", "\x04"
NOW = "2026-12-06T04:00:00.000Z"
LOST = b"[)>DDMFR 0CVA5SER 674A36458"  # a keyboard wedge dropped every control character


def zebra(epc: str, at: str = "2026-12-06T04:00:00.125-0000") -> bytes:
    return json.dumps([{"data": {"format": "epc", "idHex": epc, "antenna": 1, "peakRssi": -50},
                        "timestamp": at, "type": "SIMPLE"}]).encode()


def mark(cage: str = "0CVA5", pn: str = "4202435-01", serial: str = "674A36458") -> bytes:
    return f"[)>{RS}06{GS}17V{cage}{GS}1P{pn}{GS}S{serial}{RS}{EOT}".encode()


def open_command(place: str = "BAY1", action: str = "receive", wo: str = "WO-1001", **extra) -> dict:
    return {"command": "open", "id": f"c-{place}-{wo}-{action}", "operator": "tester", "place": place,
            "work_order_id": wo, "aircraft": {"registration": "N327HA", "serial_number": "4521"}, "ata": "32",
            "technician": {"cert_no": "3512874", "cert_kind": "FAA-AP"}, "part_action": action, **extra}


@pytest.fixture
def ingest() -> Ingest:
    stage = Ingest()
    stage.open(SimpleNamespace(config=Config(station=STATION, places=PLACES,
                                             limits=LimitsConfig(read_window_s=1e-9)), topics=TOPICS))
    return stage


def command(stage: Ingest, tables: MemoryTables, doc: dict) -> tuple[dict, MemoryUnitOfWork]:
    uow = MemoryUnitOfWork(stage, tables)
    stage.handle_notice(TOPICS.sessions, json.dumps(doc).encode(), uow)
    [(topic, payload, _, _)] = [m for m in uow.messages() if "/reply/" in m[0]]
    assert topic == TOPICS.sessions_reply(doc["id"])
    return json.loads(payload), uow


def publish(stage: Ingest, tables: MemoryTables, kind: str, device: str, payload: bytes) -> MemoryUnitOfWork:
    uow = MemoryUnitOfWork(stage, tables)
    run_batch(stage, [DeviceMessage(TOPICS.device_in(kind, device), payload, NOW)], uow)
    return uow


def session(action: str = "receive", **extra) -> WorkSessionOpened:
    return book.opened_entry(open_command(action=action, **extra), station=STATION, places=PLACES, at=NOW,
                             operator="tester")


# --- the mapping -----------------------------------------------------------------------------

@pytest.mark.parametrize(("action", "record_type", "extra"), [
    ("receive", PartReceipt, {}),
    ("install", PartInstallation, {"position": "LH MLG"}),
    ("remove", PartRemoval, {"removal_reason": "UNSCHEDULED", "position": "LH MLG"}),
])
def test_a_part_read_becomes_the_record_of_the_session_part_action(action, record_type, extra):
    opened = session(action, **extra)
    [read] = reads_of("rfid_zebra", "ZB-1", zebra(encode_adi_var(0, "35962", "PQ7VZ4", "M37GXB92")), NOW)
    body = record_body(opened, read)
    record = decode_record(json_encode(body), station=STATION, device_kind="rfid_reader", device_id="ZB-1",
                           max_bytes=65536, max_depth=16)
    assert isinstance(record, record_type)
    assert (record.work_order_id, record.ata, record.technician.cert_no) == ("WO-1001", "32", "3512874")
    assert (record.part.cage, record.part.part_number, record.part.serial_number) == ("35962", "PQ7VZ4", "M37GXB92")
    assert record.part.condition == ("UNSERVICEABLE" if action == "remove" else "SERVICEABLE")
    assert record.event_id == event_id_of(opened.session_id, read) and record.occurred_at.year == 2026
    if action == "remove":
        assert record.removal_reason == "UNSCHEDULED" and record.position == "LH MLG"


def test_a_read_that_names_no_part_is_never_made_a_record():
    [lost] = reads_of("partmark_scanner", "SC-1", LOST, NOW)
    tag = reads_of("rfid_zebra", "ZB-1", zebra("E2801191A5030065F26CCBFF"), NOW)[0]
    assert isinstance(lost, RawRead) and lost.problem == "framing_lost" and parse_partmark(LOST).framing_lost
    assert (lost.cage, lost.part_number, lost.serial) == (None, None, None)
    assert tag.problem == "not_a_part_tag"
    for read in (lost, tag):
        with pytest.raises(ValueError):
            record_body(session(), read)
        assert book.route("BAY1", {"BAY1": session()}, read) == read.problem


def test_the_matcher_names_the_place_and_its_open_session():
    assert book.place_of(PLACES, "rfid_zebra", "ZB-2") == "BAY2"
    assert book.place_of(PLACES, "partmark_scanner", "ZB-2") is None  # a reader is no scanner
    [read] = reads_of("partmark_scanner", "SC-1", mark(), NOW)
    assert book.route(None, {}, read) == "no_place"
    assert book.route("BAY1", {"BAY2": session()}, read) == "no_session"
    assert book.route("BAY1", {"BAY1": session()}, read) == session()


def test_session_context_is_checked_against_the_contract():
    with pytest.raises(book.SessionError, match="unknown place"):
        book.opened_entry(open_command(place="BAY9"), station=STATION, places=PLACES, at=NOW, operator="t")
    with pytest.raises(book.SessionError, match="ata"):
        book.opened_entry(open_command(ata="99"), station=STATION, places=PLACES, at=NOW, operator="t")
    with pytest.raises(book.SessionError, match="removal_reason"):
        book.opened_entry(open_command(action="remove"), station=STATION, places=PLACES, at=NOW, operator="t")


# --- ingest ----------------------------------------------------------------------------------

def test_within_a_session_a_tag_read_is_a_record_and_the_session_is_in_the_ledger(ingest):
    tables = MemoryTables()
    reply, uow = command(ingest, tables, open_command())
    assert reply["ok"], reply
    [opened] = uow.forwarded_as(ReceivedRecord)
    assert isinstance(opened.record, WorkSessionOpened) and opened.device == book.SESSION_DEVICE
    epc = encode_adi_var(0, "35962", "PQ7VZ4", "M37GXB92")
    uow = publish(ingest, tables, "rfid_zebra", "ZB-1", zebra(epc))
    [received] = uow.forwarded_as(ReceivedRecord)
    assert isinstance(received.record, PartReceipt) and received.record.work_order_id == "WO-1001"
    assert received.device.kind == "rfid_reader" and [s for _, s in uow.states()] == ["RECEIVED"]
    again = publish(ingest, tables, "rfid_zebra", "ZB-1", zebra(epc, at="2026-12-06T04:00:09.000-0000"))
    assert again.forwarded == [] and [s for _, s in again.states()] == ["READ_REPEATED"]  # one per session

    reply, uow = command(ingest, tables, {"command": "close", "id": "c2", "operator": "t", "place": "BAY1"})
    [closed] = uow.forwarded_as(ReceivedRecord)
    assert isinstance(closed.record, WorkSessionClosed) and closed.record.records == 1
    assert closed.record.session_id == opened.record.session_id


def test_without_a_session_a_read_is_kept_listed_and_assignable(ingest):
    tables = MemoryTables()
    uow = publish(ingest, tables, "partmark_scanner", "SC-1", mark())
    assert uow.forwarded == [] and uow.dlq() == []
    reply, _ = command(ingest, tables, {"command": "reads_list", "id": "l1"})
    [read] = reply["reads"]
    assert (read["place"], read["reason"], read["serial"], read["assignable"]) == ("BAY1", "no_session",
                                                                                    "674A36458", True)
    assert ingest.status_extra() == {"unassigned_reads": 1}
    reply, _ = command(ingest, tables, {"command": "reads_assign", "id": "a0", "read_id": read["read_id"]})
    assert not reply["ok"] and "no session is open" in reply["message"]

    command(ingest, tables, open_command(action="install", position="RH ENG"))
    reply, uow = command(ingest, tables, {"command": "reads_assign", "id": "a1", "read_id": read["read_id"]})
    assert reply["ok"], reply
    [received] = uow.forwarded_as(ReceivedRecord)
    assert isinstance(received.record, PartInstallation) and received.record.position == "RH ENG"
    assert received.record.device.kind == "barcode_scanner"
    assert [(d, r.status) for d, r in uow.receipts()] == [("SC-1", "received")]
    assert command(ingest, tables, {"command": "reads_list", "id": "l2"})[0]["reads"] == []


def test_a_scan_that_lost_its_framing_is_kept_flagged_and_cannot_be_assigned(ingest):
    tables = MemoryTables()
    command(ingest, tables, open_command())
    uow = publish(ingest, tables, "partmark_scanner", "SC-1", LOST)
    assert uow.forwarded == []
    reply, _ = command(ingest, tables, {"command": "reads_list", "id": "l1"})
    [read] = reply["reads"]
    assert read["assignable"] is False and read["reason"] == "framing_lost" and read["serial"] is None
    reply, _ = command(ingest, tables, {"command": "reads_assign", "id": "a1", "read_id": read["read_id"]})
    assert not reply["ok"] and "without guessing" in reply["message"]


def test_a_malformed_reader_event_goes_to_the_dlq(ingest):
    uow = publish(ingest, MemoryTables(), "rfid_zebra", "ZB-1", b'[{"data": {"idHex": 5}}]')
    [report] = uow.dlq()
    assert report["stage"] == "ingest" and uow.forwarded == []


def test_a_second_session_at_a_place_is_refused(ingest):
    tables = MemoryTables()
    assert command(ingest, tables, open_command())[0]["ok"]
    reply, uow = command(ingest, tables, open_command(wo="WO-2002"))
    assert not reply["ok"] and "close it first" in reply["message"] and uow.forwarded == []


# --- the property: every read is a record or unassigned, in at most one session ---------------

PARTS = [("35962", "PQ7VZ4", f"S{n}") for n in range(4)]
op = st.one_of(
    st.tuples(st.just("open"), st.sampled_from(["BAY1", "BAY2"]), st.integers(0, 9)),
    st.tuples(st.just("close"), st.sampled_from(["BAY1", "BAY2"]), st.just(0)),
    st.tuples(st.just("read"), st.sampled_from(["ZB-1", "ZB-2", "ZB-9"]), st.integers(0, len(PARTS) - 1)),
    st.tuples(st.just("assign"), st.just(""), st.integers(0, 5)),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(op, max_size=40))
def test_any_sequence_assigns_each_read_to_at_most_one_session_and_loses_none(ops):
    stage = Ingest()
    stage.open(SimpleNamespace(config=Config(station=STATION, places=PLACES,
                                             limits=LimitsConfig(read_window_s=1e-9)), topics=TOPICS))
    tables = MemoryTables()
    open_now: dict[str, str] = {}  # place -> work order (the model)
    recorded: set[tuple[str, str]] = set()  # (session work order, part) recorded (the model)
    reads = records = kept = repeated = 0
    for n, (kind, target, value) in enumerate(ops):
        if kind == "open":
            reply, _ = command(stage, tables, open_command(place=target, wo=f"WO-{n}{value}"))
            assert reply["ok"] == (target not in open_now)
            open_now.setdefault(target, f"WO-{n}{value}")
        elif kind == "close":
            reply, _ = command(stage, tables, {"command": "close", "id": f"x{n}", "place": target})
            assert reply["ok"] == (target in open_now)
            open_now.pop(target, None)
        elif kind == "assign":
            listed = command(stage, tables, {"command": "reads_list", "id": f"l{n}"})[0]["reads"]
            if not listed:
                continue
            read = listed[value % len(listed)]
            reply, uow = command(stage, tables, {"command": "reads_assign", "id": f"a{n}",
                                                 "read_id": read["read_id"]})
            assert reply["ok"] == (read["place"] in open_now), reply
            if reply["ok"]:
                kept -= 1
                wo = open_now[read["place"]]
                made = uow.forwarded_as(ReceivedRecord)
                if (wo, read["serial"]) in recorded:
                    assert made == []
                    repeated += 1
                else:
                    [record] = made
                    assert record.record.work_order_id == wo
                    recorded.add((wo, read["serial"]))
                    records += 1
        else:
            reads += 1
            cage, pn, serial = PARTS[value]
            uow = publish(stage, tables, "rfid_zebra", target, zebra(encode_adi_var(0, cage, pn, serial),
                                                                        at=f"2026-12-06T04:00:{n:02d}.000Z"))
            made = [r for r in uow.forwarded_as(ReceivedRecord) if not isinstance(r.record, WorkSessionOpened)]
            place = book.place_of(PLACES, "rfid_zebra", target)
            states = [s for _, s in uow.states()]
            if place in open_now:
                wo = open_now[place]
                if (wo, serial) in recorded:
                    assert made == [] and states == ["READ_REPEATED"]
                    repeated += 1
                else:
                    [record] = made
                    assert record.record.work_order_id == wo
                    recorded.add((wo, serial))
                    records += 1
            else:
                assert made == [] and "UNASSIGNED" in states
                kept += 1
        assert command(stage, tables, {"command": "reads_list", "id": f"c{n}"})[0]["total"] == kept
        assert records + kept + repeated == reads
    unassigned = command(stage, tables, {"command": "reads_list", "id": "z"})[0]["total"]
    assert unassigned == kept and records + kept + repeated == reads


def test_an_impinj_reader_in_a_session_records_through_the_same_path(ingest):
    places = dict(PLACES, BAY2=PlaceConfig(readers=["R700-1"]))
    stage = Ingest()
    stage.open(SimpleNamespace(config=Config(station=STATION, places=places), topics=TOPICS))
    tables = MemoryTables()
    assert command(stage, tables, open_command(place="BAY2"))[0]["ok"]
    epc = encode_adi_var(0, "35962", "PQ7VZ4", "IMP1")
    event = {"timestamp": "2026-12-06T04:00:00.5Z", "hostname": "r700",
             "tagInventoryEvent": {"epcHex": epc, "antennaPort": 1, "peakRssiCdbm": -5200}}
    uow = publish(stage, tables, "rfid_impinj", "R700-1", json.dumps(event).encode())
    [received] = uow.forwarded_as(ReceivedRecord)
    assert received.record.part.serial_number == "IMP1" and received.device.id == "R700-1"
    assert received.record.device.kind == "rfid_reader"


def tablet(stage: Ingest, tables: MemoryTables, doc: dict) -> MemoryUnitOfWork:
    return publish(stage, tables, "tablet", "TAB-12", json.dumps(doc).encode())


def test_a_tablet_opens_and_closes_a_session_with_receipts_and_a_resend_is_answered_once(ingest):
    tables = MemoryTables()
    doc = dict(open_command(), schema=book.SESSION_SCHEMA, id="0b6e4c1a-8d2f-4e5b-9c7a-1f2e3d4c5b6a")
    uow = tablet(ingest, tables, doc)
    [opened] = uow.forwarded_as(ReceivedRecord)
    assert isinstance(opened.record, WorkSessionOpened) and opened.record.operator == "tablet/TAB-12"
    assert [(d, r.status, r.event_id) for d, r in uow.receipts()] == [("TAB-12", "received", doc["id"])]
    again = tablet(ingest, tables, doc)  # the tablet missed its receipt and sent the command again
    assert again.forwarded == [] and [r.status for _, r in again.receipts()] == ["received"]

    bad = dict(doc, id="7f0c1a1e-8d2f-4e5b-9c7a-1f2e3d4c5b6a", work_order_id="WO-2")
    uow = tablet(ingest, tables, bad)
    [(_, receipt)] = uow.receipts()
    assert receipt.status == "rejected" and receipt.errors[0].rule == "work_session"
    assert "close it first" in receipt.errors[0].expected and uow.dlq()[0]["stage"] == "ingest"

    close = {"schema": book.SESSION_SCHEMA, "id": "1c6e4c1a-8d2f-4e5b-9c7a-1f2e3d4c5b6a", "command": "close",
             "place": "BAY1"}
    [closed] = tablet(ingest, tables, close).forwarded_as(ReceivedRecord)
    assert isinstance(closed.record, WorkSessionClosed) and closed.record.operator == "tablet/TAB-12"


def test_assigning_a_read_of_a_part_the_session_already_recorded_makes_no_second_record(ingest):
    tables = MemoryTables()
    publish(ingest, tables, "partmark_scanner", "SC-1", mark())
    [read] = command(ingest, tables, {"command": "reads_list", "id": "l"})[0]["reads"]
    command(ingest, tables, open_command())
    assert len(publish(ingest, tables, "rfid_zebra", "ZB-1",
                       zebra(encode_adi_var(0, "0CVA5", "4202435-01", "674A36458"))).forwarded) == 1
    reply, uow = command(ingest, tables, {"command": "reads_assign", "id": "a", "read_id": read["read_id"]})
    assert reply["ok"] and "already recorded" in reply["message"] and uow.forwarded == []
    assert command(ingest, tables, {"command": "reads_list", "id": "l2"})[0]["total"] == 0


def test_a_batch_retried_after_a_failed_commit_keeps_every_read():
    """The read window is in memory: a batch whose transaction failed (rolled back, so new tables
    here) is processed again and must keep what it held the first time, not take it for repeats."""
    ingest = Ingest()
    ingest.open(SimpleNamespace(config=Config(station=STATION, places=PLACES), topics=TOPICS))  # a 5 s window
    payloads = [("rfid_zebra", "ZB-2", zebra(encode_adi_var(0, "35962", "PQ7VZ4", "RETRY1"))),
                ("rfid_zebra", "ZB-1", zebra(encode_adi_var(0, "35962", "PQ7VZ4", "RETRY2")))]
    base = MemoryTables()
    command(ingest, base, open_command())
    for _attempt in range(2):
        tables = MemoryTables()
        tables.tables = {name: dict(rows) for name, rows in base.tables.items()}
        made = [len(publish(ingest, tables, kind, device, payload).forwarded) for kind, device, payload in payloads]
        assert made == [0, 1]
        assert command(ingest, tables, {"command": "reads_list", "id": "l"})[0]["total"] == 1


# --- raw payloads: kept under their SHA-256, named in the record, returned to auditors -----------

def test_a_recorded_reads_payload_is_kept_under_the_sha256_its_record_names(ingest):
    tables = MemoryTables()
    command(ingest, tables, open_command())
    payload = zebra(encode_adi_var(0, "35962", "PQ7VZ4", "RAW001"))
    uow = publish(ingest, tables, "rfid_zebra", "ZB-1", payload)
    [made] = uow.forwarded_as(ReceivedRecord)
    digest = hashlib.sha256(payload).hexdigest()
    assert made.record.notes == f"raw sha256 {digest} (zebra_iot_connector event)"
    assert tables.table(book.RAW_PAYLOADS) == {digest.encode(): payload}
    reply, _ = command(ingest, tables, {"command": "reads_raw", "id": "r1", "sha256": digest.upper()})
    assert reply["ok"] and base64.b64decode(reply["base64"]) == payload and reply["bytes"] == len(payload)
    publish(ingest, tables, "rfid_zebra", "ZB-1", payload)  # delivered again: stored once
    assert len(tables.table(book.RAW_PAYLOADS)) == 1


def test_an_unassigned_reads_payload_is_kept_and_its_record_names_it_once_assigned(ingest):
    tables = MemoryTables()
    payload = mark(serial="RAW0002")
    publish(ingest, tables, "partmark_scanner", "SC-1", payload)
    digest = hashlib.sha256(payload).hexdigest()
    reply, _ = command(ingest, tables, {"command": "reads_list", "id": "l1"})
    [read] = reply["reads"]
    assert read["raw_sha256"] == digest and digest.encode() in tables.table(book.RAW_PAYLOADS)
    command(ingest, tables, open_command())
    _, uow = command(ingest, tables, {"command": "reads_assign", "id": "a1", "read_id": read["read_id"]})
    [made] = [r for r in uow.forwarded_as(ReceivedRecord) if isinstance(r.record, PartReceipt)]
    assert made.record.notes == f"raw sha256 {digest} (partmark_15434 scan)"


def test_a_payload_whose_reads_made_nothing_new_is_not_kept_and_unknown_hashes_are_refused(ingest):
    tables = MemoryTables()
    command(ingest, tables, open_command())
    epc = encode_adi_var(0, "35962", "PQ7VZ4", "RAW003")
    publish(ingest, tables, "rfid_zebra", "ZB-1", zebra(epc))
    repeated = zebra(epc, at="2026-12-06T04:00:09.000-0000")  # the same tag again in the session
    publish(ingest, tables, "rfid_zebra", "ZB-1", repeated)
    assert hashlib.sha256(repeated).hexdigest().encode() not in tables.table(book.RAW_PAYLOADS)
    publish(ingest, tables, "rfid_zebra", "ZB-1", b'[{"data": {"idHex": 5}}]')  # refused: its DLQ report
    assert len(tables.table(book.RAW_PAYLOADS)) == 1
    reply, _ = command(ingest, tables, {"command": "reads_raw", "id": "r2", "sha256": "0" * 64})
    assert not reply["ok"] and "no raw payload" in reply["message"]
    reply, _ = command(ingest, tables, {"command": "reads_raw", "id": "r3", "sha256": "not-a-hash"})
    assert not reply["ok"] and "64 hexadecimal digits" in reply["message"]
