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
# upper bounds (seconds) of the batch commit latency histogram; a synced LMDB commit on an SD
# card takes milliseconds, a stalled one seconds
COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class StageFigures:
    """Cumulative figures of this process for the retained status, so one collector (the MCC's
    /metrics) can expose every stage without each process opening a port: records in, out
    (accepted or recorded), rejected and duplicate, and the batch commit latency histogram.
    They start at zero with the process, as Prometheus counters do."""

    def __init__(self) -> None:
        self.records = {"in": 0, "out": 0, "rejected": 0, "duplicate": 0}
        self._counts = [0] * (len(COMMIT_BUCKETS_S) + 1)  # the last one: above every bound
        self._sum = 0.0

    def batch(self, *, received: int, passed: int, rejected: int, duplicates: int, seconds: float) -> None:
        for name, delta in (("in", received), ("out", passed), ("rejected", rejected), ("duplicate", duplicates)):
            self.records[name] += delta
        self._sum += seconds
        for i, bound in enumerate(COMMIT_BUCKETS_S):
            if seconds <= bound:
                self._counts[i] += 1
                break
        else:
            self._counts[-1] += 1

    def payload(self) -> dict[str, Any]:
        """`records` and `commit_seconds` {buckets: [[le, cumulative count], ...], sum, count}."""
        cumulative, running = [], 0
        for bound, count in zip(COMMIT_BUCKETS_S, self._counts, strict=False):
            running += count
            cumulative.append([bound, running])
        return {"records": dict(self.records),
                "commit_seconds": {"buckets": cumulative, "sum": round(self._sum, 6),
                                   "count": running + self._counts[-1]}}


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
                 extra: Callable[[], dict[str, Any]], session: Callable[[], tuple[bool, int]],
                 oldest_unreceipted_s: Callable[[], float | None] = lambda: None):
        self.name = name
        self.figures = StageFigures()
        self._oldest_unreceipted_s = oldest_unreceipted_s
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
                      dlq_dropped=usage.dropped, store=store_usage(self.store),
                      outbox_oldest_s=self._oldest_unreceipted_s(), **self.figures.payload(), **self._extra())
        return json_encode(status)

    def due(self, interval_s: float) -> bool:
        return time.monotonic() - self.last_at >= interval_s

    def sent(self) -> None:
        self.last_at = time.monotonic()
