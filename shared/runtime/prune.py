"""The pruning rounds of one stage on its own store (`shared.runtime.retention` says what may go).

Every `retention.interval_s` a round starts: it walks the `seen_age` index oldest first up to
the dedupe window's edge, deleting each fate whose record the gateway holds (acknowledged and
cosigned), then the DLQ rows exported and older than `retention.dlq_days`. A round is cut
into write transactions of at most `retention.batch` rows, one per turn of the stage's loop,
between its batches: the pipeline never waits on a long write. Each finished round is logged
(`RETENTION_PRUNED`, with counts) and the totals are in the stage's status (`retention`).

Settled outbox rows need no pruning (the receipt deletes them), nor do the uplink's entries
(dropped once the gateway acknowledges them): they are not here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from shared.runtime import dlq, retention
from shared.runtime.clock import parse_utc, utc_from_epoch
from shared.runtime.config import RetentionConfig
from shared.runtime.messages import fate_decode
from shared.runtime.retention import SEEN_AGE, GatewayHolds
from shared.runtime.store import Store, from_u64

SEEN = "seen"  # the runtime's dedupe table (shared.runtime.work.SEEN)
META = "meta"
_INDEXED = b"seen_age_indexed"  # in `meta`: every fate has its `seen_age` row
_PHASES = ("index", "seen", "dlq")


@dataclass
class Round:
    """One pruning round: its bound and clock, where it is, what it did."""

    prunable_below: int
    now_s: float
    started: float
    phase: str = "index"
    resume: bytes = b""
    seen_pruned: int = 0
    seen_kept: int = 0
    dlq_pruned: int = 0
    indexed: int = 0
    transactions: int = 0


class Pruner:
    """Prunes `store` (the stage's own) in bounded steps; `holds` is what the gateway holds, as
    last heard (None: not known, so no fate is pruned)."""

    def __init__(self, store: Store, stage_dir: Path, settings: RetentionConfig, log,
                 holds: Callable[[], GatewayHolds | None]):
        self.store = store
        self.stage_dir = Path(stage_dir)
        self.settings = settings
        self.log = log
        self.holds = holds
        self.batch = max(1, settings.batch)
        self.round: Round | None = None
        self.totals = {"seen_pruned": 0, "dlq_pruned": 0, "rounds": 0}
        self.last_round_at: str | None = None
        self._next_at = 0.0
        self._prepare_index()

    def _prepare_index(self) -> None:
        """At start, before any batch: a store whose fates all have age rows (or that has none)
        is marked indexed; one with fates but no age rows at all was written before retention
        existed, and its first round gives them rows (`_index`)."""
        meta, seen, ages = (self.store.table(name) for name in (META, SEEN, SEEN_AGE))
        with self.store.read() as txn:
            if txn.get(_INDEXED, db=meta) is not None:
                return
            backfill = txn.stat(ages)["entries"] == 0 and txn.stat(seen)["entries"] > 0
        if not backfill:
            with self.store.write() as txn:
                txn.put(_INDEXED, b"1", db=meta)

    def status(self) -> dict[str, Any]:
        holds = self.holds()
        return {**self.totals, "last_round_at": self.last_round_at,
                "prunable_below": holds.prunable_below if holds else None,
                "seen_days": self.settings.seen_days, "dlq_days": self.settings.dlq_days}

    def step(self) -> bool:
        """One bounded write transaction of the current round (starting one if due); True if it
        wrote. A store fault ends the round; the next one starts at its time."""
        if self.round is None:
            now = time.monotonic()
            if now < self._next_at:
                return False
            self._next_at = now + self.settings.interval_s
            holds = self.holds()
            self.round = Round(holds.prunable_below if holds else 0, retention.now_s(), now)
        current = self.round
        try:
            with self.store.write() as txn:
                done = getattr(self, f"_{current.phase}")(txn, current)
            current.transactions += 1
        except lmdb.Error as exc:
            self.log.warning("retention round stopped by a store fault", error=type(exc).__name__,
                             detail=str(exc)[:200], state_transition="RETENTION_HELD")
            self.round = None
            return False
        if done:
            following = _PHASES.index(current.phase) + 1
            if following == len(_PHASES):
                self._finish(current)
            else:
                current.phase, current.resume = _PHASES[following], b""
        return True

    def run_round(self, limit_s: float = 60.0) -> Round | None:
        """A whole round now, step by step (tools, tests, the bench); None if none could start."""
        self._next_at = 0.0
        self.round = None
        deadline = time.monotonic() + limit_s
        self.step()
        started = self.round
        while self.round is not None and time.monotonic() < deadline:
            self.step()
        return started

    def _finish(self, done: Round) -> None:
        self.round = None
        self.totals["seen_pruned"] += done.seen_pruned
        self.totals["dlq_pruned"] += done.dlq_pruned
        self.totals["rounds"] += 1
        self.last_round_at = utc_from_epoch(done.now_s)
        self.log.info("retention round", state_transition="RETENTION_PRUNED", seen_pruned=done.seen_pruned,
                      seen_kept=done.seen_kept, dlq_pruned=done.dlq_pruned, indexed=done.indexed,
                      prunable_below=done.prunable_below, transactions=done.transactions,
                      seconds=round(time.monotonic() - done.started, 3))

    # the phases: each does at most `batch` rows in `txn` and says whether it is done
    def _index(self, txn: lmdb.Transaction, current: Round) -> bool:
        """Give every fate stored before the age index existed a row, aged from this round."""
        meta, seen, ages = (self.store.table(name) for name in (META, SEEN, SEEN_AGE))
        if txn.get(_INDEXED, db=meta) is not None:
            return True
        cursor = txn.cursor(db=seen)
        positioned = cursor.set_range(current.resume) if current.resume else cursor.first()
        keys: list[bytes] = []
        if positioned:
            for key in cursor.iternext(keys=True, values=False):
                if len(keys) == self.batch:
                    current.resume = bytes(key)
                    break
                keys.append(bytes(key))
            else:
                current.resume = b""
        for key in keys:
            txn.put(retention.age_key(current.now_s, key), b"", db=ages)
        current.indexed += len(keys)
        if current.resume:
            return False
        txn.put(_INDEXED, b"1", db=meta)
        return True

    def _seen(self, txn: lmdb.Transaction, current: Round) -> bool:
        """Fates first seen before the window's edge whose record the gateway holds."""
        if current.prunable_below <= 0:
            return True  # the gateway holds nothing we know of: every fate stays
        seen, ages = self.store.table(SEEN), self.store.table(SEEN_AGE)
        edge = int(current.now_s - self.settings.seen_days * retention.DAY_S)
        cursor = txn.cursor(db=ages)
        if not cursor.set_range(current.resume):
            return True
        for _ in range(self.batch):
            age_row = bytes(cursor.key())
            if not age_row or from_u64(age_row[:8]) >= edge:
                return True
            key = age_row[8:]
            raw = txn.get(key, db=seen)
            fate = fate_decode(raw) if raw is not None else None
            seq = retention.in_ledger_at(fate) if fate is not None else None
            if fate is None or (seq is not None and seq < current.prunable_below):
                if fate is not None:
                    txn.delete(key, db=seen)
                    current.seen_pruned += 1
                cursor.delete()  # moves on to the next row
                if not cursor.key():
                    return True
            else:
                current.seen_kept += 1
                if not cursor.next():
                    return True
        current.resume = bytes(cursor.key())
        return False

    def _dlq(self, txn: lmdb.Transaction, current: Round) -> bool:
        """DLQ rows up to the exported mark, received before `dlq_days` ago."""
        mark = retention.read_exported(self.stage_dir)
        if mark is None:
            return True
        edge = current.now_s - self.settings.dlq_days * retention.DAY_S
        rows = self.store.table(dlq.DLQ)
        cursor = txn.cursor(db=rows)
        if not cursor.set_range(current.resume):
            return True
        doomed: list[int] = []
        finished, looked = True, 0
        for key, value in cursor:
            row_id = from_u64(key)
            if row_id > mark.through:
                break
            if looked == self.batch:
                current.resume, finished = bytes(key), False
                break
            looked += 1
            try:
                received = parse_utc(dlq.decode_row(value).received_at).timestamp()
            except (ValueError, msgspec.DecodeError):
                continue  # no readable time: kept, for a person to look at
            if received < edge:
                doomed.append(row_id)
        for row_id in doomed:
            dlq.remove_in(txn, self.store, row_id)
        current.dlq_pruned += len(doomed)
        return finished
