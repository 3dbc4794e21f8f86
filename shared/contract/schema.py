"""Every error in a rejected payload, found by walking the contract Structs' `msgspec.inspect` tree.

msgspec's typed decode is the fast path and stops at the first problem. A technician has to
fix the record from one report, so when it fails the payload is decoded untyped and checked
here against the same Structs, collecting all errors. Walking `msgspec.inspect.type_info`
rather than restating the rules keeps the two paths in agreement by construction.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import msgspec
import msgspec.inspect as mi

from shared.contract.errors import FieldError, RuleViolation, cut, describe, json_string
from shared.contract.hygiene import TEXT_EXPECTED, forbidden_received
from shared.contract.scalars import (
    DATE_EXPECTED,
    QUANTITY_EXPECTED,
    TIMESTAMP_EXPECTED,
    Quantity,
    UtcTimestamp,
    parse_date,
    parse_quantity,
    parse_timestamp,
)
from shared.contract.types import RECORD_CLASSES, RECORD_TYPES, SCHEMA, UUID_PATTERN, RecordBase

MAX_ERRORS = 100  # enough to fix any honest record; bounds the work a hostile one can cause

_MISSING = object()
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UUID = re.compile(UUID_PATTERN)
_CUSTOM = {Quantity: (parse_quantity, QUANTITY_EXPECTED), UtcTimestamp: (parse_timestamp, TIMESTAMP_EXPECTED)}


def _struct_info(cls: type[msgspec.Struct]) -> mi.StructType:
    """`msgspec.inspect` of a Struct class, which is always a StructType (typed as any Type)."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType), f"{cls.__name__} is not a Struct"
    return info


_BY_TAG: dict[str, mi.StructType] = {
    tag: _struct_info(cls) for tag, cls in zip(RECORD_TYPES, RECORD_CLASSES, strict=True)
}
_COMMON = _struct_info(RecordBase)
_ANY_RECORD_FIELD = frozenset({"type"}.union(*({f.encode_name for f in s.fields} for s in _BY_TAG.values())))


class _Hints(msgspec.Struct, frozen=True):
    """What annotation metadata adds to a type: human text, a specific rule id, redaction."""

    description: str | None = None
    rule: str | None = None
    free_text: bool = False


_NO_HINTS = _Hints()


def collect_errors(obj: Any, *, station: str, device_kind: str, device_id: str) -> list[FieldError]:
    """All contract errors in an untyped decoded payload (numbers with a fraction as Decimal)."""
    if type(obj) is not dict:
        return [FieldError("$", "type", "a JSON object holding one record", describe(obj, free_text=True))]
    schema = obj.get("schema")
    if type(schema) is str and schema != SCHEMA:
        return [FieldError("$.schema", "schema_version", f'"{SCHEMA}"', describe(schema))]
    errors: list[FieldError] = []
    tag = obj.get("type", _MISSING)
    struct = _BY_TAG.get(tag) if type(tag) is str else None
    if struct is not None:
        _struct(obj, struct, "$", errors, frozenset({"type"}) | _names(struct))
    else:
        expected = "one of " + ", ".join(_BY_TAG)
        if tag is _MISSING:
            errors.append(FieldError("$.type", "required", expected, None))
        else:
            errors.append(FieldError("$.type", "type" if type(tag) is not str else "enum", expected,
                                     describe(tag)))
        _struct(obj, _COMMON, "$", errors, _ANY_RECORD_FIELD)
    failed = {e.path for e in errors}
    device = obj.get("device")
    device = device if type(device) is dict else {}
    errors.extend(e for e in topic_errors(obj.get("station"), device.get("kind"), device.get("id"),
                                          station=station, device_kind=device_kind, device_id=device_id)
                  if e.path not in failed)
    return errors[:MAX_ERRORS]


def topic_errors(got_station: Any, got_kind: Any, got_id: Any, *, station: str, device_kind: str,
                 device_id: str) -> list[FieldError]:
    """The record must name the station and device of the topic it was published on."""
    errors = []
    for path, got, want, what in (("$.station", got_station, station, "station"),
                                  ("$.device.kind", got_kind, device_kind, "device kind"),
                                  ("$.device.id", got_id, device_id, "device id")):
        if type(got) is str and got != want:
            errors.append(FieldError(path, "topic_mismatch", f'"{cut(want, 60)}" (the {what} in the topic)',
                                     describe(got)))
    return errors


def readable_event_id(obj: Any) -> str | None:
    """The payload's event_id if it is a well-formed UUID, so a rejection can still be matched."""
    if type(obj) is dict:
        event_id = obj.get("event_id")
        if type(event_id) is str and _UUID.search(event_id):
            return event_id
    return None


def _child(path: str, key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json_string(cut(key, 40))}]"


def json_path(steps: tuple[str | int, ...]) -> str:
    """`$.aircraft.registration`, `$.findings[0]`, `$["odd key"]` for a path of keys and indexes."""
    path = "$"
    for step in steps:
        path = f"{path}[{step}]" if isinstance(step, int) else _child(path, step)
    return path


def _names(struct: mi.StructType) -> frozenset[str]:
    return _field_names(struct.cls)


@cache
def _field_names(cls: type[msgspec.Struct]) -> frozenset[str]:
    return frozenset(f.encode_name for f in _struct_info(cls).fields)


def _struct(obj: dict, struct: mi.StructType, path: str, errors: list[FieldError],
            known: frozenset[str]) -> None:
    for key, value in obj.items():
        if len(errors) >= MAX_ERRORS:
            return
        if key not in known and (bad := forbidden_received(key)) is not None:
            errors.append(FieldError(_child(path, key), "text_control_char", TEXT_EXPECTED, f"key with {bad}"))
        elif key not in known:
            errors.append(FieldError(_child(path, key), "unknown_field", "no such field in contract v1 here",
                                     describe(value, free_text=True)))
    for field in struct.fields:
        value = obj.get(field.encode_name, _MISSING)
        child = f"{path}.{field.encode_name}"
        if value is not _MISSING:
            _value(value, field.type, child, errors, _NO_HINTS)
        elif field.required:
            errors.append(FieldError(child, "required", _expected(field.type), None))


def _value(value: Any, t: mi.Type, path: str, errors: list[FieldError], hints: _Hints) -> None:
    if len(errors) >= MAX_ERRORS:
        return
    if isinstance(t, mi.Metadata):
        extra = t.extra or {}
        hints = _Hints((t.extra_json_schema or {}).get("description"), extra.get("rule"),
                       bool(extra.get("free_text")))
        _value(value, t.type, path, errors, hints)
        return
    if type(value) is str and isinstance(t, mi.StrType | mi.LiteralType):
        bad = forbidden_received(value)
        if bad is not None:  # before any other rule: says what is wrong without quoting the text
            errors.append(FieldError(path, "text_control_char", TEXT_EXPECTED, bad))
            return
    problem = _problem(value, t, path, errors, hints)
    if problem is not None:
        rule, expected = problem
        errors.append(FieldError(path, rule, expected, describe(value, free_text=hints.free_text)))


def _problem(value: Any, t: mi.Type, path: str, errors: list[FieldError],
             hints: _Hints) -> tuple[str, str] | None:
    """(rule, expected) for a value that breaks its type, None if it is fine (or recursed into)."""
    kind = type(value)
    if isinstance(t, mi.StrType):
        return _text_problem(value, t, hints)
    if isinstance(t, mi.IntType):
        return _int_problem(value, t)
    if isinstance(t, mi.BoolType):
        return None if kind is bool else ("type", "true or false")
    if isinstance(t, mi.LiteralType):
        if kind is not str:
            return "type", _expected(t)
        return None if value in t.values else ("enum", _expected(t))
    if isinstance(t, mi.ListType):
        if kind is not list:
            return "type", _expected(t)
        if t.max_length is not None and len(value) > t.max_length:
            errors.append(FieldError(path, "max_length", f"at most {t.max_length} items", describe(value)))
        for index, item in enumerate(value):
            _value(item, t.item_type, f"{path}[{index}]", errors, _NO_HINTS)
        return None
    if isinstance(t, mi.StructType):
        if kind is not dict:
            return "type", _expected(t)
        _struct(value, t, path, errors, _names(t))
        return None
    return _scalar_problem(value, t)


def _text_problem(value: Any, t: mi.StrType, hints: _Hints) -> tuple[str, str] | None:
    if type(value) is not str:
        return "type", hints.description or _expected(t)
    if t.min_length is not None and len(value) < t.min_length:
        return "min_length", f"at least {t.min_length} character(s)"
    if t.max_length is not None and len(value) > t.max_length:
        return "max_length", f"at most {t.max_length} characters"
    if t.pattern is not None and not _regex(t.pattern).search(value):
        return hints.rule or "pattern", hints.description or f"text matching {t.pattern}"
    return None


def _int_problem(value: Any, t: mi.IntType) -> tuple[str, str] | None:
    if type(value) is not int:
        return "type", _expected(t)
    if t.ge is not None and value < t.ge:
        return "minimum", f"an integer >= {t.ge}"
    if t.le is not None and value > t.le:
        return "maximum", f"an integer <= {t.le}"
    return None


def _scalar_problem(value: Any, t: mi.Type) -> tuple[str, str] | None:
    try:
        if isinstance(t, mi.DateType):
            parse_date(value)
        elif isinstance(t, mi.CustomType):
            _CUSTOM[t.cls][0](value)
        else:
            raise TypeError(f"contract uses a type the error collector does not know: {t!r}")
    except RuleViolation as violation:
        return violation.rule, violation.expected
    return None


def _expected(t: mi.Type) -> str:
    """Human text for a whole type, used when the value is missing or of the wrong JSON type."""
    if isinstance(t, mi.Metadata):
        description = (t.extra_json_schema or {}).get("description")
        return description or _expected(t.type)
    if isinstance(t, mi.StrType):
        low, high = t.min_length or 0, t.max_length
        return f"text of {low}-{high} characters" if high is not None else "text"
    if isinstance(t, mi.IntType):
        return f"an integer >= {t.ge}" if t.ge is not None else "an integer"
    if isinstance(t, mi.BoolType):
        return "true or false"
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(str(v) for v in t.values)
    if isinstance(t, mi.ListType):
        limit = f"at most {t.max_length} " if t.max_length is not None else ""
        return f"a list of {limit}items, each {_expected(t.item_type)}"
    if isinstance(t, mi.StructType):
        return "an object with " + ", ".join(f.encode_name for f in t.fields if f.required)
    if isinstance(t, mi.DateType):
        return DATE_EXPECTED
    if isinstance(t, mi.CustomType):
        return _CUSTOM[t.cls][1]
    return repr(t)


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)
