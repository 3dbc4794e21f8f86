"""The retained status of a stage (`mro/<station>/status/<stage>`) and its processed/failed counters.

The counters live in the stage's `meta` table and are added to in each batch transaction, so
they count committed work only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from shared.runtime import dlq
from shared.runtime.clock import utc_now
from shared.runtime.messages import json_encode
from shared.runtime.store import MIB, Store, from_u64, u64

_PROCESSED, _FAILED = b"processed", b"failed"


def add_counts(get: Callable[[bytes], bytes | None], put: Callable[[bytes, bytes], object], processed: int,
               failed: int) -> None:
    """Add one batch's counts to the `meta` counters (inside the batch transaction)."""
    for name, delta in ((_PROCESSED, processed), (_FAILED, failed)):
        if delta:
            raw = get(name)
            put(name, u64((from_u64(raw) if raw else 0) + delta))


def read_counts(store: Store) -> tuple[int, int]:
    with store.read() as txn:
        meta = store.table("meta")
        processed = txn.get(_PROCESSED, db=meta)
        failed = txn.get(_FAILED, db=meta)
    return (from_u64(processed) if processed else 0, from_u64(failed) if failed else 0)


def store_usage(store: Store) -> dict[str, int]:
    """How near its cap the store's map is, in MiB: `map_mb` now, `max_mb` its cap, `used_mb`
    up to the last page written (freed pages LMDB reuses count too)."""
    return {"map_mb": store.map_size // MIB, "used_mb": -(-store.used_bytes() // MIB),
            "max_mb": store.max_bytes // MIB}


class StatusReport:
    """Builds the status payload; `state` is up / frozen / contested / down."""

    def __init__(self, name: str, store: Store, queue_depth: Callable[[], int],
                 extra: Callable[[], dict[str, Any]], session: Callable[[], tuple[bool, int]]):
        self.name = name
        self.store = store
        self._queue_depth = queue_depth
        self._extra = extra
        self._session = session
        self.last_at = 0.0

    def payload(self, state: str) -> bytes:
        if state == "down":  # also the will, made before the link exists
            return json_encode({"service": self.name, "state": state, "pid": os.getpid(), "at": utc_now()})
        contested, session_resets = self._session()
        if state == "up" and contested:
            state = "contested"  # someone else keeps taking our session: not `up`
        status: dict[str, Any] = {"service": self.name, "state": state, "pid": os.getpid(), "at": utc_now()}
        processed, failed = read_counts(self.store)
        usage = dlq.usage(self.store)
        status.update(queue_depth=self._queue_depth(), processed=processed, failed=failed,
                      session_resets=session_resets, dlq_rows=usage.rows, dlq_bytes=usage.bytes,
                      dlq_dropped=usage.dropped, store=store_usage(self.store), **self._extra())
        return json_encode(status)

    def due(self, interval_s: float) -> bool:
        return time.monotonic() - self.last_at >= interval_s

    def sent(self) -> None:
        self.last_at = time.monotonic()
