"""Realistic hangar records, one broken record per contract rule, and one per compliance rule.

Used by the simulator (what devices send), the tests (every valid record must pass, every bad
one must fail exactly where it says) and the benchmarks. All randomness comes from the `rng`
argument, so a seed reproduces a run, event ids included.

People, aircraft and tools come from the registries (`mro_edge.simulator.fleet`): a valid
record names a technician authorised for the work on that day, an aircraft whose hours and
cycles grow with time, a calibrated wrench, and every sign-off (return to service, inspection,
RII) carries the technicians' e-signatures, made with the simulator fleet's TEST keys.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from mro_edge.simulator.fleet import Fleet, airframe_times, fleet
from shared.compliance.esign import sign_body
from shared.contract import RECORD_TYPES, decode_record, normalize
from shared.ledger.keys import SigningKey
from shared.runtime.clock import utc_text

__all__ = ["RECORD_TYPES", "BadCase", "bad_cases", "sign_record", "valid_record"]

_PART_TYPES = ("part_removal", "part_installation", "part_receipt")
_TYPES_BY_KIND: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "torque_wrench": (("torque_event",), (1,)),
    "rfid_reader": (_PART_TYPES, (4, 4, 2)),
    "barcode_scanner": (_PART_TYPES, (3, 3, 4)),
    "tablet": (RECORD_TYPES, (5, 4, 1, 1, 1, 1)),
}
_FAMILIES = {"A320-214": "A320", "A321-211": "A320", "A319-112": "A320", "B737-800": "B737", "B737-8": "B737",
             "ATR72-600": "ATR72"}
_INSPECTION_TYPES = (
    "DAILY",
    "WEEKLY",
    "A_CHECK",
    "C_CHECK",
    "RII",
    "ANNUAL",
    "100HR",
    "PROGRESSIVE",
    "PROGRAM",
)
_SIGN_OPTIONAL_SHARE = 0.3  # records that need no signature but carry one anyway

_ATA = {
    "torque": ("32-41-11", "32-42-27", "32-11-00", "71-11-00", "72-00-00", "61-10-00", "29-11-00",
                     "36-11-00", "54-50-00", "57-40-00", "27-51-00"),
    "part": ("32-41-11", "32-42-27", "24-21-00", "36-11-12", "21-51-00", "34-11-15", "28-21-00", "49-10-00",
             "73-21-00", "31-30-00", "23-11-00", "30-31-00"),
    "work": ("05-51-00", "12-13-00", "20-10-00", "25-21-00", "32-41-00", "52-11-00", "33-42-00", "35-10-00",
             "05-20-00", "38-11-00", "26-15-00", "21-26-00"),
}

_CAGES = ("81205", "73030", "F6059", "C0419", "K0654", "S9099", "99193", "0B9R9", "59364", "F0093", "D8275",
          "U1605")
# (part number, typical position)
_PARTS = (
    ("2-1589-1", "LH MLG OUTBD"),
    ("C20224000", "RH MLG INBD"),
    ("D23189000-7", "NLG"),
    ("3214552-3", "ENG 1"),
    ("066-50008-0101", "AVIONICS BAY"),
    ("HG2030AE01", "AVIONICS BAY"),
    ("822-1468-002", "FLIGHT DECK"),
    ("1152682-2", "ENG 2"),
    ("761302A", "APU"),
    ("C24720000-3", "FWD CARGO"),
)
_TORQUE_SPECS = (  # fastener, min N·m, max N·m
    ("MS21042L4", 9.0, 11.3),
    ("NAS1352-4H12", 5.1, 5.6),
    ("BACB30LH4-12", 13.6, 15.8),
    ("MS9557-08", 28.0, 32.0),
    ("NAS6204-12", 36.7, 40.7),
    ("AN960C416", 2.3, 2.8),
    ("D23133000", 120.0, 150.0),
    ("NAS1954C3", 17.0, 19.2),
)
_DESCRIPTIONS = {
    "INSPECT": "Inspected {ata} area for leaks and chafing, no defects found.",
    "REPAIR": "Repaired chafed harness at {ata}, sleeved and re-secured IAW SWPM 20-10-00.",
    "REPLACE": "Replaced unit at {ata} after fault isolation, operational test satisfactory.",
    "ADJUST": "Adjusted rigging at {ata} to limits, function checked.",
    "SERVICE": "Serviced system at {ata}, quantity checked and topped up.",
    "TEST": "Performed operational test of {ata} system, results within limits.",
    "MODIFY": "Embodied service bulletin modification at {ata}, recorded in modification status.",
    "DEFER": "Defect at {ata} deferred IAW MEL, placard installed, rectification interval noted.",
}
_FINDINGS = (
    "Minor corrosion on lower skin panel, within limits, treated.",
    "Tyre worn to limit on #2 main wheel.",
    "Loose P-clamp on hydraulic line, re-secured.",
    "Cabin emergency light inoperative, bulb replaced.",
    "Brake wear pin flush on #3 brake, replacement scheduled.",
    "Small dent on leading edge slat, assessed per SRM, acceptable.",
)
_NOTES = (
    "Work carried out during night stop, aircraft on jacks.",
    "Parts taken from stores batch; old unit tagged unserviceable.",
    "Second technician present for independent inspection.",
    "Customer requested photo evidence, attached to work package.",
)


class BadCase(NamedTuple):
    """A payload that must be rejected: by `decode_record` (stage "ingest"), or by `check_rules`
    or the compliance rules (stage "validate"), with an error at `expected_path` under
    `expected_rule`."""

    name: str
    payload: bytes
    expected_path: str
    expected_rule: str
    stage: str


def valid_record(rng: random.Random, *, station: str, device_kind: str, device_id: str,
                 record_type: str | None = None, occurred_at: datetime | None = None) -> dict:
    """A record as a device would send it: JSON-ready, quantities as JSON numbers.

    `record_type` None picks one that suits the device kind. `occurred_at` (timezone-aware)
    defaults to a few seconds ago; validity of people, aircraft and tools is chosen for its day.
    """
    if record_type is None:
        types, weights = _TYPES_BY_KIND[device_kind]
        record_type = rng.choices(types, weights)[0]
    if occurred_at is None:
        occurred_at = datetime.now(UTC) - timedelta(seconds=rng.uniform(0.0, 5.0))
    if occurred_at.tzinfo is None:
        raise ValueError("occurred_at must be timezone-aware")
    ships = fleet()
    day = occurred_at.astimezone(UTC).date()
    aircraft = rng.choice(ships.aircraft(day))
    family = _FAMILIES.get(aircraft.type, aircraft.type.split("-")[0])
    group = "part" if record_type in _PART_TYPES else ("torque" if record_type == "torque_event" else "work")
    ata = rng.choice(_ATA[group])
    record: dict[str, Any] = {
        "schema": "mro.record/1",
        "type": record_type,
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "occurred_at": utc_text(occurred_at),
        "station": station,
        "device": {"kind": device_kind, "id": device_id},
        "work_order_id": _work_order(rng, occurred_at.year),
        "aircraft": {"registration": aircraft.registration, "serial_number": aircraft.serial_number,
                     "type": aircraft.type},
        "ata": ata,
    }
    if rng.random() < 0.3:
        record["notes"] = rng.choice(_NOTES)
    sign_off = _BODIES[record_type](rng, ships, record, family, ata, occurred_at)
    if sign_off or rng.random() < _SIGN_OPTIONAL_SHARE:
        sign_record(record, ships)
    return record


def sign_record(record: dict, ships: Fleet | None = None, *, key: SigningKey | None = None,
                inspector_key: SigningKey | None = None) -> dict:
    """Sign `record` in place as its technician (and inspector) would: over the normalized body
    without event_id and signatures (`shared.compliance.esign`). Keys default to the simulator
    fleet's test keys; a person without one is left unsigned."""
    ships = ships or fleet()
    for block in ("technician", "inspector"):
        if block in record:
            record[block].pop("signature", None)
    kind, device_id = record["device"]["kind"], record["device"]["id"]
    body = normalize(decode_record(json.dumps(record).encode(), station=record["station"], device_kind=kind,
                                   device_id=device_id))
    for block, explicit in (("technician", key), ("inspector", inspector_key)):
        if block not in record:
            continue
        signer = explicit or ships.keys.get(record[block]["cert_no"])
        if signer is not None:
            record[block]["signature"] = sign_body(body, signer)
    return record


def bad_cases(rng: random.Random, *, station: str, device_kind: str, device_id: str,
              received_at: datetime) -> list[BadCase]:
    """One rejected record per contract rule (several for rules with several fields), and one per
    compliance rule that needs no history (the stateful ones need a record before them).

    Assumes the default limits (64 KiB, depth 16, 300 s skew, 30 days backdate) and the
    registries in config/registries; time cases keep a wide margin (a day ahead, 31 days back)
    so they stay bad while a simulator holds them in a pool.
    """
    def fresh(record_type: str | None = None, occurred: datetime | None = None) -> dict:
        if occurred is None:
            occurred = received_at - timedelta(seconds=rng.uniform(1.0, 5.0))
        return valid_record(rng, station=station, device_kind=device_kind, device_id=device_id,
                            record_type=record_type, occurred_at=occurred)

    def at(name: str, rule: str, occurred: datetime) -> BadCase:
        """A record whose work time breaks a time rule, its calibration date consistent with it."""
        return BadCase(name, _dumps(fresh(occurred=occurred)), "$.occurred_at", rule, "validate")

    def edited(name: str, path: str, rule: str, value: Any, record_type: str | None = None,
               stage: str = "ingest") -> BadCase:
        record = fresh(record_type)
        _set(record, path, value)
        return BadCase(name, _dumps(record), path, rule, stage)

    unsent = fresh()
    unsent.pop("notes", None)
    twice = fresh()  # the same key twice, even with the same value, is refused
    utc = received_at.astimezone(UTC)
    cases = [
        BadCase("not_json", _dumps(fresh())[:-1], "$", "json", "ingest"),
        BadCase("not_utf8", _dumps(unsent)[:-1] + b', "notes": "Stamp \xff\xfe"}', "$", "utf8", "ingest"),
        BadCase("oversize", _dumps(fresh())[:-1] + b" " * 65536 + b"}", "$", "max_size", "ingest"),
        BadCase("not_an_object", _dumps([fresh()]), "$", "type", "ingest"),
        BadCase("duplicate_key", _dumps(twice)[:-1] + b', "work_order_id": ' + _dumps(twice["work_order_id"]) + b"}",
                "$.work_order_id", "duplicate_key", "ingest"),
        *(edited(*case) for case in _FIELD_CASES),
        edited("occurred_at_offset", "$.occurred_at", "format", f"{utc:%Y-%m-%dT%H:%M:%S}+00:00"),
        edited("occurred_at_date_only", "$.occurred_at", "format", f"{utc:%Y-%m-%d}"),
        edited("station_mismatch", "$.station", "topic_mismatch", _other(station, "OTHER", "ELSEWHERE")),
        edited("device_kind_mismatch", "$.device.kind", "topic_mismatch",
               _other(device_kind, "tablet", "rfid_reader")),
        edited("device_id_mismatch", "$.device.id", "topic_mismatch",
               _other(device_id, "someone-else", "another")),
        at("occurred_in_future", "occurred_in_future", utc + timedelta(days=1)),
        at("occurred_too_old", "occurred_too_old", utc - timedelta(days=31)),
    ]
    record = fresh("torque_event")
    record["torque_min_nm"] = record["torque_max_nm"] + 1
    _resign(record)
    cases.append(BadCase("torque_min_above_max", _dumps(record), "$.torque_max_nm", "torque_range",
                         "validate"))
    record = fresh("torque_event")
    record["torque_nm"], record["result"] = record["torque_min_nm"], "NOK"
    _resign(record)
    cases.append(BadCase("torque_inside_but_nok", _dumps(record), "$.result", "torque_result", "validate"))
    record = fresh("torque_event")
    record["torque_nm"], record["result"] = round(record["torque_max_nm"] * 1.2, 1), "OK"
    _resign(record)
    cases.append(BadCase("torque_outside_but_ok", _dumps(record), "$.result", "torque_result", "validate"))
    record = fresh("torque_event")
    overdue = datetime.fromisoformat(record["occurred_at"]).date() - timedelta(days=1)
    record["tool"]["calibration_due"] = overdue.isoformat()
    _resign(record)
    cases.append(BadCase("calibration_overdue", _dumps(record), "$.tool.calibration_due",
                         "calibration_overdue", "validate"))
    cases.extend(compliance_cases(fresh))
    return cases


def _resign(record: dict) -> dict:
    """After an edit: signatures follow the content again (sign-offs and already-signed records)."""
    signed = "signature" in record["technician"]
    sign_off = (record["type"] == "inspection"
                or (record["type"] == "maintenance_action" and record["return_to_service"]))
    if signed or sign_off:
        sign_record(record)
    return record


def _unsigned(record: dict) -> dict:
    for block in ("technician", "inspector"):
        if block in record:
            record[block].pop("signature", None)
    return record


def _rts(fresh, *, ata: str | None = None) -> dict:
    """A signed return-to-service maintenance action (a sign-off)."""
    record = fresh("maintenance_action")
    if ata is not None:
        record["ata"] = ata
    record["action"] = "REPLACE"
    record["return_to_service"] = True
    return record


def _inspection_of(fresh, inspection_type: str, technician: dict, inspector: dict | None = None) -> dict:
    record = fresh("inspection")
    record["inspection_type"] = inspection_type
    record["technician"] = dict(technician)
    record.pop("inspector", None)
    if inspector is not None:
        record["inspector"] = dict(inspector)
    return sign_record(record)


# People of config/registries/technicians.toml with a particular standing.
_AP = {"cert_no": "3512874", "cert_kind": "FAA-AP"}  # A&P, certifies and inspects, no RII
_IA = {"cert_no": "2847193", "cert_kind": "FAA-IA"}  # A&P + IA, RII designated
_RII = {"cert_no": "4471025", "cert_kind": "FAA-AP"}  # A&P, RII designated
_AIRFRAME_ONLY = {"cert_no": "5903318", "cert_kind": "FAA-A"}
_REPAIRMAN = {"cert_no": "7734521", "cert_kind": "FAA-REPAIRMAN"}  # SERVICE/INSPECT/TEST/ADJUST only
_SUSPENDED = {"cert_no": "1198305", "cert_kind": "FAA-AP"}
_LAPSED_IA = {"cert_no": "8802716", "cert_kind": "FAA-IA"}  # IA expired 2023-03-31
_TWO_CHAPTERS = {"cert_no": "DE66-009934", "cert_kind": "EASA-B1"}  # chapters 12 and 32 only
_PAPER_ONLY = {"cert_no": "9043377", "cert_kind": "FAA-AP"}  # no e-signature key
_NOT_CERTIFYING = {"cert_no": "4418820", "cert_kind": "FAA-AP"}  # maintain only
_UNKNOWN = {"cert_no": "5550001", "cert_kind": "FAA-AP"}
_STORED = {"registration": "N771CD", "serial_number": "1811", "type": "A320-214"}  # review lapsed 2023
_DEREGISTERED = {"registration": "N418GX", "serial_number": "2043", "type": "A319-112"}  # expired 2023
_OVERDUE_WRENCH = "NORBAR-EVO-1000-00077"  # registry calibration due 2023-09-30
_LLP = "D23189000-7"  # life limit 20,000 cycles


def compliance_cases(fresh) -> list[BadCase]:
    """One record per compliance rule that needs no earlier record; each breaks only that rule."""
    cases: list[BadCase] = []

    def case(name: str, record: dict, path: str, rule: str) -> None:
        cases.append(BadCase(name, _dumps(record), path, rule, "validate"))

    def by(person: dict, record_type: str = "torque_event", **fields) -> dict:
        record = _unsigned(fresh(record_type))
        record["technician"] = dict(person)
        record.update(fields)
        return record

    case("technician_unknown", by(_UNKNOWN), "$.technician.cert_no", "technician_unknown")
    case("technician_suspended", by(_SUSPENDED), "$.technician.cert_no", "technician_suspended")
    case("technician_cert_kind", by(dict(_AP, cert_kind="EASA-B1")), "$.technician.cert_kind",
         "technician_cert_kind")
    case("certificate_not_valid", by(_LAPSED_IA), "$.technician.cert_kind", "certificate_not_valid")
    case("ata_not_authorised", by(_TWO_CHAPTERS, ata="29-11-00"), "$.ata", "ata_not_authorised")
    record = by(_REPAIRMAN, "maintenance_action", action="REPAIR", return_to_service=False)
    case("action_not_authorised", record, "$.action", "action_not_authorised")

    record = _rts(fresh)
    record["technician"] = dict(_NOT_CERTIFYING)
    case("rts_not_authorised", sign_record(record), "$.return_to_service", "rts_not_authorised")
    record = _rts(fresh, ata="72-00-00")
    record["technician"] = dict(_AIRFRAME_ONLY)
    case("rts_certificate", sign_record(record), "$.technician.cert_kind", "rts_certificate")
    record = _rts(fresh)
    record["technician"] = dict(_AP)
    record["aircraft"] = dict(_STORED)
    case("airworthiness_review_expired", sign_record(record), "$.aircraft", "airworthiness_review_expired")

    case("inspection_not_authorised", _inspection_of(fresh, "DAILY", _NOT_CERTIFYING), "$.inspection_type",
         "inspection_not_authorised")
    case("annual_needs_ia", _inspection_of(fresh, "ANNUAL", _AP), "$.technician.cert_kind",
         "inspection_certificate")
    case("rii_inspector_missing", _inspection_of(fresh, "RII", _AP), "$.inspector", "rii_inspector_missing")
    case("rii_same_person", _inspection_of(fresh, "RII", _IA, _IA), "$.inspector.cert_no", "rii_same_person")
    case("rii_not_authorised", _inspection_of(fresh, "RII", _RII, _AP), "$.inspector.cert_no",
         "rii_not_authorised")

    record = _unsigned(_rts(fresh))
    record["technician"] = dict(_AP)
    case("signature_missing", record, "$.technician.signature", "signature_missing")
    record = _unsigned(_rts(fresh))
    record["technician"] = dict(_AP, signature=base64.b64encode(b"signed by J. Doe").decode())
    case("signature_malformed", record, "$.technician.signature", "signature_malformed")
    record = _rts(fresh)
    record["technician"] = dict(_PAPER_ONLY)
    sign_record(record, key=SigningKey(bytes(range(32))))
    case("signature_key_unknown", record, "$.technician.signature", "signature_key_unknown")
    record = _rts(fresh)
    record["technician"] = dict(_AP)
    sign_record(record, key=SigningKey(bytes(range(1, 33))))
    case("signature_by_unregistered_key", record, "$.technician.signature", "signature_invalid")
    record = _rts(fresh)
    record["technician"] = dict(_AP)
    sign_record(record)
    record["description"] = record["description"].replace(".", ", see attached.", 1)
    case("signature_over_altered_record", record, "$.technician.signature", "signature_invalid")

    record = _unsigned(fresh("torque_event"))
    record["aircraft"] = {"registration": "N999ZZ", "serial_number": "9999", "type": "A320-214"}
    case("aircraft_unknown", record, "$.aircraft.registration", "aircraft_unknown")
    record = _unsigned(fresh("torque_event"))
    record["aircraft"]["serial_number"] = "99999"
    case("aircraft_serial_mismatch", record, "$.aircraft.serial_number", "aircraft_serial_mismatch")
    record = _unsigned(fresh("torque_event"))
    record["aircraft"]["type"] = "B777-300ER" if record["aircraft"]["type"] != "B777-300ER" else "A350-941"
    case("aircraft_type_mismatch", record, "$.aircraft.type", "aircraft_type_mismatch")
    record = _unsigned(fresh("torque_event"))
    record["aircraft"] = dict(_DEREGISTERED)
    case("registration_expired", record, "$.aircraft.registration", "registration_expired")

    record = _unsigned(fresh("torque_event"))
    record["tool"]["serial_number"] = "CDI-2503MRMH-99999"
    case("tool_unknown", record, "$.tool.serial_number", "tool_unknown")
    record = _unsigned(fresh("torque_event"))
    record["tool"]["serial_number"] = _OVERDUE_WRENCH  # its own memory still shows a future due date
    case("tool_calibration_expired", record, "$.tool.serial_number", "tool_calibration_expired")

    record = _unsigned(fresh("part_installation"))
    record["part"].update(part_number=_LLP, csn=20_000)
    record["part"].pop("tsn_hours", None)
    case("part_life_limit_exceeded", record, "$.part.csn", "part_life_limit_exceeded")
    record = _unsigned(fresh("part_installation"))
    record["part"]["part_number"] = _LLP
    record["part"].pop("csn", None)
    case("part_life_unknown", record, "$.part.csn", "part_life_unknown")
    return cases


def _other(value: str, choice: str, fallback: str) -> str:
    return choice if value != choice else fallback


_REMOVE = object()
_TOO_DEEP: list = []
for _ in range(20):
    _TOO_DEEP = [_TOO_DEEP]

_ACTION, _INSPECTION, _TORQUE = "maintenance_action", "inspection", "torque_event"
# name, JSONPath of the field, rule, the value put there (_REMOVE deletes it), record type (None: any)
_FIELD_CASES: tuple[tuple[str, str, str, Any, str | None], ...] = (
    ("too_deep", "$", "max_depth", {"notes": _TOO_DEEP}, None),
    ("schema_version", "$.schema", "schema_version", "mro.record/2", None),
    ("unknown_record_type", "$.type", "enum", "engine_run", None),
    ("unknown_field", "$.surprise", "unknown_field", True, None),
    ("unknown_nested_field", "$.aircraft.colour", "unknown_field", "white", None),
    ("missing_technician", "$.technician", "required", _REMOVE, None),
    ("missing_event_id", "$.event_id", "required", _REMOVE, None),
    ("missing_torque", "$.torque_nm", "required", _REMOVE, _TORQUE),
    ("quantity_as_string", "$.torque_nm", "type", "24.5", _TORQUE),
    ("count_as_bool", "$.tightening_id", "type", True, _TORQUE),
    ("count_as_fraction", "$.aircraft_cycles", "type", 1234.5, _ACTION),
    ("bool_as_string", "$.return_to_service", "type", "yes", _ACTION),
    ("findings_not_a_list", "$.findings", "type", "none", _INSPECTION),
    ("event_id_format", "$.event_id", "format", "not-a-uuid", None),
    ("calibration_due_format", "$.tool.calibration_due", "format", "2024-13-01", _TORQUE),
    ("work_order_pattern", "$.work_order_id", "pattern", "wo 17", None),
    ("aircraft_serial_pattern", "$.aircraft.serial_number", "pattern", "msn 5123", None),
    ("aircraft_type_pattern", "$.aircraft.type", "pattern", "a320 neo", None),
    ("part_number_pattern", "$.part.part_number", "pattern", "d23189000 7", "part_installation"),
    ("part_serial_pattern", "$.part.serial_number", "pattern", "sn-0042", "part_removal"),
    ("cage_pattern", "$.part.cage", "pattern", "IO123", "part_receipt"),
    ("cert_no_pattern", "$.technician.cert_no", "pattern", "AB", None),
    ("fastener_ref_pattern", "$.fastener_ref", "pattern", "nas 1352", _TORQUE),
    ("tool_serial_pattern", "$.tool.serial_number", "pattern", "", _TORQUE),
    ("cert_kind_enum", "$.technician.cert_kind", "enum", "FAA-X", None),
    ("action_enum", "$.action", "enum", "FIX", _ACTION),
    ("inspection_type_enum", "$.inspection_type", "enum", "MONTHLY", _INSPECTION),
    ("condition_enum", "$.part.condition", "enum", "USED", "part_installation"),
    ("removal_reason_enum", "$.removal_reason", "enum", "BORED", "part_removal"),
    ("result_enum", "$.result", "enum", "MAYBE", _TORQUE),
    ("notes_too_long", "$.notes", "max_length", "n" * 2001, None),
    ("notes_bidi_override", "$.notes", "text_control_char", "Torque checked \u202eKO\u202c", None),
    ("description_zero_width", "$.description", "text_control_char", "Replaced\u200b seal", _ACTION),
    ("finding_ansi_escape", "$.findings[0]", "text_control_char", ["\x1b[2JLoose clamp."], _INSPECTION),
    ("notes_nul", "$.notes", "text_control_char", "Stamp\x00ed", None),
    ("description_too_long", "$.description", "max_length", "d" * 2001, _ACTION),
    ("description_empty", "$.description", "min_length", "", _ACTION),
    ("data_reference_too_long", "$.data_reference", "max_length", "A320 AMM " + "1" * 112, _ACTION),
    ("too_many_findings", "$.findings", "max_length", ["Loose clamp."] * 51, _INSPECTION),
    ("finding_too_long", "$.findings[0]", "max_length", ["f" * 501], _INSPECTION),
    ("negative_torque", "$.torque_nm", "minimum", -1.5, _TORQUE),
    ("negative_cycles", "$.aircraft_cycles", "minimum", -1, _ACTION),
    ("hours_too_large", "$.aircraft_hours", "maximum", 1e7, _ACTION),
    ("quantity_too_precise", "$.angle_deg", "precision", 1e-30, _TORQUE),
    ("ata_chapter_unknown", "$.ata", "ata_chapter", "99-10", None),
    ("ata_chapter_malformed", "$.ata", "ata_chapter", "32-4", None),
    ("registration_leading_zero", "$.aircraft.registration", "registration", "N0123", None),
    ("registration_letter_o", "$.aircraft.registration", "registration", "N123O", None),
    ("registration_short_uk", "$.aircraft.registration", "registration", "G-ABC", None),
)


def _set(record: dict, path: str, value: Any) -> None:
    """Set (or with _REMOVE delete) the field at a simple JSONPath like $.part.cage or $.findings[0];
    at "$" the value is a dict of top-level fields to set."""
    if path == "$":
        record.update(value)
        return
    *parents, leaf = path.removeprefix("$.").split(".")
    target = record
    for name in parents:
        target = target[name]
    if leaf.endswith("[0]"):
        leaf = leaf[:-3]
    if value is _REMOVE:
        del target[leaf]
    else:
        target[leaf] = value


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _work_order(rng: random.Random, year: int) -> str:
    if rng.random() < 0.7:
        return f"WO-{year}-{rng.randint(1, 999999):06d}"
    return f"TLB/{rng.randint(100000, 999999)}/{rng.randint(1, 9)}"



def _person(
    rng: random.Random,
    ships: Fleet,
    role: str,
    chapter: str,
    day,
    *,
    signing: bool,
    exclude: str = "",
    **criteria,
) -> dict | None:
    people = [p for p in ships.people(role, chapter, day, signing=signing, **criteria) if p[0] != exclude]
    if not people:
        return None
    cert_no, kind = rng.choice(people)
    return {"cert_no": cert_no, "cert_kind": kind}


def _maintenance_action(rng: random.Random, ships: Fleet, record: dict, family: str, ata: str,
                        occurred: datetime) -> bool:
    action = rng.choices(tuple(_DESCRIPTIONS), (5, 3, 4, 2, 3, 3, 1, 1))[0]
    record["action"] = action
    record["description"] = _DESCRIPTIONS[action].format(ata=ata)
    task = f"{rng.choice(('000', '200', '400'))}-{rng.randint(801, 899)}"
    record["data_reference"] = f"{family} AMM {ata}-{task}"
    release = action != "DEFER" and rng.random() < 0.9
    record["return_to_service"] = release
    day = occurred.astimezone(UTC).date()
    record["technician"] = _person(rng, ships, "certify" if release else "maintain", ata[:2], day,
                                   signing=release, action=action)
    if rng.random() < 0.7:
        aircraft = ships.registry.aircraft[record["aircraft"]["registration"]]
        record["aircraft_hours"], record["aircraft_cycles"] = airframe_times(aircraft, occurred)
    return release


def _inspection(
    rng: random.Random, ships: Fleet, record: dict, family: str, ata: str, occurred: datetime
) -> bool:
    inspection_type = rng.choice(_INSPECTION_TYPES)
    record["inspection_type"] = inspection_type
    record["findings"] = rng.sample(_FINDINGS, rng.choice((0, 0, 1, 2, 3)))
    record["airworthy"] = not record["findings"] or rng.random() < 0.7
    day, chapter = occurred.astimezone(UTC).date(), ata[:2]
    if inspection_type == "RII":
        record["technician"] = _person(rng, ships, "maintain", chapter, day, signing=True)
        record["inspector"] = _person(rng, ships, "rii", chapter, day, signing=True,
                                      exclude=record["technician"]["cert_no"], inspection_type="RII")
    else:
        record["technician"] = _person(rng, ships, "inspect", chapter, day, signing=True,
                                       inspection_type=inspection_type)
        if rng.random() < 0.4:
            second = _person(rng, ships, "inspect", chapter, day, signing=True,
                             exclude=record["technician"]["cert_no"], inspection_type=inspection_type)
            if second is not None:  # an ANNUAL may have only one IA on site
                record["inspector"] = second
    return True


def _part_record(
    rng: random.Random, ships: Fleet, record: dict, family: str, ata: str, occurred: datetime
) -> bool:
    part_number, position = rng.choice(_PARTS)
    part: dict[str, Any] = {
        "cage": rng.choice(_CAGES),
        "part_number": part_number,
        # wide enough that two random serials never meet (the box checks installations per serial)
        "serial_number": f"{rng.choice(('', 'SN', 'B', 'G', 'RR'))}{rng.randint(10_000, 999_999_999_999)}",
        "condition": "UNSERVICEABLE" if record["type"] == "part_removal" and rng.random() < 0.6
        else rng.choice(("NEW", "SERVICEABLE", "OVERHAULED", "REPAIRED", "INSPECTED", "MODIFIED")),
    }
    if record["type"] != "part_removal" and rng.random() < 0.8:
        part["release_certificate"] = (f"EASA-F1-{occurred.year}-{rng.randint(1, 99999):05d}"
                                       if rng.random() < 0.5 else f"8130-3-{rng.randint(1, 999999):06d}")
    limits = ships.registry.life_limited_parts.get(part_number)
    if limits is not None and record["type"] != "part_removal":
        # life-limited: back-to-birth times always travel with the part, and life is left
        if limits.limit_hours is not None:
            part["tsn_hours"] = round(rng.uniform(0.0, limits.limit_hours * 0.95), 1)
        part["csn"] = rng.randint(0, (limits.limit_cycles or 30_000) - 1)
    elif rng.random() < 0.6:
        part["tsn_hours"] = round(rng.uniform(0.0, 40_000.0), 1)
        part["csn"] = rng.randint(0, 30_000)
    record["part"] = part
    if record["type"] != "part_receipt":
        record["position"] = position
    if record["type"] == "part_removal":
        record["removal_reason"] = rng.choices(("SCHEDULED", "UNSCHEDULED", "ROBBERY", "MODIFICATION"),
                                               (5, 4, 1, 1))[0]
    record["technician"] = _person(rng, ships, "maintain", ata[:2], occurred.astimezone(UTC).date(),
                                   signing=False)
    return False


def _torque_event(
    rng: random.Random, ships: Fleet, record: dict, family: str, ata: str, occurred: datetime
) -> bool:
    fastener, low, high = rng.choice(_TORQUE_SPECS)
    if rng.random() < 0.9:
        torque = min(max(round(rng.uniform(low, high), 1), low), high)
    else:
        torque = round(high * rng.uniform(1.03, 1.15), 1) if rng.random() < 0.5 else round(low * 0.9, 1)
    day = occurred.astimezone(UTC).date()
    tool = rng.choice(ships.tools(day))
    record["tool"] = {
        "serial_number": tool.serial_number,
        "calibration_due": tool.calibration_due.isoformat(),
    }
    record["fastener_ref"] = fastener
    record["torque_nm"] = torque
    record["torque_min_nm"] = low
    record["torque_max_nm"] = high
    record["result"] = "OK" if low <= torque <= high else "NOK"
    record["tightening_id"] = rng.randint(1, 500_000)
    if rng.random() < 0.1:
        record["angle_deg"] = rng.choice((30, 60, 90, 120.5))
    record["technician"] = _person(rng, ships, "maintain", ata[:2], day, signing=False)
    return False


_BODIES = {
    "maintenance_action": _maintenance_action,
    "inspection": _inspection,
    "part_removal": _part_record,
    "part_installation": _part_record,
    "part_receipt": _part_record,
    "torque_event": _torque_event,
}
