"""DLQ redrive (`services.validate.redrive`) with the real validate handler on the in-memory unit of
work: the selection filters, the fate transitions, and that no interleaving of redrives, device
re-sends, registry changes, redeliveries and out-of-order outcome notices records a key twice."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mro_edge.simulator.records import sign_record, valid_record
from services.ingest.stage import Ingest
from services.sign.stage import entry_source_error
from services.validate.contract import CommandError
from services.validate.redrive import Selection, matches, parse_selection
from services.validate.stage import Validate
from shared.compliance.settings import DEFAULT_REGISTRIES
from shared.contract import decode_record, idempotency_key, normalize
from shared.contract.scalars import stored_hook
from shared.runtime import dlq
from shared.runtime.clock import utc_now
from shared.runtime.config import Config, load_config
from shared.runtime.delivery import apply_outcomes, run_batch
from shared.runtime.handler import DeviceMessage, Stage
from shared.runtime.hopauth import ensure_hop_keys
from shared.runtime.messages import (
    DeviceRef,
    DlqRedrive,
    Fate,
    FateQuery,
    Outcome,
    Outcomes,
    ReceivedRecord,
    ValidatedRecord,
    json_encode,
)
from shared.runtime.stage import StageRuntime
from shared.runtime.testing import STATION, MemoryTables, MemoryUnitOfWork
from shared.runtime.topics import Topics
from shared.runtime.verdicts import Recorded, Verdict

TOPICS = Topics(STATION)
NEW_TOOL = "NORBAR-EVO-2000-77001"
TOOL_ENTRY = (f'\n[[tool]]\nserial_number = "{NEW_TOOL}"\ndescription = "new wrench"\n'
              'calibrated_on = 2026-01-02\ncalibration_due = 2099-12-31\n')
ROW_DECODER = msgspec.json.Decoder(ReceivedRecord, dec_hook=stored_hook)
pipeline_item = msgspec.json.Decoder(ValidatedRecord | FateQuery, dec_hook=stored_hook)


class Ledger(Stage[ValidatedRecord]):
    """Stands in for sign's appends only: the dedupe under test is the runtime's (`run_batch`), which
    is what keeps sign from appending a key twice (tests/integration/test_dlq_redrive_pipeline.py: real sign)."""

    name = "sign"
    input_type = ValidatedRecord

    def __init__(self) -> None:
        self.entries: list[ValidatedRecord] = []

    def judge(self, item: ValidatedRecord, uow) -> Verdict:
        self.entries.append(item)
        return Recorded(len(self.entries) - 1)


class Registries:
    def __init__(self, path: Path) -> None:
        self.tools = path / "tools.toml"
        self.original = self.tools.read_text()

    def fix(self) -> None:
        self.tools.write_text(self.original + TOOL_ENTRY)

    def unfix(self) -> None:
        self.tools.write_text(self.original)


@pytest.fixture
def edge(tmp_path) -> Iterator[SimpleNamespace]:
    registries = tmp_path / "registries"
    shutil.copytree(DEFAULT_REGISTRIES, registries)
    config = load_config(env={"MRO_DATA_DIR": str(tmp_path / "data"), "MRO_STATION": STATION,
                              "MRO_MQTT_URL": "mqtt://127.0.0.1:9",
                              "MRO_COMPLIANCE_REGISTRIES_DIR": str(registries),
                              "MRO_COMPLIANCE_REGISTRY_CHECK_S": "0"})
    ensure_hop_keys(config.data_path)
    runtime = StageRuntime(Validate(), config)
    runtime.stage.open(runtime)
    ingest = Ingest()
    ingest.open(SimpleNamespace(config=Config(station=STATION), topics=TOPICS))
    yield SimpleNamespace(validate=runtime.stage, ingest=ingest, registries=Registries(registries))
    runtime.store.close()


def torque(seed: int, device_id: str = "TQW-07", tool: str = NEW_TOOL, occurred: datetime | None = None) -> dict:
    data = valid_record(random.Random(seed), station=STATION, device_kind="torque_wrench", device_id=device_id,
                        record_type="torque_event", occurred_at=occurred)
    data["tool"]["serial_number"] = tool
    if "signature" in data["technician"]:
        sign_record(data)  # the signature follows the edited content
    return data


def received(data: dict, at: str | None = None) -> ReceivedRecord:
    device = data["device"]
    record = decode_record(json.dumps(data).encode(), station=STATION, device_kind=device["kind"],
                           device_id=device["id"])
    return ReceivedRecord(idempotency_key(normalize(record)), record, at or utc_now(),
                          DeviceRef(device["kind"], device["id"]))


def command(selection: dict, command_id: str = "c1", **extra) -> bytes:
    return json_encode({"command": "redrive", "id": command_id, "sent_at": utc_now(), "operator": "jdoe",
                        "selection": selection, **extra})


def redrive(stage: Validate, tables: MemoryTables, selection: dict, command_id: str = "c1"
            ) -> tuple[dict, MemoryUnitOfWork]:
    uow = MemoryUnitOfWork(stage, tables)
    stage.handle_notice(TOPICS.redrive, command(selection, command_id), uow)
    [reply] = [json.loads(p) for t, p, _, _ in uow.outgoing if t == TOPICS.redrive_reply(command_id)]
    return reply, uow


def rows(tables: MemoryTables) -> list[tuple[int, dlq.Row]]:
    return [(int.from_bytes(k, "big"), dlq.decode_row(v)) for k, v in sorted(tables.table(dlq.DLQ).items())]


# -- the selection ------------------------------------------------------------------------------

def test_a_selection_needs_a_filter_and_a_sane_limit():
    for bad in ({}, None, {"limit": 5}, {"rule": "x", "limit": 0}, {"rule": "x", "limit": 1001},
                {"since": "yesterday"}, {"rule": 3}, {"colour": "red"}, {"id": -1}, {"rule": "r" * 65}):
        with pytest.raises(CommandError):
            parse_selection(bad)
    assert parse_selection({"all": True}) == Selection(all=True)
    assert parse_selection({"id": 0}).id == 0  # row 0 is a real row


def test_each_filter_selects_only_its_rows():
    at = "2026-12-06T04:00:00.000000Z"
    item = received(torque(1, "TQW-07"), at)
    row = dlq.Row("validate", errors=[{"rule": "tool_unknown"}, {"rule": "technician_unknown"}])
    assert matches(Selection(all=True), 7, row, item)
    assert matches(Selection(id=7), 7, row, item) and not matches(Selection(id=8), 7, row, item)
    assert matches(Selection(rule="technician_unknown"), 7, row, item)
    assert not matches(Selection(rule="tool_calibration_expired"), 7, row, item)
    assert matches(Selection(device="TQW-07"), 7, row, item) and not matches(Selection(device="TQW-0"), 7, row, item)
    assert matches(Selection(since=at), 7, row, item)
    assert matches(Selection(since="2026-12-06T03:59:59Z"), 7, row, item)
    assert not matches(Selection(since="2026-12-06T04:00:01Z"), 7, row, item)
    assert not matches(Selection(rule="tool_unknown", device="TQW-99"), 7, row, item)  # every filter must hold


def test_the_filters_select_rows_from_the_dlq(edge):
    tables = MemoryTables()
    early = (datetime.now(UTC) - timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    old = torque(1, "TQW-07", occurred=datetime.now(UTC) - timedelta(hours=3))
    items = [received(old, early), received(torque(2, "TQW-08")), received(torque(3, "TQW-07"))]
    run_batch(edge.validate, items, MemoryUnitOfWork(edge.validate, tables))
    assert [r.rules for _, r in rows(tables)] == [["tool_unknown"]] * 3
    edge.registries.fix()
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")

    reply, _ = redrive(edge.validate, tables, {"rule": "tool_calibration_expired"}, "r0")
    assert reply["selected"] == 0 and "ledger_event_id" not in reply
    reply, _ = redrive(edge.validate, tables, {"id": 1}, "r1")
    assert [i["event_id"] for i in reply["items"]] == [items[1].event_id]
    reply, _ = redrive(edge.validate, tables, {"device": "TQW-07", "since": since}, "r2")
    assert [i["event_id"] for i in reply["items"]] == [items[2].event_id]
    reply, _ = redrive(edge.validate, tables, {"rule": "tool_unknown", "limit": 1}, "r3")
    assert [i["event_id"] for i in reply["items"]] == [items[0].event_id] and reply["more"] is False
    assert rows(tables) == [] and dlq.Usage(0, 0, 0) == dlq.Usage(0, edge_bytes(tables), 0)


def edge_bytes(tables: MemoryTables) -> int:
    raw = tables.table("meta").get(b"dlq_bytes")
    return int.from_bytes(raw, "big") if raw else 0


# -- fates --------------------------------------------------------------------------------------

def test_a_fixed_record_goes_to_sign_once_with_the_redrive_entry(edge):
    tables = MemoryTables()
    item = received(torque(5))
    first = MemoryUnitOfWork(edge.validate, tables)
    run_batch(edge.validate, [item], first)
    [(_, row)] = rows(tables)
    assert ROW_DECODER.decode(row.record) == item and row.redrive == 0  # the whole record is kept
    assert tables.fate(item.key) == Fate("rejected", errors=tables.fate(item.key).errors)

    edge.registries.fix()
    tables.outbox.clear()
    reply, uow = redrive(edge.validate, tables, {"rule": "tool_unknown"})
    assert (reply["ok"], reply["selected"], reply["accepted"], reply["rejected"]) == (True, 1, 1, 0)
    record, entry = uow.forwarded_as(ValidatedRecord)
    assert record == ValidatedRecord(item.key, item.record, item.device)
    assert isinstance(entry.record, DlqRedrive) and entry_source_error(entry) is None
    assert (entry.record.operator, entry.record.selection, entry.record.command_id) == (
        "jdoe", {"rule": "tool_unknown"}, "c1")
    assert [(i.key, i.result) for i in entry.record.items] == [(item.key, "accepted")]
    assert reply["ledger_event_id"] == entry.record.event_id
    assert tables.fate(item.key) == Fate("validated", redrive=1)
    assert rows(tables) == [] and edge_bytes(tables) == 0
    assert uow.receipts() == []  # `recorded` is sign's to send, as for a first-time record

    again, uow = redrive(edge.validate, tables, {"rule": "tool_unknown"}, "c2")
    assert (again["selected"], uow.forwarded) == (0, [])
    repeated, uow = redrive(edge.validate, tables, {"rule": "tool_unknown"}, "c1")  # same command id
    assert repeated["repeated"] and repeated["accepted"] == 1 and uow.forwarded == []


def test_a_record_still_invalid_stays_in_the_dlq_with_the_new_report(edge):
    tables = MemoryTables()
    item = received(torque(6))
    run_batch(edge.validate, [item], MemoryUnitOfWork(edge.validate, tables))
    reply, uow = redrive(edge.validate, tables, {"all": True})
    assert (reply["accepted"], reply["rejected"], reply["items"][0]["rules"]) == (0, 1, ["tool_unknown"])
    [(row_id, row)] = rows(tables)
    assert row_id == 1 and row.redrive == 1 and row.rules == ["tool_unknown"]
    assert tables.fate(item.key).status == "rejected" and tables.fate(item.key).redrive == 1
    assert [o.redrive for o in uow.outcomes] == [1]
    [entry] = uow.forwarded_as(ValidatedRecord)
    assert isinstance(entry.record, DlqRedrive) and entry.record.rejected == 1  # the attempt is on record

    edge.registries.fix()
    reply, _ = redrive(edge.validate, tables, {"id": 1}, "c2")
    assert reply["accepted"] == 1 and tables.fate(item.key) == Fate("validated", redrive=2)


def test_the_breaker_and_stale_commands_are_refused(edge):
    tables = MemoryTables()
    uow = MemoryUnitOfWork(edge.validate, tables)
    stale = json_encode({"command": "redrive", "id": "old", "sent_at": "2026-01-01T00:00:00Z",
                         "selection": {"all": True}})
    edge.validate.handle_notice(TOPICS.redrive, stale, uow)
    [reply] = [json.loads(p) for t, p, _, _ in uow.outgoing if t == TOPICS.redrive_reply("old")]
    assert not reply["ok"] and "send it again" in reply["message"]


def test_ingest_keeps_the_newest_final_fate_whatever_the_order_of_notices():
    stage = Ingest()
    stage.open(SimpleNamespace(config=Config(station=STATION), topics=TOPICS))
    notices = [Outcome("k", "rejected", errors=None), Outcome("k", "rejected", redrive=1),
               Outcome("k", "recorded", seq=4), Outcome("k", "rejected", redrive=2)]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]):
        tables = MemoryTables()
        tables.table("seen")[b"k"] = msgspec.msgpack.encode(Fate("received"))
        for index in order:
            apply_outcomes(MemoryUnitOfWork(stage, tables), json_encode(Outcomes([notices[index]])))
        assert tables.fate("k") == Fate("recorded", 4)


# -- any interleaving ---------------------------------------------------------------------------

REDRIVE = st.tuples(st.just("redrive"), st.integers(0, 2))  # 0, 1: a new command; 2: the last one again
FIX = st.tuples(st.just("fix"), st.sampled_from([True, True, False]))  # False: the registry broken again
OPS = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(0, 2)),
    st.tuples(st.just("validate"), st.just(0)),
    REDRIVE, REDRIVE, FIX,
    st.tuples(st.just("sign"), st.booleans()),          # True: the batch is delivered again later
    st.tuples(st.just("outcome"), st.integers(0, 50)),  # one pending notice, in any order
), min_size=4, max_size=30)


class Edge:
    """ingest, validate and the ledger's dedupe on their own tables, with what travels between them
    queued, so a test decides the order of every step."""

    def __init__(self, edge: SimpleNamespace) -> None:
        self.edge = edge
        self.records = [torque(10 + i, f"TQW-1{i}") for i in range(3)]
        self.keys = [received(data).key for data in self.records]
        self.vt, self.it, self.lt = MemoryTables(), MemoryTables(), MemoryTables()
        self.ledger = Ledger()
        self.to_validate: list = []
        self.to_sign: list[bytes] = []
        self.outcomes: list[bytes] = []
        self.forwarded: Counter[str] = Counter()  # records validate owed sign, by key
        self.commands = 0

    def step(self, op: str, arg) -> None:
        getattr(self, op)(arg)

    def send(self, index: int) -> None:
        data = self.records[index]
        device = data["device"]
        uow = MemoryUnitOfWork(self.edge.ingest, self.it)
        run_batch(self.edge.ingest, [DeviceMessage(TOPICS.device_in(device["kind"], device["id"]),
                                                   json.dumps(data).encode(), utc_now())], uow)
        self.to_validate.extend(msgspec.json.decode(raw, type=ReceivedRecord | FateQuery, dec_hook=stored_hook)
                                for raw in uow.forwarded)
        self.it.outbox.clear()  # validate receipted them

    def validate(self, _arg) -> None:
        if self.to_validate:
            uow = MemoryUnitOfWork(self.edge.validate, self.vt)
            run_batch(self.edge.validate, list(self.to_validate), uow)
            self.to_validate.clear()
            self._validated(uow)

    def redrive(self, arg: int) -> None:
        self.commands += arg < 2 or self.commands == 0
        _, uow = redrive(self.edge.validate, self.vt, {"all": True}, f"cmd-{self.commands}")
        self._validated(uow)

    def _validated(self, uow: MemoryUnitOfWork) -> None:
        for raw in uow.forwarded:
            if isinstance(item := pipeline_item.decode(raw), ValidatedRecord):  # not a FateQuery passed on
                self.forwarded[item.key] += 1
        self.to_sign.extend(uow.forwarded)
        self.vt.outbox.clear()  # sign receipted them
        self.outcomes.extend(p for t, p, _, _ in uow.messages() if t == TOPICS.outcomes)

    def fix(self, fixed: bool) -> None:
        self.edge.registries.fix() if fixed else self.edge.registries.unfix()

    def sign(self, again: bool) -> None:
        if self.to_sign:
            uow = MemoryUnitOfWork(self.ledger, self.lt)
            run_batch(self.ledger, [pipeline_item.decode(raw) for raw in self.to_sign], uow)
            self.outcomes.extend(p for t, p, _, _ in uow.messages() if t == TOPICS.outcomes)
            if not again:
                self.to_sign.clear()

    def outcome(self, index: int) -> None:
        if self.outcomes:
            apply_outcomes(MemoryUnitOfWork(self.edge.ingest, self.it), self.outcomes.pop(index % len(self.outcomes)))

    def drain(self) -> None:
        for op in ("validate", "sign", "sign"):
            self.step(op, False)
        while self.outcomes:
            self.outcome(0)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_no_interleaving_records_a_key_twice(edge, ops):
    edge.registries.unfix()
    model = Edge(edge)
    for op, arg in [("send", 0), ("send", 1), ("validate", 0), *ops]:  # two rejected before anything else
        model.step(op, arg)
    model.drain()

    recorded = Counter(entry.key for entry in model.ledger.entries)
    vt, it = model.vt, model.it
    redriven = sum(1 for k in model.keys if k in recorded and vt.fate(k).redrive)
    event(f"records in the ledger after a redrive: {redriven}")
    assert all(count == 1 for count in recorded.values())
    assert all(model.forwarded[key] <= 1 for key in model.keys)
    for key in model.keys:
        validate_fate, ingest_fate = vt.fate(key), it.fate(key)
        if key in recorded:
            assert ingest_fate is not None and ingest_fate.status == "recorded"
        elif validate_fate is not None and validate_fate.status == "rejected":
            assert ingest_fate is not None and ingest_fate.status == "rejected"
            assert ingest_fate.redrive == validate_fate.redrive  # the newest rejection, not a stale one
            assert [r.redrive for _, r in rows(vt) if r.idempotency_key == key] == [validate_fate.redrive]
    entries = [e.record for e in model.ledger.entries if isinstance(e.record, DlqRedrive)]
    accepted = Counter(i.key for e in entries for i in e.items if i.result == "accepted")
    assert all(count == 1 for count in accepted.values())
    assert all(accepted[key] == 1 for key in recorded if vt.fate(key) and vt.fate(key).redrive)
