"""Realistic hangar records, and one broken record per contract rule.

Used by the simulator (what devices send), the tests (every valid record must pass, every bad
one must fail exactly where it says) and the benchmarks. All randomness comes from the `rng`
argument, so a seed reproduces a run, event ids included.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

from shared.contract import RECORD_TYPES

__all__ = ["RECORD_TYPES", "BadCase", "bad_cases", "valid_record"]

_PART_TYPES = ("part_removal", "part_installation", "part_receipt")
_TYPES_BY_KIND: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "torque_wrench": (("torque_event",), (1,)),
    "rfid_reader": (_PART_TYPES, (4, 4, 2)),
    "barcode_scanner": (_PART_TYPES, (3, 3, 4)),
    "tablet": (RECORD_TYPES, (5, 4, 1, 1, 1, 1)),
}

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_N_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # FAA registrations never use I or O

# (model, AMM family, MSN range)
_MODELS = (
    ("A320-214", "A320", (1000, 9999)),
    ("A321-211", "A320", (1000, 9999)),
    ("A319-112", "A320", (1000, 9999)),
    ("B737-800", "B737", (28000, 42000)),
    ("B737-8", "B737", (42000, 66000)),
    ("ATR72-600", "ATR72", (1000, 1700)),
)

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
_WRENCHES = ("CDI-2503MRMH", "NORBAR-EVO-1000", "SNAPON-ATECH3F", "STAHLWILLE-730D")
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
    """A payload that must be rejected: by `decode_record` (stage "ingest") or by
    `check_rules` (stage "validate"), with an error at `expected_path` under `expected_rule`."""

    name: str
    payload: bytes
    expected_path: str
    expected_rule: str
    stage: str


def valid_record(rng: random.Random, *, station: str, device_kind: str, device_id: str,
                 record_type: str | None = None, occurred_at: datetime | None = None) -> dict:
    """A record as a device would send it: JSON-ready, quantities as JSON numbers.

    `record_type` None picks one that suits the device kind. `occurred_at` (timezone-aware)
    defaults to a few seconds ago; it anchors the tool calibration date too.
    """
    if record_type is None:
        types, weights = _TYPES_BY_KIND[device_kind]
        record_type = rng.choices(types, weights)[0]
    if occurred_at is None:
        occurred_at = datetime.now(UTC) - timedelta(seconds=rng.uniform(0.0, 5.0))
    if occurred_at.tzinfo is None:
        raise ValueError("occurred_at must be timezone-aware")
    model, family, (msn_low, msn_high) = rng.choice(_MODELS)
    group = "part" if record_type in _PART_TYPES else ("torque" if record_type == "torque_event" else "work")
    ata = rng.choice(_ATA[group])
    record: dict[str, Any] = {
        "schema": "mro.record/1",
        "type": record_type,
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "occurred_at": _rfc3339(occurred_at),
        "station": station,
        "device": {"kind": device_kind, "id": device_id},
        "work_order_id": _work_order(rng, occurred_at.year),
        "aircraft": {"registration": _registration(rng), "serial_number": str(rng.randint(msn_low, msn_high)),
                     "type": model},
        "ata": ata,
        "technician": _technician(rng),
    }
    if rng.random() < 0.3:
        record["notes"] = rng.choice(_NOTES)
    _BODIES[record_type](rng, record, family, ata, occurred_at)
    return record


def bad_cases(rng: random.Random, *, station: str, device_kind: str, device_id: str,
              received_at: datetime) -> list[BadCase]:
    """One rejected record per contract rule (several for rules with several fields).

    Assumes the default limits (64 KiB, depth 16, 300 s skew, 30 days backdate); time cases
    keep a wide margin (a day ahead, 31 days back) so they stay bad while a simulator holds
    them in a pool.
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
    utc = received_at.astimezone(UTC)
    cases = [
        BadCase("not_json", _dumps(fresh())[:-1], "$", "json", "ingest"),
        BadCase("not_utf8", _dumps(unsent)[:-1] + b', "notes": "Stamp \xff\xfe"}', "$", "utf8", "ingest"),
        BadCase("oversize", _dumps(fresh())[:-1] + b" " * 65536 + b"}", "$", "max_size", "ingest"),
        BadCase("not_an_object", _dumps([fresh()]), "$", "type", "ingest"),
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
    cases.append(BadCase("torque_min_above_max", _dumps(record), "$.torque_max_nm", "torque_range",
                         "validate"))
    record = fresh("torque_event")
    record["torque_nm"], record["result"] = record["torque_min_nm"], "NOK"
    cases.append(BadCase("torque_inside_but_nok", _dumps(record), "$.result", "torque_result", "validate"))
    record = fresh("torque_event")
    record["torque_nm"], record["result"] = round(record["torque_max_nm"] * 1.2, 1), "OK"
    cases.append(BadCase("torque_outside_but_ok", _dumps(record), "$.result", "torque_result", "validate"))
    record = fresh("torque_event")
    overdue = datetime.fromisoformat(record["occurred_at"]).date() - timedelta(days=1)
    record["tool"]["calibration_due"] = overdue.isoformat()
    cases.append(BadCase("calibration_overdue", _dumps(record), "$.tool.calibration_due",
                         "calibration_overdue", "validate"))
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


def _rfc3339(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def _pick(rng: random.Random, alphabet: str, count: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(count))


def _registration(rng: random.Random) -> str:
    style = rng.randrange(13)
    if style == 0:
        return f"N{rng.randint(1, 999)}{_pick(rng, _N_LETTERS, 2)}"
    if style == 1:
        return f"N{rng.randint(100, 9999)}{_pick(rng, _N_LETTERS, 1)}"
    if style == 2:
        return f"N{rng.randint(1, 99999)}"
    return {
        3: lambda: f"G-EZ{_pick(rng, _LETTERS, 2)}",
        4: lambda: f"D-AI{_pick(rng, _LETTERS, 2)}",
        5: lambda: f"F-H{_pick(rng, _LETTERS, 3)}",
        6: lambda: f"C-{rng.choice('FG')}{_pick(rng, _LETTERS, 3)}",
        7: lambda: f"VH-V{_pick(rng, _LETTERS, 2)}",
        8: lambda: f"JA{rng.randint(1, 99):02d}{_pick(rng, _LETTERS, 2)}",
        9: lambda: f"B-{rng.randint(1000, 9999)}",
        10: lambda: f"HL{rng.randint(7200, 8399)}",
        11: lambda: f"RA-{rng.choice((73, 89))}{rng.randint(0, 999):03d}",
        12: lambda: f"{rng.choice(('EI-D', '9V-S', 'A6-E', 'EC-M', 'PH-B'))}{_pick(rng, _LETTERS, 2)}",
    }[style]()


def _work_order(rng: random.Random, year: int) -> str:
    if rng.random() < 0.7:
        return f"WO-{year}-{rng.randint(1, 999999):06d}"
    return f"TLB/{rng.randint(100000, 999999)}/{rng.randint(1, 9)}"


def _technician(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        block = {"cert_no": str(rng.randint(1_000_000, 9_999_999_999)),
                 "cert_kind": rng.choice(("FAA-AP", "FAA-AP", "FAA-IA", "FAA-A", "FAA-P", "FAA-REPAIRMAN"))}
    else:
        country = rng.choice(("DE", "FR", "IE", "UK", "ES", "NL"))
        block = {"cert_no": f"{country}66-{rng.randint(1, 999999):06d}",
                 "cert_kind": rng.choice(("EASA-B1", "EASA-B1", "EASA-B2", "EASA-B2L", "EASA-A", "EASA-B3",
                                          "EASA-C"))}
    if rng.random() < 0.6:
        block["signature"] = base64.b64encode(rng.randbytes(64)).decode()
    return block


def _maintenance_action(rng: random.Random, record: dict, family: str, ata: str, occurred: datetime) -> None:
    action = rng.choices(tuple(_DESCRIPTIONS), (5, 3, 4, 2, 3, 3, 1, 1))[0]
    record["action"] = action
    record["description"] = _DESCRIPTIONS[action].format(ata=ata)
    task = f"{rng.choice(('000', '200', '400'))}-{rng.randint(801, 899)}"
    record["data_reference"] = f"{family} AMM {ata}-{task}"
    record["return_to_service"] = action != "DEFER" and rng.random() < 0.9
    if rng.random() < 0.7:
        record["aircraft_hours"] = round(rng.uniform(500.0, 90_000.0), 1)
        record["aircraft_cycles"] = rng.randint(300, 60_000)


def _inspection(rng: random.Random, record: dict, family: str, ata: str, occurred: datetime) -> None:
    record["inspection_type"] = rng.choice(("DAILY", "WEEKLY", "A_CHECK", "C_CHECK", "RII", "ANNUAL", "100HR",
                                            "PROGRESSIVE", "PROGRAM"))
    record["findings"] = rng.sample(_FINDINGS, rng.choice((0, 0, 1, 2, 3)))
    record["airworthy"] = not record["findings"] or rng.random() < 0.7
    if rng.random() < 0.4:
        record["inspector"] = _technician(rng)


def _part_record(rng: random.Random, record: dict, family: str, ata: str, occurred: datetime) -> None:
    part_number, position = rng.choice(_PARTS)
    part: dict[str, Any] = {
        "cage": rng.choice(_CAGES),
        "part_number": part_number,
        "serial_number": f"{rng.choice(('', 'SN', 'B', 'G', 'RR'))}{rng.randint(1000, 9_999_999)}",
        "condition": "UNSERVICEABLE" if record["type"] == "part_removal" and rng.random() < 0.6
        else rng.choice(("NEW", "SERVICEABLE", "OVERHAULED", "REPAIRED", "INSPECTED", "MODIFIED")),
    }
    if record["type"] != "part_removal" and rng.random() < 0.8:
        part["release_certificate"] = (f"EASA-F1-{occurred.year}-{rng.randint(1, 99999):05d}"
                                       if rng.random() < 0.5 else f"8130-3-{rng.randint(1, 999999):06d}")
    if rng.random() < 0.6:
        part["tsn_hours"] = round(rng.uniform(0.0, 40_000.0), 1)
        part["csn"] = rng.randint(0, 30_000)
    record["part"] = part
    if record["type"] != "part_receipt":
        record["position"] = position
    if record["type"] == "part_removal":
        record["removal_reason"] = rng.choices(("SCHEDULED", "UNSCHEDULED", "ROBBERY", "MODIFICATION"),
                                               (5, 4, 1, 1))[0]


def _torque_event(rng: random.Random, record: dict, family: str, ata: str, occurred: datetime) -> None:
    fastener, low, high = rng.choice(_TORQUE_SPECS)
    if rng.random() < 0.9:
        torque = min(max(round(rng.uniform(low, high), 1), low), high)
    else:
        torque = round(high * rng.uniform(1.03, 1.15), 1) if rng.random() < 0.5 else round(low * 0.9, 1)
    due: date = occurred.astimezone(UTC).date() + timedelta(days=rng.randint(1, 330))
    record["tool"] = {"serial_number": f"{rng.choice(_WRENCHES)}-{rng.randint(1, 99999):05d}",
                      "calibration_due": due.isoformat()}
    record["fastener_ref"] = fastener
    record["torque_nm"] = torque
    record["torque_min_nm"] = low
    record["torque_max_nm"] = high
    record["result"] = "OK" if low <= torque <= high else "NOK"
    record["tightening_id"] = rng.randint(1, 500_000)
    if rng.random() < 0.1:
        record["angle_deg"] = rng.choice((30, 60, 90, 120.5))


_BODIES = {
    "maintenance_action": _maintenance_action,
    "inspection": _inspection,
    "part_removal": _part_record,
    "part_installation": _part_record,
    "part_receipt": _part_record,
    "torque_event": _torque_event,
}
