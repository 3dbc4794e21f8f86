"""What every device parser returns for input it cannot accept: the project's `FieldError`s.

Parsers collect every problem they find (path, rule, expected, received) and return them in one
`Malformed` instead of raising, so a hostile or broken payload can only ever produce a report.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.contract.errors import FieldError, describe
from shared.contract.report import error_report

#: Largest device payload a parser looks at; the broker bounds messages too, this keeps a parser
#: from building large structures from a payload it would refuse anyway.
MAX_PAYLOAD = 262144


class Malformed(msgspec.Struct, frozen=True, tag="devices.malformed/1"):
    """The input was refused; `source` names the parser (`zebra`, `impinj`, `partmark`)."""

    source: str
    errors: list[FieldError]

    def report(self, *, received_at: str, raw: bytes | None = None) -> dict:
        """The DLQ report (`shared.contract.report.error_report`) for this refusal."""
        return error_report(stage=f"devices.{self.source}", errors=self.errors, received_at=received_at, raw=raw)


def field_error(path: str, rule: str, expected: str, value: Any = None, *, missing: bool = False) -> FieldError:
    """One `FieldError`; `received` is `describe(value)`, or None when the field is missing."""
    return FieldError(path=path, rule=rule, expected=expected, received=None if missing else describe(value))
