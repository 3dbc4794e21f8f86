"""Compliance rules (`shared.compliance.rules`): each rule passes and fails at its boundary,
judged on the UTC day of occurred_at (2024-05-20 here), never "now"."""

from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime, timedelta

import pytest

from mro_edge.simulator.records import sign_record, valid_record
from shared.compliance import Compliance, MemoryState, Registry
from shared.compliance.esign import signing_input, simulator_seed
from shared.compliance.registry import merge, read_file_entries
from shared.compliance.rules import RELEASE_KINDS, release_kinds
from shared.compliance.settings import DEFAULT_REGISTRIES
from shared.contract import decode_record, normalize
from shared.ledger.keys import SigningKey

STATION, KIND, DEVICE = "HGR1", "tablet", "TAB-1"
OCCURRED = datetime(2024, 5, 20, 14, 30, tzinfo=UTC)
DAY = OCCURRED.date()
FILES = read_file_entries(DEFAULT_REGISTRIES)
BASE = Registry.build(FILES)

AP = {"cert_no": "3512874", "cert_kind": "FAA-AP"}
IA = {"cert_no": "2847193", "cert_kind": "FAA-IA"}
RII = {"cert_no": "4471025", "cert_kind": "FAA-AP"}
AIRCRAFT = {"registration": "N327HA", "serial_number": "4521", "type": "A320-214"}
WRENCH = "CDI-2503MRMH-00417"


def registry(**changes) -> Registry:
    """The checked-in registry with entries replaced: technicians=[entry, ...] etc."""
    keys = {"technicians": "cert_no", "aircraft": "registration", "tools": "serial_number",
            "life_limited_parts": "part_number"}
    overlay = {name: {e[keys[name]]: e for e in entries} for name, entries in changes.items()}
    return Registry.build(merge(FILES, overlay))


def technician(cert_no="TEST-001", *, kinds=(("FAA-AP", "2010-01-01", None),), privileges=("maintain", "certify",
               "inspect", "rii"), chapters=("*",), actions=("*",), status="active", status_since=None,
               valid_from=None, valid_until=None, key=True) -> dict:
    entry = {"cert_no": cert_no, "status": status,
             "certificates": [{"kind": k, "issued": i, **({"expires": e} if e else {})} for k, i, e in kinds],
             "authorisations": [{"chapters": list(chapters), "privileges": list(privileges), "actions": list(actions),
                                 **({"valid_from": valid_from} if valid_from else {}),
                                 **({"valid_until": valid_until} if valid_until else {})}]}
    if status_since:
        entry["status_since"] = status_since
    if key:
        import base64

        entry["public_key"] = base64.b64encode(SigningKey(simulator_seed(cert_no)).public_bytes).decode()
    return entry


def record(record_type="maintenance_action", *, technician=None, inspector=None, sign=True, seed=3, **fields):
    data = valid_record(random.Random(seed), station=STATION, device_kind=KIND, device_id=DEVICE,
                        record_type=record_type, occurred_at=OCCURRED)
    data["aircraft"] = dict(AIRCRAFT)
    if technician is not None:
        data["technician"] = dict(technician)
    if record_type == "inspection":
        data.pop("inspector", None)
        if inspector is not None:
            data["inspector"] = dict(inspector)
    for name, value in fields.items():
        if value is ...:
            data.pop(name, None)
        else:
            data[name] = value
    for block in ("technician", "inspector"):
        if block in data:
            data[block].pop("signature", None)
    if sign:
        keys = {b: SigningKey(simulator_seed(data[b]["cert_no"])) for b in ("technician", "inspector") if b in data}
        sign_record(data, key=keys.get("technician"), inspector_key=keys.get("inspector"))
    return data


def rts(**fields):
    fields.setdefault("action", "REPLACE")
    return record("maintenance_action", return_to_service=True, **fields)


def decoded(data):
    return decode_record(json.dumps(data).encode(), station=STATION, device_kind=KIND, device_id=DEVICE)


def judge(data, reg: Registry = BASE, state=None):
    rec = decoded(data)
    verdict = Compliance(reg).judge(rec, normalize(rec), state if state is not None else MemoryState())
    return [(e.path, e.rule) for e in verdict.errors]


def judge_and_keep(data, state, reg: Registry = BASE):
    rec = decoded(data)
    verdict = Compliance(reg).judge(rec, normalize(rec), state)
    if not verdict.errors:
        for table, key, value in verdict.writes:
            state.put(table, key, value)
    return [(e.path, e.rule) for e in verdict.errors], verdict.flags


def shift(days: int) -> str:
    return (DAY + timedelta(days=days)).isoformat()


# --- simulator records pass ----------------------------------------------------------------------

@pytest.mark.parametrize("record_type", ["maintenance_action", "inspection", "part_removal", "part_installation",
                                         "part_receipt", "torque_event"])
def test_simulated_records_are_compliant(record_type):
    rng = random.Random(record_type)
    state = MemoryState()
    for _ in range(60):
        data = valid_record(rng, station=STATION, device_kind=KIND, device_id=DEVICE, record_type=record_type,
                            occurred_at=OCCURRED + timedelta(seconds=rng.uniform(-3600, 3600)))
        errors, _ = judge_and_keep(data, state)
        assert errors == [], data


# --- technicians ---------------------------------------------------------------------------------

def test_technician_unknown():
    assert judge(record(technician={"cert_no": "5550001", "cert_kind": "FAA-AP"}, sign=False,
                        return_to_service=False)) == [("$.technician.cert_no", "technician_unknown")]
    assert judge(record(technician=AP, return_to_service=False)) == []


@pytest.mark.parametrize(("since", "suspended"), [(shift(0), True), (shift(1), False), (shift(-400), True),
                                                  (None, True)])
def test_technician_suspended_from_the_day_on(since, suspended):
    reg = registry(technicians=[technician(status="suspended", status_since=since)])
    data = rts(technician={"cert_no": "TEST-001", "cert_kind": "FAA-AP"})
    expected = [("$.technician.cert_no", "technician_suspended")] if suspended else []
    assert judge(data, reg) == expected


def test_suspended_technician_with_a_valid_signature_is_still_refused():
    reg = registry(technicians=[technician(status="suspended")])
    assert judge(rts(technician={"cert_no": "TEST-001", "cert_kind": "FAA-AP"}), reg) == [
        ("$.technician.cert_no", "technician_suspended")]


def test_certificate_kind_must_be_held():
    assert judge(record(technician=dict(AP, cert_kind="EASA-B1"), return_to_service=False)) == [
        ("$.technician.cert_kind", "technician_cert_kind")]


@pytest.mark.parametrize(("issued", "expires", "valid"), [
    (shift(-3000), shift(0), True),  # the expiry day itself is still valid
    (shift(-3000), shift(-1), False),  # expired yesterday
    (shift(0), None, True),  # issued today
    (shift(1), None, False),  # issued tomorrow
])
def test_certificate_validity_on_the_day_of_the_work(issued, expires, valid):
    reg = registry(technicians=[technician(kinds=(("FAA-IA", issued, expires),))])
    data = record(technician={"cert_no": "TEST-001", "cert_kind": "FAA-IA"}, return_to_service=False)
    assert judge(data, reg) == ([] if valid else [("$.technician.cert_kind", "certificate_not_valid")])


def test_validity_is_judged_at_occurred_at_not_now():
    # the IA of 8802716 lapsed on 2023-03-31: work of 2023-03-31 passes, of 2023-04-01 does not
    for day, ok in ((datetime(2023, 3, 31, 23, 59, tzinfo=UTC), True), (datetime(2023, 4, 1, tzinfo=UTC), False)):
        data = valid_record(random.Random(1), station=STATION, device_kind=KIND, device_id=DEVICE,
                            record_type="torque_event", occurred_at=day)
        data["technician"] = {"cert_no": "8802716", "cert_kind": "FAA-IA"}
        assert judge(data) == ([] if ok else [("$.technician.cert_kind", "certificate_not_valid")])


@pytest.mark.parametrize(("ata", "valid_until", "ok"), [
    ("32-11-00", None, True), ("29-11-00", None, False), ("32-11-00", shift(0), True), ("32-11-00", shift(-1), False),
])
def test_ata_chapter_authorisation(ata, valid_until, ok):
    reg = registry(technicians=[technician(chapters=("12", "32"), valid_until=valid_until)])
    data = record("torque_event", technician={"cert_no": "TEST-001", "cert_kind": "FAA-AP"}, ata=ata)
    assert judge(data, reg) == ([] if ok else [("$.ata", "ata_not_authorised")])


def test_authorisation_not_yet_valid():
    reg = registry(technicians=[technician(valid_from=shift(1))])
    data = record("torque_event", technician={"cert_no": "TEST-001", "cert_kind": "FAA-AP"})
    assert judge(data, reg) == [("$.ata", "ata_not_authorised")]


@pytest.mark.parametrize(("action", "ok"), [("SERVICE", True), ("REPAIR", False)])
def test_action_authorisation(action, ok):
    reg = registry(technicians=[technician(actions=("SERVICE", "TEST"), privileges=("maintain",))])
    data = record(technician={"cert_no": "TEST-001", "cert_kind": "FAA-AP"}, action=action, return_to_service=False)
    assert judge(data, reg) == ([] if ok else [("$.action", "action_not_authorised")])


def test_return_to_service_needs_a_certifying_authorisation():
    reg = registry(technicians=[technician(privileges=("maintain",))])
    data = rts(technician={"cert_no": "TEST-001", "cert_kind": "FAA-AP"})
    assert judge(data, reg) == [("$.return_to_service", "rts_not_authorised")]
    assert judge(record(technician={"cert_no": "TEST-001", "cert_kind": "FAA-AP"}, return_to_service=False,
                        action="REPLACE"), reg) == []


@pytest.mark.parametrize(("kind", "ata", "ok"), [
    ("FAA-AP", "72-00-00", True), ("FAA-IA", "34-11-00", True),
    ("FAA-A", "32-11-00", True), ("FAA-A", "72-00-00", False), ("FAA-A", "49-10-00", False),
    ("FAA-P", "72-00-00", True), ("FAA-P", "61-10-00", True), ("FAA-P", "32-11-00", False),
    ("EASA-B1", "32-11-00", True), ("EASA-B1", "24-21-00", True), ("EASA-B1", "34-11-00", False),
    ("EASA-B2", "34-11-00", True), ("EASA-B2", "24-21-00", True), ("EASA-B2", "32-11-00", False),
    ("EASA-C", "34-11-00", True), ("EASA-C", "72-00-00", True),
    ("FAA-REPAIRMAN", "32-11-00", False), ("EASA-A", "32-11-00", False), ("EASA-B2L", "34-11-00", False),
    ("EASA-B3", "32-11-00", False),
])
def test_return_to_service_certificate_by_chapter(kind, ata, ok):
    reg = registry(technicians=[technician(kinds=((kind, "2010-01-01", None),))])
    data = rts(technician={"cert_no": "TEST-001", "cert_kind": kind}, ata=ata)
    assert judge(data, reg) == ([] if ok else [("$.technician.cert_kind", "rts_certificate")])


def test_release_table_is_total():
    assert set(RELEASE_KINDS) >= {"05", "32", "72", "91"}
    assert all({"FAA-AP", "FAA-IA", "EASA-C"} <= kinds for kinds in RELEASE_KINDS.values())
    assert release_kinds("34") == {"FAA-AP", "FAA-IA", "EASA-C", "FAA-A", "EASA-B2"}


# --- inspections and RII ---------------------------------------------------------------------------

@pytest.mark.parametrize(("inspection_type", "kind", "ok"), [
    ("ANNUAL", "FAA-IA", True), ("ANNUAL", "FAA-AP", False), ("PROGRESSIVE", "FAA-AP", False),
    ("100HR", "FAA-AP", True), ("100HR", "EASA-B1", False), ("A_CHECK", "EASA-B1", True),
    ("A_CHECK", "FAA-REPAIRMAN", False),
])
def test_inspection_certificate(inspection_type, kind, ok):
    reg = registry(technicians=[technician(kinds=((kind, "2010-01-01", None),))])
    data = record("inspection", technician={"cert_no": "TEST-001", "cert_kind": kind},
                  inspection_type=inspection_type, ata="05-20-00")
    assert judge(data, reg) == ([] if ok else [("$.technician.cert_kind", "inspection_certificate")])


def test_inspection_needs_an_inspection_authorisation():
    reg = registry(technicians=[technician(privileges=("maintain", "certify"))])
    data = record("inspection", technician={"cert_no": "TEST-001", "cert_kind": "FAA-AP"}, inspection_type="DAILY")
    assert judge(data, reg) == [("$.inspection_type", "inspection_not_authorised")]


def test_rii_needs_another_designated_inspector():
    ok = record("inspection", technician=AP, inspector=RII, inspection_type="RII")
    assert judge(ok) == []
    assert judge(record("inspection", technician=AP, inspection_type="RII")) == [
        ("$.inspector", "rii_inspector_missing")]
    assert judge(record("inspection", technician=RII, inspector=RII, inspection_type="RII")) == [
        ("$.inspector.cert_no", "rii_same_person")]
    assert judge(record("inspection", technician=RII, inspector=AP, inspection_type="RII")) == [
        ("$.inspector.cert_no", "rii_not_authorised")]


def test_rii_inspector_is_checked_like_a_technician():
    reg = registry(technicians=[technician("TEST-002", status="suspended")])
    data = record("inspection", technician=AP, inspector={"cert_no": "TEST-002", "cert_kind": "FAA-AP"},
                  inspection_type="RII")
    assert judge(data, reg) == [("$.inspector.cert_no", "technician_suspended")]
    data = record("inspection", technician=AP, inspector={"cert_no": "5550002", "cert_kind": "FAA-AP"},
                  inspection_type="RII", sign=False)
    sign_record(data, key=SigningKey(simulator_seed(AP["cert_no"])))
    assert judge(data) == [("$.inspector.cert_no", "technician_unknown")]


# --- e-signatures ----------------------------------------------------------------------------------

def test_sign_offs_must_be_signed():
    assert judge(rts(technician=AP)) == []
    assert judge(rts(technician=AP, sign=False)) == [("$.technician.signature", "signature_missing")]
    assert judge(record("inspection", technician=IA, inspection_type="ANNUAL", sign=False)) == [
        ("$.technician.signature", "signature_missing")]
    data = record("inspection", technician=AP, inspector=RII, inspection_type="RII")
    del data["inspector"]["signature"]
    assert judge(data) == [("$.inspector.signature", "signature_missing")]


def test_other_records_may_be_unsigned():
    assert judge(record("torque_event", technician=AP, sign=False)) == []
    assert judge(record(technician=AP, return_to_service=False, sign=False)) == []


def test_signature_by_a_key_not_in_the_registry():
    data = rts(technician=AP, sign=False)
    sign_record(data, key=SigningKey.generate())
    assert judge(data) == [("$.technician.signature", "signature_invalid")]


def test_signature_of_someone_else():
    data = rts(technician=AP, sign=False)
    sign_record(data, key=SigningKey(simulator_seed(RII["cert_no"])))
    assert judge(data) == [("$.technician.signature", "signature_invalid")]


@pytest.mark.parametrize("edit", [
    lambda d: d.update(description=d["description"] + " (amended)"),
    lambda d: d.update(return_to_service=False),
    lambda d: d["aircraft"].update(registration="D-AIZQ", serial_number="5287"),
    lambda d: d.update(work_order_id="WO-2024-999999"),
    lambda d: d.update(notes="added later"),
], ids=["description", "rts", "aircraft", "work_order", "notes"])
def test_signature_over_an_altered_record(edit):
    data = rts(technician=AP)
    edit(data)
    assert ("$.technician.signature", "signature_invalid") in judge(data)


def test_signature_ignores_event_id_so_a_copy_stays_valid():
    data = rts(technician=AP)
    data["event_id"] = "0b6e4c1a-8d2f-4e5b-9c7a-1f2e3d4c5b6a"
    assert judge(data) == []


@pytest.mark.parametrize("signature", ["not base64!", "c2lnbmVk", "A" * 120])
def test_malformed_signature(signature):
    data = rts(technician=AP, sign=False)
    data["technician"]["signature"] = signature
    assert judge(data) == [("$.technician.signature", "signature_malformed")]


def test_technician_without_a_registered_key():
    reg = registry(technicians=[technician(key=False)])
    data = rts(technician={"cert_no": "TEST-001", "cert_kind": "FAA-AP"})
    assert judge(data, reg) == [("$.technician.signature", "signature_key_unknown")]


def test_inspector_signature_over_the_same_content():
    data = record("inspection", technician=AP, inspector=RII, inspection_type="RII")
    body = normalize(decoded(data))
    assert b'"signature"' not in signing_input(body)
    data["inspector"]["signature"] = data["technician"]["signature"]  # swapped: wrong key
    assert judge(data) == [("$.inspector.signature", "signature_invalid")]


# --- aircraft --------------------------------------------------------------------------------------

def test_aircraft_identity():
    base = record("torque_event", technician=AP, sign=False)
    assert judge(base) == []
    for path, value, rule in (("registration", "N999ZZ", "aircraft_unknown"),
                              ("serial_number", "4522", "aircraft_serial_mismatch"),
                              ("type", "A321-211", "aircraft_type_mismatch")):
        data = json.loads(json.dumps(base))
        data["aircraft"][path] = value
        assert judge(data) == [(f"$.aircraft.{path}", rule)]
    data = json.loads(json.dumps(base))
    del data["aircraft"]["type"]
    assert judge(data) == []


@pytest.mark.parametrize(("expires", "ok"), [(shift(0), True), (shift(-1), False), (None, True)])
def test_registration_expiry(expires, ok):
    entry = dict(AIRCRAFT, **({"registration_expires": expires} if expires else {}))
    reg = registry(aircraft=[entry])
    data = record("torque_event", technician=AP, sign=False)
    assert judge(data, reg) == ([] if ok else [("$.aircraft.registration", "registration_expired")])


@pytest.mark.parametrize(("expires", "ok"), [(shift(0), True), (shift(-1), False)])
def test_airworthiness_review_blocks_only_return_to_service(expires, ok):
    reg = registry(aircraft=[dict(AIRCRAFT, airworthiness_review_expires=expires)])
    assert judge(rts(technician=AP), reg) == ([] if ok else [("$.aircraft", "airworthiness_review_expired")])
    assert judge(record(technician=AP, return_to_service=False), reg) == []
    assert judge(record("inspection", technician=IA, inspection_type="ANNUAL"), reg) == []


# --- tools -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("due", "ok"), [(shift(0), True), (shift(-1), False), (shift(300), True)])
def test_tool_calibration_from_the_registry(due, ok):
    reg = registry(tools=[{"serial_number": WRENCH, "calibration_due": due}])
    data = record("torque_event", technician=AP, sign=False)
    data["tool"] = {"serial_number": WRENCH, "calibration_due": shift(30)}  # the wrench's own claim
    assert judge(data, reg) == ([] if ok else [("$.tool.serial_number", "tool_calibration_expired")])


def test_tool_unknown():
    data = record("torque_event", technician=AP, sign=False)
    data["tool"]["serial_number"] = "CDI-2503MRMH-99999"
    assert judge(data) == [("$.tool.serial_number", "tool_unknown")]


# --- parts -----------------------------------------------------------------------------------------

def part_event(record_type, serial="SN-77001", *, part_number="2-1589-1", aircraft=AIRCRAFT, minutes=0, **part):
    data = record(record_type, technician=AP, sign=False)
    data["occurred_at"] = (OCCURRED + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
    data["aircraft"] = dict(aircraft)
    data["part"].update(serial_number=serial, part_number=part_number, **part)
    if record_type == "part_installation":
        data["part"]["condition"] = "SERVICEABLE"
    return data


OTHER = {"registration": "D-AIZQ", "serial_number": "5287", "type": "A320-214"}


def test_a_serial_cannot_be_installed_twice():
    state = MemoryState()
    assert judge_and_keep(part_event("part_installation"), state)[0] == []
    assert judge_and_keep(part_event("part_installation", aircraft=OTHER, minutes=5), state)[0] == [
        ("$.part.serial_number", "part_already_installed")]
    assert judge_and_keep(part_event("part_installation", minutes=6), state)[0] == [
        ("$.part.serial_number", "part_already_installed")]
    assert judge_and_keep(part_event("part_removal", minutes=10), state)[0] == []
    assert judge_and_keep(part_event("part_installation", aircraft=OTHER, minutes=20), state)[0] == []


def test_removing_a_part_that_is_not_installed():
    state = MemoryState()
    errors, flags = judge_and_keep(part_event("part_removal"), state)
    assert (errors, flags) == ([], ["part_removal_unknown"])  # never seen here: it may predate the box
    assert judge_and_keep(part_event("part_removal", minutes=5), state)[0] == [
        ("$.part.serial_number", "part_not_installed")]
    assert judge_and_keep(part_event("part_installation", "SN-77002", minutes=1), state)[0] == []
    assert judge_and_keep(part_event("part_removal", "SN-77002", aircraft=OTHER, minutes=2), state)[0] == [
        ("$.part.serial_number", "part_not_installed")]
    assert judge_and_keep(part_event("part_removal", "SN-77002", minutes=3), state)[0] == []


def test_an_older_part_event_arriving_late_does_not_rewrite_history():
    state = MemoryState()
    assert judge_and_keep(part_event("part_installation", minutes=10), state)[0] == []
    assert judge_and_keep(part_event("part_installation", aircraft=OTHER, minutes=-60), state)[0] == []
    assert judge_and_keep(part_event("part_installation", aircraft=OTHER, minutes=11), state)[0] == [
        ("$.part.serial_number", "part_already_installed")]


def test_rejected_records_change_no_state():
    state = MemoryState()
    bad = part_event("part_installation", part_number="D23189000-7", csn=20_000)
    assert judge_and_keep(bad, state)[0] == [("$.part.csn", "part_life_limit_exceeded")]
    assert state.tables == {}


@pytest.mark.parametrize(("csn", "ok"), [(19_999, True), (20_000, False), (25_000, False), (0, True)])
def test_life_limit_in_cycles(csn, ok):
    data = part_event("part_installation", part_number="D23189000-7", csn=csn)
    assert judge(data) == ([] if ok else [("$.part.csn", "part_life_limit_exceeded")])


@pytest.mark.parametrize(("tsn", "ok"), [(59_999.9, True), (60_000, False)])
def test_life_limit_in_hours(tsn, ok):
    data = part_event("part_installation", part_number="3214552-3", csn=100, tsn_hours=tsn)
    assert judge(data) == ([] if ok else [("$.part.tsn_hours", "part_life_limit_exceeded")])


def test_life_limited_part_needs_its_counts():
    data = part_event("part_installation", part_number="3214552-3", csn=100, tsn_hours=10)
    del data["part"]["csn"]
    assert judge(data) == [("$.part.csn", "part_life_unknown")]
    data = part_event("part_receipt", part_number="3214552-3", csn=30_000, tsn_hours=10, condition="SERVICEABLE")
    assert judge(data) == [("$.part.csn", "part_life_limit_exceeded")]
    data = part_event("part_receipt", part_number="3214552-3", csn=30_000, tsn_hours=10, condition="SCRAP")
    assert judge(data) == []  # a timed-out part received as scrap is just that
    data = part_event("part_removal", part_number="3214552-3", csn=30_000, tsn_hours=10)
    assert judge(data) == []  # removing it is what should happen


# --- hours and cycles ------------------------------------------------------------------------------

def times(minutes, hours=None, cycles=None):
    data = record(technician=AP, return_to_service=False, sign=False)
    data["occurred_at"] = (OCCURRED + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
    data.pop("aircraft_hours", None)
    data.pop("aircraft_cycles", None)
    if hours is not None:
        data["aircraft_hours"] = hours
    if cycles is not None:
        data["aircraft_cycles"] = cycles
    return data


def test_hours_and_cycles_never_decrease():
    state = MemoryState()
    assert judge_and_keep(times(0, 1000.5, 700), state)[0] == []
    assert judge_and_keep(times(10, 1000.5, 700), state)[0] == []  # equal is fine
    assert judge_and_keep(times(20, 1000.4, 701), state)[0] == [("$.aircraft_hours", "aircraft_hours_decreased")]
    assert judge_and_keep(times(20, 1001, 699), state)[0] == [("$.aircraft_cycles", "aircraft_cycles_decreased")]
    assert judge_and_keep(times(30, 1002), state)[0] == []
    assert judge_and_keep(times(40, cycles=702), state)[0] == []


def test_readings_arriving_out_of_order_are_judged_by_time():
    state = MemoryState()
    assert judge_and_keep(times(60, 1010, 710), state)[0] == []
    assert judge_and_keep(times(30, 1005, 705), state)[0] == []  # earlier and lower: consistent
    assert judge_and_keep(times(45, 1011, 707), state)[0] == [("$.aircraft_hours", "aircraft_hours_decreased")]
    assert judge_and_keep(times(45, 1004, 707), state)[0] == [("$.aircraft_hours", "aircraft_hours_decreased")]
    assert judge_and_keep(times(45, 1007, 707), state)[0] == []


def test_hours_are_kept_per_airframe():
    state = MemoryState()
    assert judge_and_keep(times(0, 5000), state)[0] == []
    other = times(10, 100)
    other["aircraft"] = dict(OTHER)
    assert judge_and_keep(other, state)[0] == []


def test_dates_are_the_utc_day_of_occurred_at():
    reg = registry(tools=[{"serial_number": WRENCH, "calibration_due": "2024-05-20"}])
    data = record("torque_event", technician=AP, sign=False)
    data["tool"] = {"serial_number": WRENCH, "calibration_due": "2024-05-21"}
    data["occurred_at"] = "2024-05-20T23:59:59Z"
    assert judge(data, reg) == []
    data["occurred_at"] = "2024-05-21T00:00:00Z"
    assert judge(data, reg) == [("$.tool.serial_number", "tool_calibration_expired")]


def test_registry_dates_used_as_given():
    assert BASE.tools[WRENCH].calibration_due == date(2099, 12, 31)
