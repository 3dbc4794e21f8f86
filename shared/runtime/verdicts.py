"""What a stage handler decides about one record; the runtime does everything that follows.

A handler returns one verdict per record and never sends a receipt itself, so it cannot
forget one (`shared.runtime.delivery` lists what each verdict sends):

- `Accepted(output)`: pass the record on downstream (as `output`, the next hop's type);
- `Rejected(report)`: keep the error report in the DLQ and tell the device (`counted_only`:
  answer the device and count the rejection, but store and publish no report: `rate_limited`);
- `Recorded(seq, output)`: the record has its final place at `seq` (the ledger, the uplink queue);
- `Held()`: keep it here, undecided; a later notice settles it (`UnitOfWork.settle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Accepted:
    output: Any
    log: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rejected:
    """`report` is the DLQ error report (`shared.contract.error_report`); its `errors` go to the device.

    `counted_only` is for rejections that come in floods by nature (`rate_limited`): the device
    is still told, the DLQ summary counts it per device and rule, and nothing else is spent."""

    report: dict[str, Any]
    counted_only: bool = False


@dataclass(frozen=True, slots=True)
class Recorded:
    seq: int
    output: Any = None


@dataclass(frozen=True, slots=True)
class Held:
    reason: str


Verdict = Accepted | Rejected | Recorded | Held
