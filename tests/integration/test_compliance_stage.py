"""The validate stage's compliance boundaries with its real runtime and real LMDB, no broker:
batches go through `StageRuntime.commit` exactly as they do in the service (one transaction per
batch, notices first), so state, held records, replies and ledger items are the committed ones."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime, timedelta

import pytest

from bench.compliance import synthetic_bodies, write_ledger
from mro_edge.simulator.records import sign_record, valid_record
from services.validate.stage import Validate
from shared.compliance.esign import simulator_seed
from shared.compliance.updates import sign_update
from shared.contract import decode_record, idempotency_key, normalize
from shared.ledger.keys import SigningKey
from shared.runtime.clock import utc_now
from shared.runtime.config import load_config
from shared.runtime.hopauth import ensure_hop_keys
from shared.runtime.messages import (
    DeviceRef,
    FateQuery,
    ReceivedRecord,
    ValidatedRecord,
    envelope_decoder,
    record_body,
)
from shared.runtime.mqtt import Inbound
from shared.runtime.stage import Batch, StageRuntime
from shared.runtime.store import from_u64
from shared.runtime.topics import Topics

STATION = "HGR1"
AUTHORITY = SigningKey(bytes(range(7, 39)))
DRIFT = {
    "version": "mro.record/2",
    "title": "aircraft hours on every maintenance action (AC 43-9C chg 1)",
    "require": [{"field": "aircraft_hours", "types": ["maintenance_action"]}],
}
GENTLE = {
    "version": "mro.record/2",
    "title": "aircraft type on every record",
    "require": [{"field": "aircraft.type", "types": ["*"]}],
}


class Harness:
    def __init__(self, tmp_path, monkeypatch, registries=None):
        self.data = tmp_path / "data"
        env = {"MRO_DATA_DIR": str(self.data), "MRO_MQTT_URL": "mqtt://127.0.0.1:9", "MRO_STATION": STATION,
               "MRO_COMPLIANCE_REGISTRY_CHECK_S": "0"}
        if registries is not None:
            env["MRO_COMPLIANCE_REGISTRIES_DIR"] = str(registries)
        self.config = load_config(env=env)
        self.topics = Topics(STATION)
        keys = self.data / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        (keys / "registry-authority.pub.pem").write_text(AUTHORITY.public_pem())
        ensure_hop_keys(self.data)
        self.rng = random.Random(5)
        self.start()

    def start(self):
        self.runtime = StageRuntime(Validate(), self.config)
        self.runtime.stage.open(self.runtime)

    def restart(self):
        self.runtime.store.close()
        self.start()

    def commit(self, items=(), notices=()):
        inbound = [Inbound(topic, payload, 1, 0, 0) for topic, payload in notices]
        uows = self.runtime.commit(Batch(inputs=list(items), notices=inbound))
        self.outgoing = [(t, p) for u in uows for t, p, _, _ in u.messages()]
        self.transitions = [t for u in uows for t in u.transitions]
        return uows

    # what the stage produced
    def table(self, name):
        store = self.runtime.store
        with store.read() as txn:
            return [(k, v) for k, v in txn.cursor(db=store.table(name))]

    def forwarded(self) -> list[dict]:
        """The bodies of the records owed to sign."""
        rows = b",".join(v for _, v in self.table("outbox"))
        envelope = envelope_decoder(ValidatedRecord).decode(b'{"source":"validate","items":[' + rows + b"]}")
        return [record_body(validated.record) for validated in envelope.items]

    def dlq(self) -> list[dict]:
        return [json.loads(v) for _, v in self.table("dlq")]

    def replies(self, prefix="schema/reply/") -> list[dict]:
        return [json.loads(p) for t, p in self.outgoing if f"/pipeline/{prefix}" in t]

    def alarms(self) -> list[dict]:
        return [json.loads(p) for t, p in self.outgoing if t == self.topics.alarm]

    def states(self):
        return [(t.correlation_id, t.state) for t in self.transitions]

    # inputs
    def item(self, record_type=None, kind="tablet", device_id="TAB-12", edit=None, occurred=None) -> ReceivedRecord:
        data = valid_record(self.rng, station=STATION, device_kind=kind, device_id=device_id,
                            record_type=record_type, occurred_at=occurred)
        if edit:
            edit(data)
            if "signature" in data["technician"]:
                sign_record(data)  # signatures follow the edited content
        return self.item_of(data)

    def item_of(self, data: dict) -> ReceivedRecord:
        kind, device_id = data["device"]["kind"], data["device"]["id"]
        record = decode_record(json.dumps(data).encode(), station=STATION, device_kind=kind, device_id=device_id)
        return ReceivedRecord(idempotency_key(normalize(record)), record, utc_now(), DeviceRef(kind, device_id))

    def schema(self, command, **fields):
        payload = json.dumps({"command": command, "id": f"c{time.monotonic_ns()}", "sent_at": utc_now(),
                              "operator": "test", **fields}).encode()
        self.commit(notices=[(self.topics.schema, payload)])
        return self.replies()[-1]


@pytest.fixture
def stage(tmp_path, monkeypatch):
    return Harness(tmp_path, monkeypatch)


def test_valid_records_are_compliance_checked_and_forwarded(stage):
    items = [stage.item(kind=kind, device_id=device) for kind, device in
             (("tablet", "TAB-12"), ("torque_wrench", "TQW-07"), ("rfid_reader", "RFID-01")) for _ in range(30)]
    stage.commit(items)
    assert len(stage.forwarded()) == 90 and stage.dlq() == []
    states = stage.states()
    for item in items:
        event_id = item.event_id
        assert states.index((event_id, "VALIDATED")) < states.index((event_id, "COMPLIANCE_CHECKED"))
    processed = from_u64(dict(stage.table("meta"))[b"processed"])
    assert processed == 90  # one count per record, not per transition


def test_compliance_rejections_use_the_dlq_and_rejected_receipts(stage):
    def suspended(data):
        data["technician"] = {"cert_no": "1198305", "cert_kind": "FAA-AP"}

    item = stage.item("torque_event", kind="torque_wrench", device_id="TQW-07", edit=suspended)
    stage.commit([item])
    [report] = stage.dlq()
    assert report["stage"] == "validate" and report["idempotency_key"] == item.key
    assert report["errors"] == [{"path": "$.technician.cert_no", "rule": "technician_suspended",
                                 "expected": report["errors"][0]["expected"], "received": '"1198305"'}]
    receipts = [json.loads(p) for t, p in stage.outgoing if t == stage.topics.receipt("TQW-07")]
    assert receipts[0]["status"] == "rejected" and receipts[0]["errors"] == report["errors"]
    assert stage.forwarded() == []


def test_hours_state_survives_a_restart(stage):
    first = valid_record(stage.rng, station=STATION, device_kind="tablet", device_id="TAB-12",
                         record_type="maintenance_action")
    first.update(return_to_service=False, aircraft_hours=52_000.5, aircraft_cycles=31_000)
    first["technician"] = {"cert_no": "3512874", "cert_kind": "FAA-AP"}
    first["aircraft"] = {"registration": "N327HA", "serial_number": "4521", "type": "A320-214"}
    stage.commit([stage.item_of(first)])
    stage.restart()
    later = dict(first, event_id="7f0c1a1e-8d2f-4e5b-9c7a-1f2e3d4c5b6a", aircraft_hours=51_999,
                 occurred_at=(datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z")
    stage.commit([stage.item_of(later)])
    assert [e["rule"] for e in stage.dlq()[0]["errors"]] == ["aircraft_hours_decreased"]


def test_two_installations_of_one_serial_in_one_batch(stage):
    def serial(aircraft):
        def edit(data):
            data["part"]["serial_number"] = "SN-4242"
            data["part"]["part_number"] = "2-1589-1"
            data["aircraft"] = aircraft
        return edit

    a = stage.item("part_installation", edit=serial({"registration": "N327HA", "serial_number": "4521"}))
    b = stage.item("part_installation", edit=serial({"registration": "D-AIZQ", "serial_number": "5287"}))
    stage.commit([a, b])
    assert len(stage.forwarded()) == 1
    assert stage.dlq()[0]["errors"][0]["rule"] == "part_already_installed"


# --- registries ----------------------------------------------------------------------------------

def new_technician(cert_no="US-0420001", status="active"):
    import base64

    return {"cert_no": cert_no, "status": status,
            "public_key": base64.b64encode(SigningKey(simulator_seed(cert_no)).public_bytes).decode(),
            "certificates": [{"kind": "FAA-AP", "issued": "2015-01-01"}],
            "authorisations": [{"chapters": ["*"], "privileges": ["maintain", "certify", "inspect"]}]}


def by_new_technician(stage, cert_no="US-0420001"):
    data = valid_record(stage.rng, station=STATION, device_kind="tablet", device_id="TAB-12",
                        record_type="maintenance_action")
    data.update(return_to_service=True, action="REPLACE")
    data["technician"] = {"cert_no": cert_no, "cert_kind": "FAA-AP"}
    sign_record(data, key=SigningKey(simulator_seed(cert_no)))
    return stage.item_of(data)


def push(stage, message: dict, reply_id="r1"):
    stage.commit(notices=[(stage.topics.registry, json.dumps(dict(message, id=reply_id)).encode())])


def test_signed_registry_update_is_applied_atomically_and_persisted(stage):
    item = by_new_technician(stage)
    stage.commit([item])
    assert stage.dlq()[-1]["errors"][0]["rule"] == "technician_unknown"
    update = {"serial": 1, "issued_at": utc_now(), "technicians": {"upsert": [new_technician()]}}
    push(stage, sign_update(update, AUTHORITY))
    assert stage.replies("registry/reply/")[0]["ok"] is True
    assert ("REGISTRY_UPDATED" in [s for _, s in stage.states()])
    stage.restart()  # persisted in the stage's LMDB, on top of the files
    second = by_new_technician(stage)
    stage.commit([second])
    assert stage.forwarded()[-1]["event_id"] == second.event_id
    suspend = {"serial": 2, "issued_at": utc_now(),
               "technicians": {"upsert": [new_technician(status="suspended")]}}
    push(stage, sign_update(suspend, AUTHORITY), "r2")
    third = by_new_technician(stage)
    stage.commit([third])
    assert stage.dlq()[-1]["errors"][0]["rule"] == "technician_suspended"


@pytest.mark.parametrize("forge", ["unsigned", "other_key", "altered", "replayed"])
def test_registry_update_without_a_valid_authority_signature_is_refused(stage, forge):
    update = {"serial": 1, "issued_at": utc_now(), "technicians": {"upsert": [new_technician()]}}
    good = sign_update(update, AUTHORITY)
    if forge == "replayed":
        push(stage, good, "first")
        message = good
    elif forge == "unsigned":
        message = {"update": update}
    elif forge == "other_key":
        message = sign_update(update, SigningKey.generate())
    else:
        message = json.loads(json.dumps(good))
        message["update"]["technicians"]["upsert"][0]["authorisations"][0]["privileges"].append("rii")
    before = stage.table("compliance")
    push(stage, message, "r-forged")
    [alarm] = stage.alarms()
    assert alarm["alarm"] == "registry_update_refused"
    assert stage.replies("registry/reply/")[-1]["ok"] is False
    if forge != "replayed":
        assert stage.table("compliance") == before
        stage.commit([by_new_technician(stage)])
        assert stage.dlq()[-1]["errors"][0]["rule"] == "technician_unknown"


def test_registry_files_reload_without_restart(tmp_path, monkeypatch):
    import shutil

    from shared.compliance.settings import DEFAULT_REGISTRIES

    registries = tmp_path / "registries"
    shutil.copytree(DEFAULT_REGISTRIES, registries)
    stage = Harness(tmp_path, monkeypatch, registries)
    tool = "CDI-2503MRMH-00417"

    def with_tool(data):
        data["tool"]["serial_number"] = tool

    stage.commit([stage.item("torque_event", "torque_wrench", "TQW-07", edit=with_tool)])
    assert stage.dlq() == []
    path = registries / "tools.toml"
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    path.write_text(path.read_text().replace(
        f'serial_number = "{tool}"\ndescription = "CDI 2503MRMH click wrench 50-250 lbf.in"\n'
        'calibrated_on = 2026-03-02\ncalibration_due = 2099-12-31',
        f'serial_number = "{tool}"\ndescription = "CDI 2503MRMH click wrench 50-250 lbf.in"\n'
        f'calibrated_on = 2026-03-02\ncalibration_due = {yesterday}'))
    stage.commit([stage.item("torque_event", "torque_wrench", "TQW-07", edit=with_tool)])
    assert [e["rule"] for e in stage.dlq()[-1]["errors"]] == ["tool_calibration_expired"]
    path.write_text("[[tool]\n")  # broken: refused, the previous registry stays, an alarm says so
    stage.commit([stage.item("torque_event", "torque_wrench", "TQW-07")])
    assert len(stage.dlq()) == 1
    assert stage.alarms()[0]["alarm"] == "registry_refused"


# --- schema versions and the drift breaker -------------------------------------------------------

@pytest.fixture
def history(stage):
    """A signed ledger of 400 recent accepted records (some maintenance actions lack hours)."""
    bodies = synthetic_bodies(400, seed=11)
    write_ledger(stage.data, bodies)
    return bodies


def test_staging_runs_a_dry_run_and_drift_opens_the_breaker(stage, history):
    reply = stage.schema("stage", definition=DRIFT)
    report = reply["dry_run"]["report"]
    missing = sum(1 for b in history if b["type"] == "maintenance_action" and "aircraft_hours" not in b)
    assert (report["sample"], report["failed"]) == (400, missing) and missing > 8
    assert report["by_rule"] == {"schema_required": missing}
    assert reply["state"]["breaker"] == "open" and reply["state"]["staged"] == "mro.record/2"
    assert stage.alarms()[0]["alarm"] == "schema_drift"


def test_drift_holds_non_critical_writes_while_sign_offs_flow_then_rollback_clears(stage, history):
    stage.schema("stage", definition=DRIFT)
    torque = stage.item("torque_event", "torque_wrench", "TQW-07")
    receipt = stage.item("part_receipt", "barcode_scanner", "BCS-03")

    def no_hours(data):
        data.update(return_to_service=True, action="REPLACE")
        data.pop("aircraft_hours", None)
        data.pop("aircraft_cycles", None)
        data["technician"] = {"cert_no": "3512874", "cert_kind": "FAA-AP"}
        sign_record(data)

    sign_off = stage.item("maintenance_action", edit=no_hours)
    stage.commit([torque, receipt, sign_off])
    forwarded = [d["event_id"] for d in stage.forwarded()]
    assert forwarded == [sign_off.event_id]  # judged on the active mro.record/1
    assert stage.dlq() == []
    assert {s for e, s in stage.states() if e == torque.event_id} == {"HELD"}
    assert len(stage.table("held")) == 2

    refused = stage.schema("activate")
    assert refused["ok"] is False and "refused" in refused["message"]
    assert refused["state"]["breaker"] == "open"

    # a re-send of a held record is neither forwarded nor rejected
    stage.commit([FateQuery(torque.key, torque.event_id, torque.device)])
    assert len(stage.forwarded()) == 1

    reply = stage.schema("rollback", reason="devices not ready for hours on every action")
    assert reply["ok"] and reply["released"] == 2
    assert reply["state"]["breaker"] == "closed" and reply["state"]["staged"] is None
    bodies = stage.forwarded()
    assert {b["event_id"] for b in bodies} >= {torque.event_id, receipt.event_id}
    [change] = [b for b in bodies if b["type"] == "schema_change"]
    assert change["action"] == "rollback" and change["withdrawn"] == "mro.record/2"
    assert change["dry_run"]["failed"] > 0 and change["reason"].startswith("devices")
    assert change["definition"] == DRIFT
    assert stage.table("held") == []


def test_override_activates_logged_and_the_new_version_is_enforced(stage, history):
    stage.schema("stage", definition=DRIFT)
    held = stage.item("torque_event", "torque_wrench", "TQW-07")
    stage.commit([held])
    assert stage.schema("activate", override=True)["ok"] is False  # no reason given
    reply = stage.schema("activate", override=True, reason="CAMO accepts: tablets updated tonight")
    assert reply["ok"] and reply["state"]["active"] == "mro.record/2" and reply["released"] == 1
    changes = [d for d in stage.forwarded() if d["type"] == "schema_change"]
    assert [c["action"] for c in changes] == ["override"]
    assert changes[0]["reason"].startswith("CAMO") and changes[0]["previous"] == "mro.record/1"

    def no_hours(data):
        data["return_to_service"] = False
        data["technician"] = {"cert_no": "3512874", "cert_kind": "FAA-AP"}
        data.pop("aircraft_hours", None)
        data.pop("aircraft_cycles", None)
        data["technician"].pop("signature", None)

    stage.commit([stage.item("maintenance_action", edit=no_hours)])
    assert stage.dlq()[-1]["errors"] == [{"path": "$.aircraft_hours", "rule": "schema_required",
                                          "expected": "present (required since mro.record/2)", "received": None}]
    stage.restart()  # the active version is persisted
    assert stage.schema("status")["state"]["active"] == "mro.record/2"
    reply = stage.schema("rollback")
    assert reply["ok"] and reply["state"]["active"] == "mro.record/1"
    actions = [d["action"] for d in stage.forwarded() if d["type"] == "schema_change"]
    assert actions == ["override", "rollback"]


def test_activation_within_tolerance(stage, history):
    reply = stage.schema("stage", definition=GENTLE)
    assert reply["dry_run"]["within_tolerance"] and reply["state"]["breaker"] == "closed"
    reply = stage.schema("activate")
    assert reply["ok"] and reply["state"]["active"] == "mro.record/2"
    [change] = [d for d in stage.forwarded() if d["type"] == "schema_change"]
    assert change["action"] == "activate" and change["dry_run"]["sample"] == 400
    assert change["definition_sha256"] and change["event_id"]


@pytest.mark.parametrize(("command", "fields", "message"), [
    ("activate", {}, "nothing is staged"),
    ("rollback", {}, "nothing to roll back"),
    ("dry-run", {}, "nothing is staged"),
    ("stage", {"definition": {"version": "mro.record/2", "title": "x"}}, "no rule"),
    ("launch", {}, "unknown command"),
])
def test_bad_commands_are_answered_not_crashed(stage, command, fields, message):
    reply = stage.schema(command, **fields)
    assert reply["ok"] is False and message in reply["message"]


def test_stale_commands_are_refused(stage):
    payload = json.dumps({"command": "status", "id": "old", "sent_at": "2020-01-01T00:00:00Z"}).encode()
    stage.commit(notices=[(stage.topics.schema, payload)])
    assert "more than 300 s ago" in stage.replies()[-1]["message"]


def test_status_is_published(stage):
    extra = stage.runtime.stage.status_extra()
    clock = extra.pop("clock")
    assert extra == {"contract": "mro.record/1", "breaker": "closed", "held": 0,
                     "registry": stage.runtime.stage.control.compliance.registry.digest[:12]}
    assert isinstance(clock["synchronised"], bool) and clock["source"]
