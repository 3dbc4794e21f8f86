"""The runtime's delivery (dedupe, fates, receipts, outcomes) with each stage's real handler, on the
in-memory unit of work the runtime ships for tests (`shared.runtime.testing`)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mro_edge.simulator.records import valid_record
from services.ingest.stage import Ingest
from services.validate.stage import Validate
from shared.contract import decode_record, idempotency_key, normalize
from shared.ledger.entry import export_row
from shared.ledger.store import decode_entry
from shared.runtime.clock import utc_now
from shared.runtime.config import Config, load_config
from shared.runtime.delivery import apply_outcomes, run_batch
from shared.runtime.handler import DeviceMessage
from shared.runtime.hopauth import ensure_hop_keys
from shared.runtime.messages import (
    DeviceRef,
    Fate,
    FateQuery,
    Outcome,
    Outcomes,
    ReceivedRecord,
    SignedRow,
    ValidatedRecord,
    encode_envelope,
    envelope_decoder,
    item_encoder,
    json_encode,
)
from shared.runtime.stage import StageRuntime
from shared.runtime.testing import STATION, MemoryTables, MemoryUnitOfWork
from shared.runtime.topics import DEVICE_KINDS, Topics
from tests.support.sign import LocalSign, record_item

TOPICS = Topics(STATION)
KINDS = ("tablet", "torque_wrench", "rfid_reader", "barcode_scanner")


def publish(data: dict) -> DeviceMessage:
    device = data["device"]
    return DeviceMessage(TOPICS.device_in(device["kind"], device["id"]), json.dumps(data).encode(), utc_now())


def device_record(seed: int, kind: str = "tablet", device_id: str = "TAB-12") -> dict:
    return valid_record(random.Random(seed), station=STATION, device_kind=kind, device_id=device_id)


@pytest.fixture
def ingest() -> Ingest:
    stage = Ingest()
    stage.open(SimpleNamespace(config=Config(station=STATION), topics=TOPICS))
    return stage


def ingest_batch(stage: Ingest, tables: MemoryTables, *messages: DeviceMessage) -> MemoryUnitOfWork:
    uow = MemoryUnitOfWork(stage, tables)
    run_batch(stage, list(messages), uow)
    return uow


def test_ingest_holds_a_new_record_and_answers_its_resends_with_what_it_knows(ingest):
    tables = MemoryTables()
    data = device_record(1)
    uow = ingest_batch(ingest, tables, publish(data))
    [received] = uow.forwarded_as(ReceivedRecord)
    assert received.key == idempotency_key(normalize(received.record))
    assert received.device == DeviceRef("tablet", "TAB-12")
    assert [(d, r.status, r.event_id) for d, r in uow.receipts()] == [("TAB-12", "received",
                                                                       data["event_id"])]
    assert tables.fate(received.key) == Fate("received") and uow.processed == 1

    tables.outbox.clear()  # validate receipted it
    again = dict(data, event_id="7f0c1a1e-8d2f-4e5b-9c7a-1f2e3d4c5b6a")  # same content, new event_id
    uow = ingest_batch(ingest, tables, publish(again))
    [(_, answer)] = uow.receipts()
    assert (answer.status, answer.event_id, answer.seq) == ("duplicate", again["event_id"], None)
    assert uow.forwarded_as(FateQuery) == [FateQuery(received.key, again["event_id"], received.device)]
    assert [s for _, s in uow.states()] == ["DUPLICATE"]

    notice = json_encode(Outcomes([Outcome(received.key, "recorded", seq=41)]))
    with_outcome = MemoryUnitOfWork(ingest, tables)
    apply_outcomes(with_outcome, notice)
    uow = ingest_batch(ingest, tables, publish(again))
    [(_, answer)] = uow.receipts()
    assert (answer.status, answer.seq) == ("duplicate", 41) and uow.forwarded == []


def test_ingest_rejection_goes_to_the_dlq_and_the_device(ingest):
    tables = MemoryTables()
    data = device_record(2)
    data["unexpected"] = 1
    uow = ingest_batch(ingest, tables, publish(data))
    [report] = uow.dlq()
    assert report["stage"] == "ingest" and report["errors"][0]["rule"] == "unknown_field"
    [(device, receipt)] = uow.receipts()
    assert device == "TAB-12" and receipt.status == "rejected"
    assert [msgspec.to_builtins(e) for e in receipt.errors] == report["errors"]
    assert uow.forwarded == [] and tables.table("seen") == {} and uow.failed == 1
    assert uow.outcomes == []  # outcomes are for ingest: its broker user may not publish them


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), kind=st.sampled_from(KINDS))
def test_a_received_record_crosses_the_hop_unchanged(seed, kind):
    """What ingest owes validate decodes to the same record, body and key (the signed bytes follow)."""
    assert kind in DEVICE_KINDS
    data = device_record(seed, kind, "D-1")
    record = decode_record(json.dumps(data).encode(), station=STATION, device_kind=kind, device_id="D-1")
    sent = ReceivedRecord(idempotency_key(normalize(record)), record, utc_now(), DeviceRef(kind, "D-1"))
    payload = encode_envelope("ingest", [item_encoder.encode(sent)])
    [got] = envelope_decoder(ReceivedRecord | FateQuery).decode(payload).items
    assert got == sent and normalize(got.record) == normalize(record)
    assert idempotency_key(normalize(got.record)) == sent.key


# -- validate -------------------------------------------------------------------------------------

@pytest.fixture
def validate(tmp_path) -> Iterator[Validate]:
    config = load_config(env={"MRO_DATA_DIR": str(tmp_path), "MRO_STATION": STATION,
                              "MRO_MQTT_URL": "mqtt://127.0.0.1:9"})
    ensure_hop_keys(tmp_path)
    runtime = StageRuntime(Validate(), config)
    runtime.stage.open(runtime)
    yield runtime.stage
    runtime.store.close()


def received(data: dict) -> ReceivedRecord:
    device = data["device"]
    record = decode_record(json.dumps(data).encode(), station=STATION, device_kind=device["kind"],
                           device_id=device["id"])
    return ReceivedRecord(idempotency_key(normalize(record)), record, utc_now(), DeviceRef(device["kind"],
                                                                                           device["id"]))


def test_validate_forwards_the_valid_and_rejects_the_rest_and_repeats_its_verdict(validate):
    tables = MemoryTables()
    good = received(device_record(3, "torque_wrench", "TQW-07"))
    suspended = device_record(4, "torque_wrench", "TQW-07")
    suspended["technician"] = {"cert_no": "1198305", "cert_kind": "FAA-AP"}
    bad = received(suspended)
    uow = MemoryUnitOfWork(validate, tables)
    run_batch(validate, [good, bad, good], uow)  # the second `good` is a redelivery: dropped
    assert uow.forwarded_as(ValidatedRecord) == [ValidatedRecord(good.key, good.record, good.device)]
    assert [r.status for _, r in uow.receipts()] == ["rejected"]  # `received` was ingest's to send
    assert [o.key for o in uow.outcomes] == [bad.key] and uow.outcomes[0].status == "rejected"
    assert uow.dlq()[0]["errors"][0]["rule"] == "technician_suspended"
    assert (tables.fate(good.key).status, tables.fate(bad.key).status) == ("validated", "rejected")
    assert [s for e, s in uow.states() if e == good.event_id] == ["VALIDATED", "COMPLIANCE_CHECKED"]

    tables.outbox.clear()
    asked = MemoryUnitOfWork(validate, tables)
    run_batch(validate, [FateQuery(bad.key, "e-bad", bad.device), FateQuery(good.key, "e-good", good.device)],
              asked)
    [(_, again)] = asked.receipts()
    assert (again.status, again.event_id, again.errors) == ("rejected", "e-bad", tables.fate(bad.key).errors)
    assert asked.forwarded_as(FateQuery) == [FateQuery(good.key, "e-good", good.device)]  # sign knows the seq
    assert asked.dlq() == uow.dlq() and asked.processed == 0


# -- sign -----------------------------------------------------------------------------------------

def test_sign_records_each_record_once_and_answers_with_its_seq(tmp_path):
    with LocalSign(tmp_path).open() as sign:
        tables = MemoryTables()
        items = [record_item(i) for i in range(5)]
        uow = MemoryUnitOfWork(sign.stage, tables)
        run_batch(sign.stage, [*items, items[0]], uow)
        rows = uow.forwarded_as(SignedRow)
        assert [r.seq for r in rows] == [0, 1, 2, 3, 4]
        entries = [decode_entry(v) for _, v in sorted(tables.table("ledger").items())]
        assert [bytes(r.row) for r in rows] == [json_encode(export_row(e)) for e in entries]
        assert [(r.status, r.seq) for _, r in uow.receipts()] == [("recorded", s) for s in range(5)]
        assert [(o.status, o.seq) for o in uow.outcomes] == [("recorded", s) for s in range(5)]

        asked = MemoryUnitOfWork(sign.stage, tables)
        run_batch(sign.stage, [FateQuery(items[3].key, "e-3", items[3].device)], asked)
        [(_, answer)] = asked.receipts()
        assert (answer.status, answer.seq, answer.event_id) == ("duplicate", 3, "e-3")
        assert asked.outcomes == [Outcome(items[3].key, "recorded", seq=3)] and asked.forwarded == []
        assert len(tables.table("ledger")) == 5
