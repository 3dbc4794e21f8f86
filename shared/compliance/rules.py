"""Compliance rules: a record judged against the registries, the box's own history and the
active contract version, all at `occurred_at` (the UTC day the work was done), never "now".

`Compliance.judge(record, body, state)` returns a `Verdict`: the errors (FieldErrors with the
rule ids listed in `shared.compliance`), flags (accepted, but worth a look) and the state writes
to apply if, and only if, the record is accepted. `state` is anything with
`get(table, key)` / `put(table, key, value)`: the validate stage's UnitOfWork (so the state
changes commit in the record's own transaction) or `MemoryState` in tests and tools.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from typing import Any, NamedTuple, Protocol

import msgspec
from msgspec import UNSET

from shared.compliance.esign import decode_signature, signing_input, verify
from shared.compliance.registry import ANY, Registry, Technician
from shared.compliance.versions import BASE, ContractVersion
from shared.contract.errors import FieldError, describe
from shared.contract.scalars import quantity_text
from shared.contract.types import (
    ATA_CHAPTERS,
    Inspection,
    MaintenanceAction,
    PartInstallation,
    PartReceipt,
    PartRemoval,
    Record,
    TorqueEvent,
)

PARTS_TABLE = "parts"
TIMES_TABLE = "aircraft_times"
STATE_TABLES = (PARTS_TABLE, TIMES_TABLE)
TIMES_KEPT = 64  # readings kept per aircraft: enough to judge records arriving out of order

# --- regulatory tables ----------------------------------------------------------------------------
# FAA powerplant rating: engines, propellers, APU (14 CFR 65.87); everything else is airframe (65.85).
FAA_POWERPLANT = frozenset({"49", "61", *(str(n) for n in range(71, 86))})
# EASA Part-66: avionics and electrical chapters are B2 scope; B1 covers the rest (and 24, 33).
AVIONICS = frozenset({"22", "23", "31", "34", "42", "44", "45", "46"})
B2_SCOPE = AVIONICS | {"24", "33"}
_CHAPTERS = frozenset(ATA_CHAPTERS)


def release_kinds(chapter: str) -> frozenset[str]:
    """Certificate kinds that may sign a return to service for work in `chapter`."""
    kinds = {"FAA-AP", "FAA-IA", "EASA-C"}
    kinds.add("FAA-P" if chapter in FAA_POWERPLANT else "FAA-A")
    if chapter not in AVIONICS:
        kinds.add("EASA-B1")
    if chapter in B2_SCOPE:
        kinds.add("EASA-B2")
    return frozenset(kinds)


RELEASE_KINDS = {chapter: release_kinds(chapter) for chapter in _CHAPTERS}
# Inspections with a kind of their own (14 CFR 65.95, 91.409); the others need a releasing kind.
INSPECTION_KINDS = {
    "ANNUAL": frozenset({"FAA-IA"}),
    "PROGRESSIVE": frozenset({"FAA-IA"}),
    "100HR": frozenset({"FAA-AP", "FAA-IA"}),
}
NOT_INSTALLED_CONDITIONS = frozenset({"UNSERVICEABLE", "SCRAP"})


def inspection_kinds(inspection_type: str, chapter: str) -> frozenset[str]:
    return INSPECTION_KINDS.get(inspection_type) or RELEASE_KINDS[chapter]


class State(Protocol):
    def get(self, table: str, key: bytes) -> bytes | None: ...

    def put(self, table: str, key: bytes, value: bytes) -> None: ...


class MemoryState:
    """`State` in a dict (tests, dry runs, benchmarks)."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[bytes, bytes]] = {}

    def get(self, table: str, key: bytes) -> bytes | None:
        return self.tables.get(table, {}).get(key)

    def put(self, table: str, key: bytes, value: bytes) -> None:
        self.tables.setdefault(table, {})[key] = value


class Verdict(NamedTuple):
    errors: list[FieldError]
    flags: list[str]
    writes: list[tuple[str, bytes, bytes]]


class _PartState(msgspec.Struct, array_like=True):
    installed: bool
    aircraft: str  # registration when the event happened
    airframe: str  # type|serial of the airframe
    at: int  # occurred_at, microseconds since the epoch


_encode = msgspec.msgpack.Encoder().encode
_decode_part = msgspec.msgpack.Decoder(_PartState).decode
_Reading = tuple[int, str | None, int | None]  # (occurred_at in microseconds, hours text, cycles)
_Seen = tuple[int, str, Decimal | int]  # (occurred_at in microseconds, value as shown, value to compare)
_decode_times = msgspec.msgpack.Decoder(list[_Reading]).decode


def _hours_of(reading: _Reading) -> tuple[str, Decimal] | None:
    return None if reading[1] is None else (reading[1], Decimal(reading[1]))


def _cycles_of(reading: _Reading) -> tuple[str, int] | None:
    return None if reading[2] is None else (str(reading[2]), reading[2])


def _neighbours(readings: list[_Reading], position: int,
                value_of: Callable[[_Reading], tuple[str, Decimal | int] | None]) -> tuple[_Seen | None, _Seen | None]:
    """The nearest readings before and from `position` (in time order) that carry the value `value_of` reads."""
    before = after = None
    for reading in reversed(readings[:position]):
        if (value := value_of(reading)) is not None:
            before = (reading[0], *value)
            break
    for reading in readings[position:]:
        if (value := value_of(reading)) is not None:
            after = (reading[0], *value)
            break
    return before, after


def _micros(moment) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def _text(micros: int) -> str:
    from datetime import UTC, datetime

    moment = datetime.fromtimestamp(micros // 1_000_000, UTC).replace(microsecond=micros % 1_000_000)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Compliance:
    """The rules bound to one registry snapshot and one contract version."""

    def __init__(self, registry: Registry, version: ContractVersion = BASE, *, signatures: bool = True):
        self.registry = registry
        self.version = version
        self.signatures = signatures

    def judge(self, record: Record, body: dict[str, Any], state: State | None) -> Verdict:
        errors: list[FieldError] = []
        flags: list[str] = []
        writes: list[tuple[str, bytes, bytes]] = []
        day = record.occurred_at.date()
        chapter = record.ata[:2]
        signed: list[bytes] = []  # lazily computed signing input, shared by both signers

        aircraft = self._aircraft(record, day, errors)
        technician = self._person(record.technician, "$.technician", day, errors)
        authorisations = self._chapter(technician, day, chapter, errors) if technician else None
        sign_off = False

        if isinstance(record, MaintenanceAction):
            sign_off = record.return_to_service
            if authorisations:
                if not any(ANY in a.actions or record.action in a.actions
                           for a in authorisations if "maintain" in a.privileges):
                    errors.append(FieldError("$.action", "action_not_authorised",
                                             f"an action {_name(technician)} is authorised for at ATA {chapter}",
                                             describe(record.action)))
                if sign_off and not any("certify" in a.privileges for a in authorisations):
                    errors.append(FieldError("$.return_to_service", "rts_not_authorised",
                                             f"false: {_name(technician)} holds no certifying (return to "
                                             f"service) authorisation for ATA {chapter}", "true"))
            if sign_off and technician and record.technician.cert_kind not in RELEASE_KINDS[chapter]:
                errors.append(FieldError("$.technician.cert_kind", "rts_certificate",
                                         f"a certificate that may return ATA {chapter} work to service: "
                                         f"{', '.join(sorted(RELEASE_KINDS[chapter]))}",
                                         describe(record.technician.cert_kind)))
            if sign_off and aircraft is not None:
                review = aircraft.airworthiness_review_expires
                if review is not None and review < day:
                    errors.append(FieldError("$.aircraft", "airworthiness_review_expired",
                                             f"an airworthiness review valid on {day} to return "
                                             f"{aircraft.registration} to service",
                                             f"review expired {review}"))
            if aircraft is not None and (record.aircraft_hours is not UNSET or record.aircraft_cycles is not UNSET):
                self._times(record, aircraft, state, errors, writes)
        elif isinstance(record, Inspection):
            sign_off = True
            self._inspection(record, technician, authorisations, day, chapter, errors, body, signed)
        elif isinstance(record, TorqueEvent):
            self._maintain(technician, authorisations, chapter, errors)
            self._tool(record, day, errors)
        else:
            self._maintain(technician, authorisations, chapter, errors)
            self._part(record, aircraft, state, errors, flags, writes)

        if technician is not None and self.signatures:
            self._signature(record.technician.signature, "$.technician", technician, sign_off, body, signed, errors)
        if self.version is not BASE:
            errors.extend(self.version.check(body))
        return Verdict(errors, flags, writes if not errors else [])

    # --- people --------------------------------------------------------------------------------

    def _person(self, block, prefix: str, day: date, errors: list[FieldError]) -> Technician | None:
        technician = self.registry.technicians.get(block.cert_no)
        if technician is None:
            errors.append(FieldError(f"{prefix}.cert_no", "technician_unknown",
                                     "a certificate number in the technician registry", describe(block.cert_no)))
            return None
        if technician.suspended_on(day):
            since = technician.entry.status_since
            errors.append(FieldError(f"{prefix}.cert_no", "technician_suspended",
                                     f"an active technician on {day} (suspended"
                                     f"{f' since {since}' if since else ''})", describe(block.cert_no)))
        certificates = technician.certificates.get(block.cert_kind)
        if not certificates:
            held = ", ".join(sorted(technician.certificates)) or "none"
            errors.append(FieldError(f"{prefix}.cert_kind", "technician_cert_kind",
                                     f"a certificate {block.cert_no} holds ({held})", describe(block.cert_kind)))
        elif not any(c.valid_on(day) for c in certificates):
            spans = "; ".join(f"{c.issued} to {c.expires or 'no expiry'}" for c in certificates)
            errors.append(FieldError(f"{prefix}.cert_kind", "certificate_not_valid",
                                     f"a {block.cert_kind} certificate valid on {day} (registry: {spans})",
                                     describe(block.cert_kind)))
        return technician

    def _chapter(self, technician: Technician, day: date, chapter: str, errors: list[FieldError]):
        authorisations = technician.authorisations_on(day, chapter)
        if not authorisations:
            errors.append(FieldError("$.ata", "ata_not_authorised",
                                     f"an ATA chapter {_name(technician)} is authorised for on {day}",
                                     describe(chapter)))
        return authorisations

    def _maintain(self, technician, authorisations, chapter: str, errors: list[FieldError]) -> None:
        if authorisations and not any("maintain" in a.privileges for a in authorisations):
            errors.append(FieldError("$.ata", "ata_not_authorised",
                                     f"an ATA chapter {_name(technician)} may perform maintenance in",
                                     describe(chapter)))

    def _inspection(self, record: Inspection, technician, authorisations, day: date, chapter: str,
                    errors: list[FieldError], body: dict, signed: list) -> None:
        rii = record.inspection_type == "RII"
        if rii:
            self._maintain(technician, authorisations, chapter, errors)
        else:
            if authorisations and not any("inspect" in a.privileges for a in authorisations):
                errors.append(FieldError("$.inspection_type", "inspection_not_authorised",
                                         f"an inspection {_name(technician)} is authorised to sign at ATA {chapter}",
                                         describe(record.inspection_type)))
            kinds = inspection_kinds(record.inspection_type, chapter)
            if technician and record.technician.cert_kind not in kinds:
                errors.append(FieldError("$.technician.cert_kind", "inspection_certificate",
                                         f"for a {record.inspection_type} inspection at ATA {chapter}: "
                                         f"{', '.join(sorted(kinds))}", describe(record.technician.cert_kind)))
        inspector_block = record.inspector
        if inspector_block is UNSET:
            if rii:
                errors.append(FieldError("$.inspector", "rii_inspector_missing",
                                         "the inspector who performed the required inspection item "
                                         "(another person than the technician)", None))
            return
        if inspector_block.cert_no == record.technician.cert_no:
            errors.append(FieldError("$.inspector.cert_no", "rii_same_person",
                                     "an inspector other than the technician who did the work",
                                     describe(inspector_block.cert_no)))
        inspector = self._person(inspector_block, "$.inspector", day, errors)
        if inspector is None:
            return
        authorisations = inspector.authorisations_on(day, chapter)
        needed = "rii" if rii else "inspect"
        if not any(needed in a.privileges for a in authorisations):
            what = "required inspection items (RII)" if rii else "inspections"
            rule = "rii_not_authorised" if rii else "inspection_not_authorised"
            errors.append(FieldError("$.inspector.cert_no", rule,
                                     f"an inspector authorised for {what} at ATA {chapter} on {day}",
                                     describe(inspector_block.cert_no)))
        kinds = inspection_kinds(record.inspection_type, chapter)
        if inspector_block.cert_kind not in kinds:
            errors.append(FieldError("$.inspector.cert_kind", "inspection_certificate",
                                     f"for a {record.inspection_type} inspection at ATA {chapter}: "
                                     f"{', '.join(sorted(kinds))}", describe(inspector_block.cert_kind)))
        if self.signatures:
            self._signature(inspector_block.signature, "$.inspector", inspector, True, body, signed, errors)

    # --- e-signatures ----------------------------------------------------------------------------

    def _signature(self, signature, prefix: str, technician: Technician, required: bool, body: dict,
                   signed: list, errors: list[FieldError]) -> None:
        path = f"{prefix}.signature"
        if signature is UNSET:
            if required:
                errors.append(FieldError(path, "signature_missing",
                                         "the technician's e-signature: a sign-off (return to service, "
                                         "inspection, RII) must be signed", None))
            return
        raw = decode_signature(signature)
        if raw is None:
            errors.append(FieldError(path, "signature_malformed", "base64 of a 64-byte Ed25519 signature",
                                     describe(signature, free_text=True)))
            return
        if technician.public_key is None:
            errors.append(FieldError(path, "signature_key_unknown",
                                     f"a signature by a key registered for {technician.cert_no} (none is)",
                                     describe(signature, free_text=True)))
            return
        if not signed:
            signed.append(signing_input(body))
        if not verify(technician.public_key, signed[0], raw):
            errors.append(FieldError(path, "signature_invalid",
                                     f"a signature by {technician.cert_no}'s registered key over this "
                                     "record's content (it was signed by another key, or the record "
                                     "changed after signing)", describe(signature, free_text=True)))

    # --- aircraft, tools, parts ----------------------------------------------------------------

    def _aircraft(self, record: Record, day: date, errors: list[FieldError]):
        block = record.aircraft
        aircraft = self.registry.aircraft.get(block.registration)
        if aircraft is None:
            errors.append(FieldError("$.aircraft.registration", "aircraft_unknown",
                                     "a registration in the aircraft registry", describe(block.registration)))
            return None
        if block.serial_number != aircraft.serial_number:
            errors.append(FieldError("$.aircraft.serial_number", "aircraft_serial_mismatch",
                                     f"{aircraft.serial_number}, the serial registered to {aircraft.registration}",
                                     describe(block.serial_number)))
        if block.type is not UNSET and block.type != aircraft.type:
            errors.append(FieldError("$.aircraft.type", "aircraft_type_mismatch",
                                     f"{aircraft.type}, the type registered for {aircraft.registration}",
                                     describe(block.type)))
        expires = aircraft.registration_expires
        if expires is not None and expires < day:
            errors.append(FieldError("$.aircraft.registration", "registration_expired",
                                     f"a registration valid on {day} (expired {expires})",
                                     describe(block.registration)))
        return aircraft

    def _tool(self, record: TorqueEvent, day: date, errors: list[FieldError]) -> None:
        serial = record.tool.serial_number
        tool = self.registry.tools.get(serial)
        if tool is None:
            errors.append(FieldError("$.tool.serial_number", "tool_unknown", "a tool in the tool registry",
                                     describe(serial)))
        elif tool.calibration_due < day:
            errors.append(FieldError("$.tool.serial_number", "tool_calibration_expired",
                                     f"a tool calibrated for {day} (registry: calibration due {tool.calibration_due})",
                                     describe(serial)))

    def _part(self, record, aircraft, state: State | None, errors, flags, writes) -> None:
        part = record.part
        limits = self.registry.life_limited_parts.get(part.part_number)
        serviceable = not (isinstance(record, PartReceipt) and part.condition in NOT_INSTALLED_CONDITIONS)
        if limits is not None and serviceable and isinstance(record, PartInstallation | PartReceipt):
            self._life(part, limits, errors)
        if state is None or aircraft is None or isinstance(record, PartReceipt):
            return
        key = f"{part.part_number}|{part.serial_number}".encode()
        airframe = f"{aircraft.type}|{aircraft.serial_number}"
        at = _micros(record.occurred_at)
        raw = state.get(PARTS_TABLE, key)
        known = _decode_part(raw) if raw is not None else None
        if known is not None and known.at > at:
            return  # a later event for this serial is already known: this one is history
        if isinstance(record, PartInstallation):
            if known is not None and known.installed:
                where = "this aircraft" if known.airframe == airframe else known.aircraft
                errors.append(FieldError("$.part.serial_number", "part_already_installed",
                                         f"a serial not installed anywhere (installed on {where} "
                                         f"since {_text(known.at)}, no removal recorded)",
                                         describe(part.serial_number)))
            writes.append((PARTS_TABLE, key, _encode(_PartState(True, aircraft.registration, airframe, at))))
        elif isinstance(record, PartRemoval):
            if known is None:
                flags.append("part_removal_unknown")
            elif not known.installed or known.airframe != airframe:
                where = (f"installed on {known.aircraft}" if known.installed
                         else f"removed from {known.aircraft} at {_text(known.at)}")
                errors.append(FieldError("$.part.serial_number", "part_not_installed",
                                         f"a serial installed on {aircraft.registration} (it is {where})",
                                         describe(part.serial_number)))
            writes.append((PARTS_TABLE, key, _encode(_PartState(False, aircraft.registration, airframe, at))))

    @staticmethod
    def _life(part, limits, errors: list[FieldError]) -> None:
        for field, limit, value in (("csn", limits.limit_cycles, part.csn),
                                    ("tsn_hours", limits.limit_hours, part.tsn_hours)):
            if limit is None:
                continue
            path = f"$.part.{field}"
            unit = "cycles" if field == "csn" else "hours"
            if value is UNSET:
                errors.append(FieldError(path, "part_life_unknown",
                                         f"{part.part_number} is life-limited ({limit} {unit}): its {field} "
                                         "is required", None))
            elif value >= limit:
                shown = str(value) if field == "csn" else quantity_text(value)
                errors.append(FieldError(path, "part_life_limit_exceeded",
                                         f"below the life limit of {limit} {unit} for {part.part_number}",
                                         shown))

    def _times(self, record: MaintenanceAction, aircraft, state: State | None, errors, writes) -> None:
        if state is None:
            return
        key = f"{aircraft.type}|{aircraft.serial_number}".encode()
        raw = state.get(TIMES_TABLE, key)
        readings = _decode_times(raw) if raw is not None else []
        at = _micros(record.occurred_at)
        hours = quantity_text(record.aircraft_hours) if record.aircraft_hours is not UNSET else None
        cycles = record.aircraft_cycles if record.aircraft_cycles is not UNSET else None
        position = bisect_right([r[0] for r in readings], at)
        measured: list[tuple[str, str, str, Decimal | int, Callable[[_Reading], tuple[str, Decimal | int] | None]]] = []
        if hours is not None:
            measured.append(("aircraft_hours", "hours", hours, Decimal(hours), _hours_of))
        if cycles is not None:
            measured.append(("aircraft_cycles", "cycles", str(cycles), cycles, _cycles_of))
        for name, unit, shown, number, value_of in measured:
            before, after = _neighbours(readings, position, value_of)
            if before is not None and number < before[2]:
                errors.append(FieldError(f"$.{name}", f"{name}_decreased",
                                         f"at least {before[1]} {unit}, recorded for "
                                         f"{aircraft.registration} at {_text(before[0])}", shown))
            elif after is not None and number > after[2]:
                errors.append(FieldError(f"$.{name}", f"{name}_decreased",
                                         f"at most {after[1]} {unit}, recorded for {aircraft.registration} "
                                         f"at the later time {_text(after[0])}", shown))
        insort(readings, (at, hours, cycles), key=lambda r: r[0])
        writes.append((TIMES_TABLE, key, _encode(readings[-TIMES_KEPT:])))


def _name(technician: Technician | None) -> str:
    return technician.cert_no if technician else "the technician"
