"""Device contract v1 record types (DESIGN.md section 4) as msgspec Structs.

The Structs are the single statement of the record shape: the fast path decodes with them and
the error collector (`shared.contract.schema`) walks their `msgspec.inspect` description, so the
two can never disagree about what is valid. Annotation metadata carries what the collector
needs beyond msgspec's own constraints: `description` is the human "expected" text, `extra`
may name a specific rule id for a pattern failure and mark free text (redacted in reports).

Patterns end in `\\Z`, not `$`: msgspec matches with `re.search`, and `$` also matches before a
trailing newline, which would let "N123AB\\n" through. Free text carries a pattern too
(`shared.contract.hygiene.FREE_TEXT_PATTERN`): no control, bidi or zero-width code points.

Registrations accepted (`REGISTRATION_PATTERN`):

- United States: N + 1-5 characters, starting with a digit 1-9, at most two trailing letters,
  no I or O (N1, N12345, N123AB, N1234Z)
- United Kingdom G-ABCD, France F-ABCD, Germany D-ABCD (and gliders D-1234): four letters
- Canada C-Fxxx, C-Gxxx, C-Ixxx (three more letters)
- Australia VH-ABC: three letters
- Japan JA + 4 letters or digits (JA8089, JA01KZ)
- China and Taiwan B-1234 / B-12345, Hong Kong and Macau B-HXX, B-KXX, B-LXX, B-MXX
- South Korea HL + 4 digits; Russia RA-12345
- every other state: its ICAO nationality mark (1-2 characters: letters, or a digit and a
  letter) + "-" + 1-5 letters or digits (EI-DVM, 9V-SKA, A6-EDA, I-ADJQ, RP-C1234). The
  prefixes listed above are excluded from this fallback so their stricter forms hold.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from shared.contract.hygiene import FREE_TEXT_PATTERN
from shared.contract.scalars import Quantity, UtcTimestamp
from shared.ledger.canonical import MAX_SAFE_INTEGER
from shared.runtime.topics import DEVICE_ID_PATTERN, DEVICE_KINDS, STATION_PATTERN

SCHEMA = "mro.record/1"

_N_NUMBER = r"N(?:[1-9][0-9]{0,4}|[1-9][0-9]{0,3}[A-HJ-NP-Z]|[1-9][0-9]{0,2}[A-HJ-NP-Z]{2})"
_NATIONAL = (
    r"G-[A-Z]{4}",
    r"F-[A-Z]{4}",
    r"D-[A-Z]{4}",
    r"D-[0-9]{4}",
    r"C-[FGI][A-Z]{3}",
    r"VH-[A-Z]{3}",
    r"JA[0-9A-Z]{4}",
    r"B-[0-9]{4,5}",
    r"B-[HKLM][A-Z]{2}",
    r"HL[0-9]{4}",
    r"RA-[0-9]{5}",
)
_ICAO_FALLBACK = r"(?!(?:N|G|F|D|C|B|VH|JA|HL|RA)-)(?:[A-Z]{1,2}|[0-9][A-Z]|[A-Z][0-9])-[A-Z0-9]{1,5}"
REGISTRATION_PATTERN = rf"^(?:{_N_NUMBER}|{'|'.join(_NATIONAL)}|{_ICAO_FALLBACK})\Z"

ATA_CHAPTERS: tuple[str, ...] = (
    "05", "06", "07", "08", "09", "10", "11", "12", "18",
    *(str(n) for n in range(20, 39)), "41", "42", "44", "45", "46", "47",
    *(str(n) for n in range(49, 58)), *(str(n) for n in range(60, 68)), *(str(n) for n in range(70, 86)),
    "91",
)
ATA_PATTERN = rf"^(?:{'|'.join(ATA_CHAPTERS)})(?:-[0-9]{{2}}(?:-[0-9]{{2}})?)?\Z"

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
_PART_IDENT = r"^[A-Z0-9][A-Z0-9./-]{0,31}\Z"
_PART_IDENT_TEXT = "1-32 of A-Z 0-9 . / - (starting with a letter or digit)"

FREE_TEXT = {"free_text": True}

EventId = Annotated[str, Meta(pattern=UUID_PATTERN, extra={"rule": "format"},
                              description="a UUID like 0b6e4c1a-8d2f-4e5b-9c7a-1f2e3d4c5b6a")]
StationId = Annotated[str, Meta(pattern=STATION_PATTERN,
                                description="the station id of the topic (1-32 of A-Z a-z 0-9 _ -)")]
DeviceId = Annotated[str, Meta(pattern=DEVICE_ID_PATTERN,
                               description="the device id of the topic (1-64 of A-Z a-z 0-9 _ . : -)")]
WorkOrderId = Annotated[str, Meta(pattern=r"^[A-Z0-9][A-Z0-9/-]{2,29}\Z",
                                  description="3-30 of A-Z 0-9 / - (starting with a letter or digit)")]
Registration = Annotated[str, Meta(pattern=REGISTRATION_PATTERN, extra={"rule": "registration"},
                                   description="an aircraft registration such as N123AB, G-EZAB, C-FABC, "
                                               "VH-VXA, JA01KZ, B-1234, HL7701, RA-89001 or EI-DVM")]
AircraftSerial = Annotated[str, Meta(pattern=r"^[A-Z0-9][A-Z0-9-]{0,19}\Z",
                                     description="1-20 of A-Z 0-9 - (starting with a letter or digit)")]
AircraftType = Annotated[str, Meta(pattern=r"^[A-Z0-9][A-Z0-9./-]{0,19}\Z",
                                   description="an aircraft model like A320-214 (1-20 of A-Z 0-9 . / -)")]
AtaCode = Annotated[str, Meta(pattern=ATA_PATTERN, extra={"rule": "ata_chapter"},
                              description="CC, CC-SS or CC-SS-SS with CC a civil iSpec 2200 chapter "
                                          "(05-12, 18, 20-38, 41, 42, 44-47, 49-57, 60-67, 70-85, 91)")]
PartIdent = Annotated[str, Meta(pattern=_PART_IDENT, description=_PART_IDENT_TEXT)]
Cage = Annotated[str, Meta(pattern=r"^[A-HJ-NP-Z0-9]{5}\Z",
                           description="a 5-character CAGE code (A-Z without I and O, 0-9)")]
ReleaseCertificate = Annotated[str, Meta(pattern=r"^[A-Z0-9][A-Z0-9./-]{0,39}\Z",
                                         description="1-40 of A-Z 0-9 . / - (starting with a letter or "
                                                     "digit)")]
CertNo = Annotated[str, Meta(pattern=r"^[A-Z0-9][A-Z0-9-]{3,19}\Z",
                             description="4-20 of A-Z 0-9 - (starting with a letter or digit)")]
Signature = Annotated[str, Meta(min_length=1, max_length=1024, pattern=FREE_TEXT_PATTERN, extra=FREE_TEXT)]
Notes = Annotated[str, Meta(max_length=2000, pattern=FREE_TEXT_PATTERN, extra=FREE_TEXT)]
Description = Annotated[str, Meta(min_length=1, max_length=2000, pattern=FREE_TEXT_PATTERN, extra=FREE_TEXT)]
DataReference = Annotated[str, Meta(min_length=1, max_length=120, pattern=FREE_TEXT_PATTERN, extra=FREE_TEXT)]
Finding = Annotated[str, Meta(min_length=1, max_length=500, pattern=FREE_TEXT_PATTERN, extra=FREE_TEXT)]
Position = Annotated[str, Meta(min_length=1, max_length=40, pattern=FREE_TEXT_PATTERN, extra=FREE_TEXT)]
Count = Annotated[int, Meta(ge=0, le=MAX_SAFE_INTEGER)]

CertKind = Literal["FAA-A", "FAA-P", "FAA-AP", "FAA-IA", "FAA-REPAIRMAN",
                   "EASA-A", "EASA-B1", "EASA-B2", "EASA-B2L", "EASA-B3", "EASA-C"]
Action = Literal["INSPECT", "REPAIR", "REPLACE", "ADJUST", "SERVICE", "TEST", "MODIFY", "DEFER"]
InspectionType = Literal["ANNUAL", "100HR", "PROGRESSIVE", "PROGRAM", "DAILY", "WEEKLY", "A_CHECK", "C_CHECK",
                         "RII"]
Condition = Literal["NEW", "SERVICEABLE", "OVERHAULED", "REPAIRED", "INSPECTED", "MODIFIED", "UNSERVICEABLE",
                    "SCRAP"]
RemovalReason = Literal["SCHEDULED", "UNSCHEDULED", "ROBBERY", "MODIFICATION"]
TorqueResult = Literal["OK", "NOK"]
DeviceKind = Literal[DEVICE_KINDS]  # type: ignore[valid-type]  # a runtime tuple: one list of kinds, in topics


class _Contract(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Every contract object is closed (unknown fields are errors) and immutable once decoded.

    `kw_only` does not inherit, so each class that adds required fields after optional ones
    repeats it. `frozen` does inherit, but every subclass states it too: type checkers only
    treat a Struct as frozen when its own class says so."""


class Device(_Contract, frozen=True):
    kind: DeviceKind
    id: DeviceId


class Aircraft(_Contract, frozen=True):
    registration: Registration
    serial_number: AircraftSerial
    type: AircraftType | UnsetType = UNSET


class Technician(_Contract, frozen=True):
    cert_no: CertNo
    cert_kind: CertKind
    signature: Signature | UnsetType = UNSET


class Part(_Contract, frozen=True):
    cage: Cage
    part_number: PartIdent
    serial_number: PartIdent
    condition: Condition
    release_certificate: ReleaseCertificate | UnsetType = UNSET
    tsn_hours: Quantity | UnsetType = UNSET
    csn: Count | UnsetType = UNSET


class Tool(_Contract, frozen=True):
    serial_number: PartIdent
    calibration_due: date


class RecordBase(_Contract, tag_field="type", frozen=True, kw_only=True):
    """Fields every record type carries; `type` is the tag that selects the subclass."""

    schema: Literal["mro.record/1"]
    event_id: EventId
    occurred_at: UtcTimestamp
    station: StationId
    device: Device
    work_order_id: WorkOrderId
    aircraft: Aircraft
    ata: AtaCode
    technician: Technician
    notes: Notes | UnsetType = UNSET

    @property
    def type(self) -> str:
        return _tag(type(self))


class MaintenanceAction(RecordBase, tag="maintenance_action", frozen=True, kw_only=True):
    action: Action
    description: Description
    data_reference: DataReference
    return_to_service: bool
    aircraft_hours: Quantity | UnsetType = UNSET
    aircraft_cycles: Count | UnsetType = UNSET


class Inspection(RecordBase, tag="inspection", frozen=True, kw_only=True):
    inspection_type: InspectionType
    findings: Annotated[list[Finding], Meta(max_length=50)]
    airworthy: bool
    inspector: Technician | UnsetType = UNSET


class _PartRecord(RecordBase, frozen=True, kw_only=True):
    part: Part
    position: Position | UnsetType = UNSET


class PartRemoval(_PartRecord, tag="part_removal", frozen=True, kw_only=True):
    removal_reason: RemovalReason


class PartInstallation(_PartRecord, tag="part_installation", frozen=True):
    pass


class PartReceipt(_PartRecord, tag="part_receipt", frozen=True):
    pass


class TorqueEvent(RecordBase, tag="torque_event", frozen=True, kw_only=True):
    tool: Tool
    fastener_ref: PartIdent
    torque_nm: Quantity
    torque_min_nm: Quantity
    torque_max_nm: Quantity
    result: TorqueResult
    tightening_id: Count
    angle_deg: Quantity | UnsetType = UNSET


def _tag(cls: type[RecordBase]) -> str:
    """The record type name: msgspec types a tag as str | int | None, every record here has a string one."""
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str), f"{cls.__name__} is not a tagged record type"
    return tag


Record = MaintenanceAction | Inspection | PartRemoval | PartInstallation | PartReceipt | TorqueEvent
RECORD_CLASSES: tuple[type[RecordBase], ...] = Record.__args__
RECORD_TYPES: tuple[str, ...] = tuple(_tag(cls) for cls in RECORD_CLASSES)
