"""A tightening result (MID 0061) as the fields a contract `torque_event` record needs.

Pure: the caller supplies the controller's zone (from its configuration) because the telegram's
timestamp `YYYY-MM-DD:HH:MM:SS` is the controller's local wall-clock time without a zone.
Torques arrive x100 in the configured unit (field 48 of revision 3+, N·m when absent) and
leave as the contract's exact `Quantity` in N·m (canonical text, no exponent); nothing passes
through a float.

A local time that does not exist in the zone (the hour skipped when clocks go forward) is
refused; one that exists twice (the hour repeated when clocks go back) maps to the earlier
instant and is flagged `ambiguous_time`, so the record says what the controller said without
pretending to know which of the two it meant.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from services.torque.mids import TighteningResult, ToolData
from shared.contract.scalars import Quantity, parse_quantity

_STAMP = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2}):([0-9]{2}):([0-9]{2}):([0-9]{2})")
_HUNDRED = Decimal(100)
# Field 48 "torque values unit" (revision 3+): 1 N·m, 8 N·cm convert exactly; 2 lbf.ft, 3 lbf.in,
# 4 kpm, 5 kgf.cm, 6 ozf.in, 7 % are refused rather than converted on a guessed factor.
_TO_NM = {1: Decimal(1), 8: Decimal("0.01")}
_UNIT_NAMES = {2: "lbf.ft", 3: "lbf.in", 4: "kpm", 5: "kgf.cm", 6: "ozf.in", 7: "%"}


class MappingError(ValueError):
    """A result that cannot become a torque_event as it stands (unit, clock); the reason says why."""


class TorqueFields(msgspec.Struct, frozen=True, kw_only=True):
    """What a torque_event record takes from one tightening. `tool_serial_number` is None for
    revision 1 (the caller takes it from MID 0041); `identifier` is the controller's VIN /
    identifier field, where shops scan the work order."""

    occurred_at: datetime
    ambiguous_time: bool
    torque_nm: Quantity
    torque_min_nm: Quantity
    torque_max_nm: Quantity
    result: str
    tightening_id: int
    angle_deg: Quantity
    tool_serial_number: str | None
    identifier: str
    parameter_set_id: int
    controller_name: str


def zone_of(name: str) -> ZoneInfo:
    """The IANA zone of a controller's configuration, with an error that says what to fix."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise MappingError(f"controller zone {name!r} is not an IANA time zone name such as Europe/Berlin") from None


def local_to_utc(stamp: str, zone: ZoneInfo) -> tuple[datetime, bool]:
    """The UTC instant of a controller timestamp, and whether the local time was ambiguous."""
    match = _STAMP.fullmatch(stamp)
    if match is None:
        raise MappingError(f"controller timestamp {stamp!r} is not YYYY-MM-DD:HH:MM:SS")
    try:
        year, month, day, hour, minute, second = (int(part) for part in match.groups())
        naive = datetime(year, month, day, hour, minute, second)
    except ValueError as exc:
        raise MappingError(f"controller timestamp {stamp!r}: {exc}") from None
    early = naive.replace(tzinfo=zone, fold=0)
    late = naive.replace(tzinfo=zone, fold=1)
    instant = early.astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) != naive:
        raise MappingError(f"controller timestamp {stamp!r} does not exist in {zone.key} "
                           "(clocks went forward): check the controller's clock and zone")
    return instant, early.utcoffset() != late.utcoffset()


def _nm(centi: int, unit: int | None) -> Quantity:
    factor = _TO_NM.get(1 if unit is None else unit)
    if factor is None:
        name = _UNIT_NAMES.get(unit or 0, f"code {unit}")
        raise MappingError(f"torque unit {name} is not N·m; set the controller to report N·m")
    return parse_quantity(Decimal(centi) / _HUNDRED * factor)


def to_torque_fields(result: TighteningResult, zone: ZoneInfo | str) -> TorqueFields:
    tz = zone_of(zone) if isinstance(zone, str) else zone
    occurred_at, ambiguous = local_to_utc(result.timestamp, tz)
    if result.tightening_status not in (0, 1):
        raise MappingError(f"tightening status {result.tightening_status} is neither 0 (NOK) nor 1 (OK)")
    return TorqueFields(
        occurred_at=occurred_at,
        ambiguous_time=ambiguous,
        torque_nm=_nm(result.torque, result.torque_unit),
        torque_min_nm=_nm(result.torque_min, result.torque_unit),
        torque_max_nm=_nm(result.torque_max, result.torque_unit),
        result="OK" if result.tightening_status == 1 else "NOK",
        tightening_id=result.tightening_id,
        angle_deg=parse_quantity(result.angle),
        tool_serial_number=result.tool_serial_number or None,
        identifier=result.identifier,
        parameter_set_id=result.parameter_set_id,
        controller_name=result.controller_name,
    )


def last_calibration_date(tool: ToolData, zone: ZoneInfo | str) -> date:
    """The day (in the controller's zone) of the tool's last calibration, from MID 0041."""
    tz = zone_of(zone) if isinstance(zone, str) else zone
    instant, _ = local_to_utc(tool.last_calibration, tz)
    return instant.astimezone(tz).date()
