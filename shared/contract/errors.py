"""What a rejected record is told: one FieldError per problem, all of them in one ContractError.

`received` is what a technician needs to find the mistake, and nothing more: identifiers and
values are shown (cut to 80 characters), free text (notes, descriptions, findings, signatures,
anything unknown) only by its length, so an error report never carries PII or work narrative.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from shared.contract.hygiene import escape_forbidden

MAX_RECEIVED = 80


class FieldError(msgspec.Struct, frozen=True):
    """One problem with one field; `path` names the field itself (also when missing or unknown)."""

    path: str
    rule: str
    expected: str
    received: str | None


class ContractError(Exception):
    """The record breaks device contract v1; `errors` lists every problem found.

    `event_id` is the record's own id when the payload had a well-formed one, so the device can
    match the `rejected` receipt to what it sent.
    """

    def __init__(self, errors: list[FieldError], event_id: str | None = None):
        self.errors = errors
        self.event_id = event_id
        shown = ", ".join(f"{e.path} ({e.rule})" for e in errors[:5])
        more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
        super().__init__(f"{len(errors)} contract error(s): {shown}{more}")


class RuleViolation(ValueError):
    """Raised by scalar parsers; msgspec turns it into a ValidationError on the fast path, the
    error collector turns it into a FieldError with this rule and expectation."""

    def __init__(self, rule: str, expected: str):
        super().__init__(f"{rule}: expected {expected}")
        self.rule = rule
        self.expected = expected


def cut(text: str, limit: int = MAX_RECEIVED) -> str:
    """`text` shortened to at most `limit` characters, marking the cut with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_string(text: str) -> str:
    """Quoted like JSON, so a string "12.5" is told apart from the number and stray spaces show;
    control, bidi and zero-width code points escaped, so a report cannot carry them."""
    return escape_forbidden(msgspec.json.encode(text).decode())


def describe(value: Any, *, free_text: bool = False) -> str:
    """The `received` text for a value that arrived: at most 80 characters, strings quoted as in
    JSON, free text replaced by its length."""
    kind = type(value)
    if kind is str:
        if free_text:
            return f"<redacted: {len(value)} chars>"
        return cut(json_string(value[:MAX_RECEIVED]) + ("…" if len(value) > MAX_RECEIVED else ""))
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int or kind is Decimal:
        return cut(str(value))
    if kind is dict:
        return f"object with {len(value)} field(s)"
    if kind is list:
        return f"array of {len(value)} item(s)"
    return cut(kind.__name__)
