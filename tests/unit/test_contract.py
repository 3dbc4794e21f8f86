"""Device contract v1, decode side: every rule `decode_record` enforces, at its boundary."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest

import shared.contract
from mro_edge.simulator.records import valid_record
from shared.contract import (
    RECORD_TYPES,
    RULES,
    ContractError,
    FieldError,
    TorqueEvent,
    decode_record,
    normalize,
)
from shared.ledger.canonical import MAX_SAFE_INTEGER

STATION, KIND, DEVICE = "HGR1", "tablet", "tab-01"
T0 = datetime(2024, 5, 20, 14, 30, tzinfo=UTC)
UUID = "0b6e4c1a-8d2f-4e5b-9c7a-1f2e3d4c5b6a"


def record(record_type: str = "maintenance_action", seed: int = 1, **fields) -> dict:
    """A valid record of `record_type` with `fields` replaced (a value of ... removes the field)."""
    data = valid_record(random.Random(seed), station=STATION, device_kind=KIND, device_id=DEVICE,
                        record_type=record_type, occurred_at=T0)
    for name, value in fields.items():
        if value is ...:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def decode(data, **kwargs):
    payload = data if isinstance(data, bytes) else json.dumps(data, ensure_ascii=False).encode()
    return decode_record(payload, station=STATION, device_kind=KIND, device_id=DEVICE, **kwargs)


def errors(data, **kwargs) -> list[FieldError]:
    with pytest.raises(ContractError) as caught:
        decode(data, **kwargs)
    assert caught.value.errors, "a ContractError always carries errors"
    assert all(e.rule in RULES for e in caught.value.errors)
    return caught.value.errors


def only_error(data, **kwargs) -> tuple[str, str]:
    found = errors(data, **kwargs)
    assert len(found) == 1, found
    return found[0].path, found[0].rule


def with_part(record_type: str = "part_installation", **part) -> dict:
    data = record(record_type)
    data["part"] = {**data["part"], **part}
    return data


# --- size, encoding, nesting, syntax ------------------------------------------------------------------

def test_size_limit_is_inclusive():
    payload = json.dumps(record()).encode()
    padded = payload[:-1] + b" " * (1000 - len(payload)) + b"}"
    assert len(padded) == 1000
    decode(padded, max_bytes=1000)
    assert only_error(padded, max_bytes=999) == ("$", "max_size")


def test_invalid_utf8_is_its_own_rule():
    payload = json.dumps(record(notes="Prüfung"), ensure_ascii=False).encode().replace("ü".encode(), b"\xfc")
    assert only_error(payload) == ("$", "utf8")


def test_non_ascii_text_is_fine():
    decode(record(notes="Prüfung bestanden ✓ 😂 — ok"))


def test_nesting_limit_is_inclusive():
    # A record nests two levels (the record, then e.g. aircraft); a limit of 2 admits it.
    decode(record(), max_depth=2)
    assert only_error(record(), max_depth=1) == ("$", "max_depth")


def test_nesting_bomb_is_refused_before_decoding():
    at_limit = record(notes=json.loads("[" * 15 + "]" * 15))  # 16 deep in all
    assert only_error(at_limit) == ("$.notes", "type")
    too_deep = record(notes=json.loads("[" * 16 + "]" * 16))
    assert only_error(too_deep) == ("$", "max_depth")
    bomb = b'{"notes":' + b"[" * 60000 + b"]" * 60000 + b"}"
    started = time.perf_counter()
    assert only_error(bomb, max_bytes=200000) == ("$", "max_depth")
    assert time.perf_counter() - started < 0.05


def test_brackets_inside_strings_do_not_count_as_nesting():
    decode(record(notes="[[[[[[[[[[{{{{{{{{{{[[[[[[[[[[ \\\" [[[[[["))


@pytest.mark.parametrize("payload", [b"", b"{", b'{"schema": "mro.record/1",}', b"nope", b"\xef\xbb\xbf{}",
                                    b'{"a": 1} {"b": 2}', b"NaN", b'{"torque_nm": Infinity}'],
                         ids=["empty", "open", "trailing-comma", "word", "bom", "two-values", "nan",
                              "infinity"])
def test_not_json(payload):
    assert only_error(payload) == ("$", "json")


@pytest.mark.parametrize("payload", [b"[]", b'"record"', b"42", b"null", b"true"])
def test_top_level_must_be_an_object(payload):
    assert only_error(payload) == ("$", "type")


def test_json_syntax_error_names_no_content():
    error = errors(b'{"notes": "very private words", oops}')[0]
    assert "private" not in (error.received or "") + error.expected


# --- structure ----------------------------------------------------------------------------------------

REQUIRED = {
    "common": ["schema", "type", "event_id", "occurred_at", "station", "device", "work_order_id", "aircraft",
               "ata", "technician"],
    "maintenance_action": ["action", "description", "data_reference", "return_to_service"],
    "inspection": ["inspection_type", "findings", "airworthy"],
    "part_removal": ["part", "removal_reason"],
    "part_installation": ["part"],
    "part_receipt": ["part"],
    "torque_event": ["tool", "fastener_ref", "torque_nm", "torque_min_nm", "torque_max_nm", "result",
                     "tightening_id"],
}
NESTED_REQUIRED = {
    "device": ["kind", "id"],
    "aircraft": ["registration", "serial_number"],
    "technician": ["cert_no", "cert_kind"],
}


@pytest.mark.parametrize(("record_type", "field"), [(t, f) for t in RECORD_TYPES
                                                    for f in REQUIRED["common"] + REQUIRED[t]])
def test_missing_required_field_is_named(record_type, field):
    found = errors(record(record_type, **{field: ...}))
    assert ("$." + field, "required") in [(e.path, e.rule) for e in found]
    if field != "type":
        assert len(found) == 1


@pytest.mark.parametrize(("parent", "field"), [(p, f) for p, fs in NESTED_REQUIRED.items() for f in fs])
def test_missing_nested_field_is_named(parent, field):
    data = record()
    del data[parent][field]
    assert only_error(data) == (f"$.{parent}.{field}", "required")


@pytest.mark.parametrize("field", ["cage", "part_number", "serial_number", "condition"])
def test_missing_part_field(field):
    data = record("part_receipt")
    del data["part"][field]
    assert only_error(data) == (f"$.part.{field}", "required")


@pytest.mark.parametrize("field", ["serial_number", "calibration_due"])
def test_missing_tool_field(field):
    data = record("torque_event")
    del data["tool"][field]
    assert only_error(data) == (f"$.tool.{field}", "required")


OPTIONAL = {
    "maintenance_action": ["notes", "aircraft_hours", "aircraft_cycles"],
    "inspection": ["notes", "inspector"],
    "part_removal": ["notes", "position"],
    "part_installation": ["notes", "position"],
    "torque_event": ["notes", "angle_deg"],
}


@pytest.mark.parametrize(("record_type", "field"), [(t, f) for t, fs in OPTIONAL.items() for f in fs])
def test_optional_fields_may_be_absent(record_type, field):
    assert field not in normalize(decode(record(record_type, **{field: ...})))


def test_optional_fields_may_not_be_null():
    assert only_error(record(notes=None)) == ("$.notes", "type")


@pytest.mark.parametrize(("path", "value"), [
    ("$.surprise", 1),
    ("$.aircraft.colour", "white"),
    ("$.device.firmware", "1.2"),
    ("$.technician.name", "Jane Doe"),
])
def test_unknown_fields_are_named(path, value):
    data = record()
    *parents, leaf = path[2:].split(".")
    target = data
    for name in parents:
        target = target[name]
    target[leaf] = value
    assert only_error(data) == (path, "unknown_field")


def test_unknown_field_in_part_tool_and_inspector():
    data = with_part(colour="red")
    assert only_error(data) == ("$.part.colour", "unknown_field")
    data = record("torque_event")
    data["tool"]["brand"] = "CDI"
    assert only_error(data) == ("$.tool.brand", "unknown_field")
    data = record("inspection")
    data["inspector"] = {"cert_no": "IA-12345", "cert_kind": "FAA-IA", "stamp": "x"}
    assert only_error(data) == ("$.inspector.stamp", "unknown_field")


def test_a_field_of_another_record_type_is_unknown():
    assert only_error(record("maintenance_action", torque_nm=12)) == ("$.torque_nm", "unknown_field")


def test_odd_unknown_keys_get_a_quoted_path():
    found = errors(record(**{"a b": 1}))
    assert [(e.path, e.rule) for e in found] == [('$["a b"]', "unknown_field")]


@pytest.mark.parametrize("value", ["mro.record/2", "mro.record/1 ", "MRO.RECORD/1", ""])
def test_other_schema_versions_are_refused_alone(value):
    data = record(schema=value, ata="99", surprise=True)
    assert only_error(data) == ("$.schema", "schema_version")


def test_schema_of_the_wrong_type():
    assert only_error(record(schema=1)) == ("$.schema", "type")


@pytest.mark.parametrize(("value", "rule"), [("engine_run", "enum"), ("Inspection", "enum"), (3, "type")])
def test_unknown_record_type_still_reports_common_fields(value, rule):
    found = errors(record(type=value, ata="99"))
    assert [(e.path, e.rule) for e in found] == [("$.type", rule), ("$.ata", "ata_chapter")]


def test_every_record_type_decodes_to_its_class():
    for record_type in RECORD_TYPES:
        decoded = decode(record(record_type))
        assert decoded.type == record_type
        assert type(decoded).__struct_config__.tag == record_type


@pytest.mark.parametrize(("field", "value"), [
    ("return_to_service", "yes"), ("return_to_service", 1), ("description", 5), ("data_reference", ["x"]),
    ("aircraft", "N123AB"), ("technician", []), ("work_order_id", 123), ("aircraft_cycles", "12"),
    ("aircraft_cycles", 1.0), ("aircraft_cycles", True), ("aircraft_hours", "12.5"), ("aircraft_hours", True),
    ("aircraft_hours", None), ("action", 1), ("event_id", 1), ("occurred_at", 1716215400),
])
def test_wrong_json_types(field, value):
    assert only_error(record(**{field: value})) == (f"$.{field}", "type")


def test_error_count_is_capped():
    found = errors(record("inspection", findings=[""] * 300))
    assert len(found) == 100
    assert (found[0].path, found[0].rule) == ("$.findings", "max_length")
    assert (found[1].path, found[1].rule) == ("$.findings[0]", "min_length")


def test_all_errors_are_reported_at_once():
    data = record("torque_event", work_order_id="wo", ata="19", torque_nm="12", result="maybe", surprise=1)
    del data["technician"]
    data["aircraft"]["registration"] = "N0"
    found = {(e.path, e.rule) for e in errors(data)}
    assert found == {("$.work_order_id", "pattern"), ("$.ata", "ata_chapter"), ("$.torque_nm", "type"),
                     ("$.result", "enum"), ("$.surprise", "unknown_field"), ("$.technician", "required"),
                     ("$.aircraft.registration", "registration")}


# --- identifiers and formats --------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "ok"), [
    ("WO1", True), ("W1", False), ("A" * 30, True), ("A" * 31, False), ("WO-2024/17", True), ("wo-1", False),
    ("-WO1", False), ("/WO1", False), ("WO 1", False), ("WO1\n", False), ("ＷＯ１", False),
])
def test_work_order_id(value, ok):
    _check(record(work_order_id=value), "$.work_order_id", "pattern", ok)


@pytest.mark.parametrize(("value", "ok"), [
    ("5", True), ("A" * 20, True), ("A" * 21, False), ("MSN-5123", True), ("msn5123", False), ("-5", False),
    ("51/23", False), ("5123 ", False),
])
def test_aircraft_serial_number(value, ok):
    data = record()
    data["aircraft"]["serial_number"] = value
    _check(data, "$.aircraft.serial_number", "pattern", ok)


@pytest.mark.parametrize(("value", "ok"), [("A320-214", True), ("B737-8", True), ("a320", False),
                                           ("A" * 21, False)])
def test_aircraft_type(value, ok):
    data = record()
    data["aircraft"]["type"] = value
    _check(data, "$.aircraft.type", "pattern", ok)


PART_IDENT_CASES = [("A", True), ("A" * 32, True), ("A" * 33, False), ("D23189000-7", True),
                    ("066-50008.0101/A", True), ("d2318", False), (".5", False), ("A B", False), ("", False)]


@pytest.mark.parametrize(("field", "value", "ok"), [(f, v, ok) for f in ("part_number", "serial_number")
                                                    for v, ok in PART_IDENT_CASES])
def test_part_identifiers(field, value, ok):
    _check(with_part(**{field: value}), f"$.part.{field}", "pattern", ok)


@pytest.mark.parametrize(("value", "ok"), PART_IDENT_CASES)
def test_fastener_ref_and_tool_serial(value, ok):
    _check(record("torque_event", fastener_ref=value), "$.fastener_ref", "pattern", ok)
    data = record("torque_event")
    data["tool"]["serial_number"] = value
    _check(data, "$.tool.serial_number", "pattern", ok)


@pytest.mark.parametrize(("value", "ok"), [
    ("81205", True), ("0B9R9", True), ("F6059", True), ("I1234", False), ("O1234", False), ("8120", False),
    ("812055", False), ("f6059", False),
])
def test_cage_code(value, ok):
    _check(with_part(cage=value), "$.part.cage", "pattern", ok)


@pytest.mark.parametrize(("value", "ok"), [("EASA-F1-2024-00001", True), ("8130-3/12.5", True),
                                           ("A" * 40, True), ("A" * 41, False), ("form 1", False)])
def test_release_certificate(value, ok):
    _check(with_part(release_certificate=value), "$.part.release_certificate", "pattern", ok)


@pytest.mark.parametrize(("value", "ok"), [
    ("ABCD", True), ("ABC", False), ("A" * 20, True), ("A" * 21, False), ("3456789", True),
    ("DE66-000123", True), ("-ABC", False), ("de66-1", False), ("DE.66.1234", False),
])
def test_cert_no(value, ok):
    data = record()
    data["technician"]["cert_no"] = value
    _check(data, "$.technician.cert_no", "pattern", ok)


@pytest.mark.parametrize(("value", "ok"), [
    (UUID, True), (UUID.upper(), True), (UUID.replace("-", ""), False), ("{" + UUID + "}", False),
    (UUID[:-1], False), (UUID + "0", False), ("urn:uuid:" + UUID, False), (UUID + "\n", False),
])
def test_event_id_is_a_uuid(value, ok):
    _check(record(event_id=value), "$.event_id", "format", ok)


@pytest.mark.parametrize(("value", "ok"), [
    ("2024-05-20T14:30:00Z", True), ("2024-05-20T14:30:00.1Z", True), ("2024-05-20T14:30:00.123456Z", True),
    ("2024-05-20T14:30:00.1234567Z", False), ("2024-05-20T14:30:00+00:00", False),
    ("2024-05-20T14:30:00z", False),
    ("2024-05-20t14:30:00Z", False), ("2024-05-20 14:30:00Z", False), ("2024-05-20T14:30Z", False),
    ("2024-05-20T14:30:00", False), ("2024-02-30T14:30:00Z", False), ("2024-05-20T24:00:00Z", False),
    ("2016-12-31T23:59:60Z", False), ("2024-05-20", False), ("20240520T143000Z", False),
])
def test_occurred_at_is_rfc3339_utc_with_z(value, ok):
    _check(record(occurred_at=value), "$.occurred_at", "format", ok)


@pytest.mark.parametrize(("value", "ok"), [
    ("2024-02-29", True), ("2023-02-29", False), ("20240101", False), ("2024-1-01", False),
    ("2024-05-20T00:00:00Z", False), ("2024-W21-1", False),
])
def test_calibration_due_is_a_date(value, ok):
    data = record("torque_event")
    data["tool"]["calibration_due"] = value
    _check(data, "$.tool.calibration_due", "format", ok)


ATA_LISTED = ["05", "06", "07", "08", "09", "10", "11", "12", "18", *map(str, range(20, 39)), "41", "42",
              "44", "45", "46", "47", *map(str, range(49, 58)), *map(str, range(60, 68)),
              *map(str, range(70, 86)), "91"]


@pytest.mark.parametrize("chapter", [f"{n:02d}" for n in range(100)])
def test_ata_chapter_list(chapter):
    _check(record(ata=chapter), "$.ata", "ata_chapter", chapter in ATA_LISTED)


@pytest.mark.parametrize(("value", "ok"), [
    ("32-41", True), ("32-41-11", True), ("32-4", False), ("32-41-1", False), ("32-41-11-01", False),
    ("3241", False), ("32 41", False), ("32-", False), ("", False), ("32-41\n", False),
])
def test_ata_code_shape(value, ok):
    _check(record(ata=value), "$.ata", "ata_chapter", ok)


@pytest.mark.parametrize("value", [
    "N1", "N12345", "N123AB", "N1234Z", "N12AB", "N1A", "N9999", "G-EZAB", "F-HBXA", "D-AIZA", "D-1234",
    "C-FABC", "C-GXYZ", "VH-VXA", "JA8089", "JA01KZ", "B-1234", "B-18901", "B-HNA", "HL7701", "RA-89001",
    "EI-DVM", "9V-SKA", "A6-EDA", "I-ADJQ", "RP-C1234", "4X-EKA", "PH-BXA",
])
def test_registrations_accepted(value):
    data = record()
    data["aircraft"]["registration"] = value
    decode(data)


@pytest.mark.parametrize("value", [
    "N", "N0123", "N123456", "N1234AB", "N12ABC", "NA123", "N123IO", "N12I", "N1O", "n123ab", "N-123",
    "G-ABC", "G-ABCDE", "G-AB1C", "D-ABC", "F-ABC", "C-ABCD", "C-FAB", "VH-AB", "VH-ABCD", "JA123",
    "JA12345", "B-123", "HL123", "RA-1234", "RA-ABCDE", "EI_DVM", "EIDVM-", "-ABC", "N123AB ", "N123AB\n",
    "ABC-DEFGHI",
])
def test_registrations_refused(value):
    data = record()
    data["aircraft"]["registration"] = value
    assert only_error(data) == ("$.aircraft.registration", "registration")


# --- enums --------------------------------------------------------------------------------------------

ENUMS = {
    ("maintenance_action", "action"): ["INSPECT", "REPAIR", "REPLACE", "ADJUST", "SERVICE", "TEST", "MODIFY",
                                       "DEFER"],
    ("inspection", "inspection_type"): ["ANNUAL", "100HR", "PROGRESSIVE", "PROGRAM", "DAILY", "WEEKLY",
                                        "A_CHECK", "C_CHECK", "RII"],
    ("part_removal", "removal_reason"): ["SCHEDULED", "UNSCHEDULED", "ROBBERY", "MODIFICATION"],
}
CERT_KINDS = ["FAA-A", "FAA-P", "FAA-AP", "FAA-IA", "FAA-REPAIRMAN", "EASA-A", "EASA-B1", "EASA-B2",
              "EASA-B2L", "EASA-B3", "EASA-C"]
CONDITIONS = ["NEW", "SERVICEABLE", "OVERHAULED", "REPAIRED", "INSPECTED", "MODIFIED", "UNSERVICEABLE",
              "SCRAP"]


@pytest.mark.parametrize(("record_type", "field", "value"),
                         [(t, f, v) for (t, f), vs in ENUMS.items() for v in vs])
def test_enum_values_accepted(record_type, field, value):
    decode(record(record_type, **{field: value}))


@pytest.mark.parametrize(("record_type", "field"), list(ENUMS))
def test_enum_values_refused(record_type, field):
    wrong = ENUMS[(record_type, field)][0].lower()
    assert only_error(record(record_type, **{field: wrong})) == (f"$.{field}", "enum")


@pytest.mark.parametrize("value", CERT_KINDS)
def test_cert_kinds(value):
    data = record("inspection")
    data["technician"]["cert_kind"] = value
    data["inspector"] = {"cert_no": "IA-12345", "cert_kind": value}
    decode(data)
    data["inspector"]["cert_kind"] = value + "X"
    assert only_error(data) == ("$.inspector.cert_kind", "enum")


@pytest.mark.parametrize("value", CONDITIONS)
def test_part_conditions(value):
    decode(with_part(condition=value))
    assert only_error(with_part(condition=value.title())) == ("$.part.condition", "enum")


def test_torque_result_enum():
    for value in ("OK", "NOK"):
        decode(record("torque_event", result=value))
    assert only_error(record("torque_event", result="ok")) == ("$.result", "enum")


# --- lengths ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("record_type", "field", "low", "high"), [
    ("maintenance_action", "notes", 0, 2000),
    ("maintenance_action", "description", 1, 2000),
    ("maintenance_action", "data_reference", 1, 120),
    ("part_removal", "position", 1, 40),
])
def test_text_length_limits(record_type, field, low, high):
    decode(record(record_type, **{field: "é" * high}))  # characters, not bytes
    decode(record(record_type, **{field: "x" * low}))
    assert only_error(record(record_type, **{field: "x" * (high + 1)})) == (f"$.{field}", "max_length")
    if low:
        assert only_error(record(record_type, **{field: ""})) == (f"$.{field}", "min_length")


def test_findings_limits():
    decode(record("inspection", findings=[]))
    decode(record("inspection", findings=["f" * 500] * 50))
    assert only_error(record("inspection", findings=["f"] * 51)) == ("$.findings", "max_length")
    assert only_error(record("inspection", findings=["ok", "f" * 501])) == ("$.findings[1]", "max_length")
    assert only_error(record("inspection", findings=[""])) == ("$.findings[0]", "min_length")
    assert only_error(record("inspection", findings=["ok", 3])) == ("$.findings[1]", "type")


def test_signature_length():
    data = record()
    data["technician"]["signature"] = "s" * 1024
    decode(data)
    data["technician"]["signature"] = "s" * 1025
    assert only_error(data) == ("$.technician.signature", "max_length")


# --- quantities and counts ----------------------------------------------------------------------------

def _torque_payload(value_text: str) -> bytes:
    """A torque event whose angle_deg is written exactly as `value_text` in the JSON."""
    text = json.dumps(record("torque_event", angle_deg=7777.5))
    assert text.count("7777.5") == 1
    return text.replace("7777.5", value_text).encode()


@pytest.mark.parametrize(("text", "stored"), [
    ("0", "0"), ("0.0", "0"), ("-0", "0"), ("-0.0", "0"), ("12.50", "12.5"), ("12.5", "12.5"), ("1e2", "100"),
    ("1E+2", "100"), ("100", "100"), ("0.1", "0.1"), ("1000000", "1000000"), ("1000000.000", "1000000"),
    ("123456.78901234567890123", "123456.78901234567890123"), ("0.30000000000000004", "0.30000000000000004"),
    ("1.00000000000000000001", "1.00000000000000000001"), ("2.5e-3", "0.0025"),
    ("5e-20", "0.00000000000000000005"),
])
def test_quantities_are_exact_and_canonical(text, stored):
    assert normalize(decode(_torque_payload(text)))["angle_deg"] == stored


@pytest.mark.parametrize(("text", "rule"), [
    ("-0.0001", "minimum"), ("-1", "minimum"), ("1000000.0000001", "maximum"), ("1e7", "maximum"),
    ("1e999999999", "maximum"), ("1e-21", "precision"), ("1.000000000000000000001", "precision"),
    ("\"12.5\"", "type"), ("true", "type"), ("null", "type"), ("[1]", "type"), ("{}", "type"),
])
def test_quantity_bounds(text, rule):
    assert only_error(_torque_payload(text)) == ("$.angle_deg", rule)


def test_quantities_never_pass_through_float():
    decoded = decode(_torque_payload("0.10000000000000000555"))  # float() would make this 0.1
    assert isinstance(decoded, TorqueEvent)
    assert decoded.angle_deg == Decimal("0.10000000000000000555")


@pytest.mark.parametrize(("value", "rule"), [(0, None), (MAX_SAFE_INTEGER, None), (-1, "minimum"),
                                             (MAX_SAFE_INTEGER + 1, "maximum"), (10**40, "maximum")])
def test_count_bounds(value, rule):
    _check(record("torque_event", tightening_id=value), "$.tightening_id", rule, rule is None)


@pytest.mark.parametrize("field", ["aircraft_cycles"])
def test_counts_refuse_fractions_even_when_integral(field):
    payload = json.dumps(record(**{field: 777777})).replace("777777", "12.0").encode()
    assert only_error(payload) == (f"$.{field}", "type")


def test_part_quantities_and_counts():
    decode(with_part(tsn_hours=0, csn=0))
    assert only_error(with_part(tsn_hours=-0.5)) == ("$.part.tsn_hours", "minimum")
    assert only_error(with_part(csn=-1)) == ("$.part.csn", "minimum")
    assert only_error(with_part(csn="3")) == ("$.part.csn", "type")


# --- topic --------------------------------------------------------------------------------------------

def test_station_must_equal_the_topic():
    assert only_error(record(station="HGR2")) == ("$.station", "topic_mismatch")


def test_device_must_equal_the_topic():
    data = record()
    data["device"]["kind"] = "torque_wrench"
    assert only_error(data) == ("$.device.kind", "topic_mismatch")
    data = record()
    data["device"]["id"] = "tab-02"
    assert only_error(data) == ("$.device.id", "topic_mismatch")


def test_topic_mismatch_is_reported_with_other_errors():
    data = record(station="HGR2", ata="99")
    found = {(e.path, e.rule) for e in errors(data)}
    assert found == {("$.station", "topic_mismatch"), ("$.ata", "ata_chapter")}


def test_invalid_device_kind_is_an_enum_error_not_a_mismatch():
    data = record()
    data["device"]["kind"] = "phone"
    assert only_error(data) == ("$.device.kind", "enum")


# --- what a rejection says ----------------------------------------------------------------------------

def test_event_id_is_reported_when_readable():
    with pytest.raises(ContractError) as caught:
        decode(record(event_id=UUID, ata="99"))
    assert caught.value.event_id == UUID
    with pytest.raises(ContractError) as caught:
        decode(record(event_id=UUID, station="elsewhere"))
    assert caught.value.event_id == UUID


@pytest.mark.parametrize("data", [record(event_id="nope"), record(event_id=...), b"{", b"[1]"],
                         ids=["malformed", "missing", "not-json", "not-object"])
def test_event_id_is_none_when_unreadable(data):
    with pytest.raises(ContractError) as caught:
        decode(data)
    assert caught.value.event_id is None


def test_received_values_are_short_and_quoted():
    data = record()
    data["aircraft"]["serial_number"] = "x" * 500
    error = errors(data)[0]
    assert len(error.received) <= 80
    assert error.received.startswith('"xxx')
    assert errors(record(aircraft_hours="12.5"))[0].received == '"12.5"'
    assert errors(record(aircraft_hours=True))[0].received == "true"
    assert errors(record(technician=[1, 2]))[0].received == "array of 2 item(s)"


@pytest.mark.parametrize(("field", "value"), [
    ("notes", "n" * 2001), ("description", "d" * 2001), ("data_reference", "r" * 121), ("description", ""),
])
def test_free_text_is_redacted(field, value):
    assert errors(record(**{field: value}))[0].received == f"<redacted: {len(value)} chars>"


def test_free_text_of_the_wrong_type_shows_only_its_type():
    assert errors(record(description=5))[0].received == "5"
    assert errors(record(description=["secret"]))[0].received == "array of 1 item(s)"


def test_unknown_field_values_are_redacted():
    error = errors(record(secret="Jane Doe, 555-0100"))[0]
    assert error.received == "<redacted: 18 chars>"


def test_contract_error_message_lists_paths():
    with pytest.raises(ContractError, match=r"\$\.ata \(ata_chapter\)"):
        decode(record(ata="99"))


def test_rule_ids_are_documented():
    for rule in RULES:
        assert f"\n{rule} " in shared.contract.__doc__


def test_decoded_records_are_immutable():
    decoded = decode(record())
    with pytest.raises(AttributeError):
        decoded.ata = "32"
    assert msgspec.structs.replace(decoded, ata="32").ata == "32"


def _check(data, path: str, rule: str | None, ok: bool) -> None:
    if ok:
        decode(data)
    else:
        assert only_error(data) == (path, rule)
