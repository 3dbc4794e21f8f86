"""Records the open schema-drift breaker holds: neither rejected nor forwarded, kept in this stage's
LMDB (`held` table, u64(id) -> ReceivedRecord) until the breaker closes, then judged in arrival order.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from services.validate.state import SchemaState, held_one, released
from shared.contract.scalars import stored_hook
from shared.runtime.messages import ReceivedRecord, item_encoder
from shared.runtime.poison import reject_poison
from shared.runtime.store import u64
from shared.runtime.verdicts import Verdict
from shared.runtime.work import UnitOfWork

HELD_TABLE = "held"
NON_CRITICAL = frozenset({"torque_event", "part_receipt"})  # what the breaker holds; sign-offs keep flowing

Judge = Callable[[ReceivedRecord, UnitOfWork], Verdict]

_held_decoder = msgspec.json.Decoder(ReceivedRecord, dec_hook=stored_hook)


def hold(uow: UnitOfWork, state: SchemaState, item: ReceivedRecord) -> SchemaState:
    """Store `item` as the newest held record; the state to save counts it."""
    uow.put(HELD_TABLE, u64(state.held_next), item_encoder.encode(item))
    return held_one(state)


def release(uow: UnitOfWork, state: SchemaState, judge: Judge) -> tuple[SchemaState, int]:
    """Judge every held record, oldest first, and settle it with its verdict.

    Returns the state to save (nothing held) and how many records were released."""
    count = 0
    for held_id in range(state.held_first, state.held_next):
        raw = uow.get(HELD_TABLE, u64(held_id))
        if raw is None:
            continue
        item = _held_decoder.decode(raw)
        uow.delete(HELD_TABLE, u64(held_id))
        try:
            verdict = judge(item, uow)
        except Exception as exc:  # one broken record must not keep the others held
            reject_poison(uow, item, exc)
        else:
            uow.settle(item, verdict)
        count += 1
    return released(state), count
