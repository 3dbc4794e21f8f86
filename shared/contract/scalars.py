"""Scalars msgspec cannot check alone: exact quantities and `Z` timestamps.

Quantities arrive as JSON numbers and must never pass through a float (a signed record has to
say what the wrench said), so the decoder hands them over as Decimal (`float_hook`) and
`parse_quantity` bounds them. Timestamps must be RFC 3339 in UTC spelt with `Z`; msgspec's own
datetime type would also take offsets and naive times.

Each type has one canonical text form, used in normalized bodies: quantities as plain decimals
without exponent or trailing zeros ("12.5", "100", "0"), timestamps as
`YYYY-MM-DDTHH:MM:SS[.ffffff]Z` with trailing zeros of the fraction dropped.
"""

from __future__ import annotations

import decimal
import re
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from shared.contract.errors import RuleViolation

QUANTITY_MAX = Decimal(1_000_000)
QUANTITY_MAX_FRACTION_DIGITS = 20

_EXACT = decimal.Context(prec=decimal.MAX_PREC)
_ZERO = Decimal(0)
_STORED_QUANTITY = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]*[1-9])?")
_TIMESTAMP = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
                        r"T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?Z")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

QUANTITY_EXPECTED = f"a JSON number from 0 to {QUANTITY_MAX}"
TIMESTAMP_EXPECTED = "RFC 3339 UTC time ending in Z, e.g. 2024-05-20T14:30:00Z (at most 6 fraction digits)"
DATE_EXPECTED = "a date YYYY-MM-DD"


class Quantity(Decimal):
    """A measured amount (hours, N·m, degrees): exact, >= 0, bounded, without exponent or
    trailing zeros (so `str` shows 20 rather than 2E+1 for most values)."""

    __slots__ = ()


class UtcTimestamp(datetime):
    """An instant in UTC, as the device stated it (to the microsecond)."""

    __slots__ = ()


def parse_quantity(value: Any) -> Quantity:
    """A quantity from a decoded JSON number (int, or Decimal via float_hook); strings are refused."""
    kind = type(value)
    if kind is int:
        number = Decimal(value)
    elif kind is Decimal:
        number = value
    else:
        raise RuleViolation("type", QUANTITY_EXPECTED)
    return _bounded(number)


def parse_stored_quantity(value: Any) -> Quantity:
    """A quantity from its canonical string, as `normalize` stored it."""
    if type(value) is not str or _STORED_QUANTITY.fullmatch(value) is None:
        raise RuleViolation("format", "a canonical decimal string such as 12.5")
    return _bounded(Decimal(value))


def _bounded(number: Decimal) -> Quantity:
    if number < 0:
        raise RuleViolation("minimum", "a number >= 0")
    if number > QUANTITY_MAX:
        raise RuleViolation("maximum", f"a number <= {QUANTITY_MAX}")
    if not number:
        return Quantity(_ZERO)
    number = number.normalize(_EXACT)
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int), "NaN and infinities cannot pass the bounds above"
    if exponent < -QUANTITY_MAX_FRACTION_DIGITS:
        raise RuleViolation("precision", f"at most {QUANTITY_MAX_FRACTION_DIGITS} digits after the point")
    return Quantity(format(number, "f"))


def quantity_text(value: Decimal) -> str:
    """Canonical decimal text of a bounded, normalized quantity."""
    return format(value, "f")


def parse_timestamp(value: Any) -> UtcTimestamp:
    if type(value) is not str:
        raise RuleViolation("type", TIMESTAMP_EXPECTED)
    match = _TIMESTAMP.fullmatch(value)
    if match is None:
        raise RuleViolation("format", TIMESTAMP_EXPECTED)
    year, month, day, hour, minute, second, fraction = match.groups()
    micro = int(fraction.ljust(6, "0")) if fraction else 0
    try:
        return UtcTimestamp(int(year), int(month), int(day), int(hour), int(minute), int(second), micro,
                            tzinfo=UTC)
    except ValueError:
        raise RuleViolation("format", TIMESTAMP_EXPECTED) from None


def timestamp_text(value: datetime) -> str:
    """Canonical text of a UTC instant (the year is zero-padded, which strftime does not promise)."""
    text = (f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
            f"T{value.hour:02d}:{value.minute:02d}:{value.second:02d}")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_date(value: Any) -> date:
    """The error collector's mirror of msgspec's strict `YYYY-MM-DD` date decoding."""
    if type(value) is not str:
        raise RuleViolation("type", DATE_EXPECTED)
    if _DATE.fullmatch(value) is None:
        raise RuleViolation("format", DATE_EXPECTED)
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise RuleViolation("format", DATE_EXPECTED) from None


def wire_hook(kind: type, value: Any) -> Any:
    """msgspec dec_hook for payloads from devices."""
    if kind is Quantity:
        return parse_quantity(value)
    if kind is UtcTimestamp:
        return parse_timestamp(value)
    raise TypeError(f"unsupported type {kind!r}")


def stored_hook(kind: type, value: Any) -> Any:
    """msgspec dec_hook for normalized bodies (quantities as strings)."""
    if kind is Quantity:
        return parse_stored_quantity(value)
    if kind is UtcTimestamp:
        return parse_timestamp(value)
    raise TypeError(f"unsupported type {kind!r}")


def enc_hook(value: Any) -> Any:
    """msgspec enc_hook producing the canonical text forms."""
    if type(value) is Quantity:
        return quantity_text(value)
    if type(value) is UtcTimestamp:
        return timestamp_text(value)
    raise TypeError(f"cannot encode {type(value)!r}")
