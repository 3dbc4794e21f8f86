"""Transactional outbox: records a stage owes its downstream, kept until a receipt names them.

Rows are written in the same LMDB transaction as the stage's own state, so "stored here" and
"owed downstream" can never disagree. The pump publishes rows in order, many per MQTT message,
keeps at most `max_in_flight` unreceipted, republishes any row not receipted within
`redeliver_after_s`, and after a restart streams everything pending from LMDB (memory and
start-up time do not grow with the backlog).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from itertools import takewhile

from shared.runtime.messages import encode_envelope
from shared.runtime.store import Store, from_u64, u64

OUTBOX_TABLES = ("outbox", "outbox_keys")
_NEXT_ID = b"outbox_next_id"


class Outbox:
    def __init__(
        self,
        store: Store,
        publish,
        *,
        topic: str,
        source: str,
        batch: int,
        redeliver_after_s: float,
        max_in_flight: int,
    ):
        self.store = store
        self._publish = publish
        self.topic = topic
        self.source = source
        self.batch = batch
        self.redeliver_after_s = redeliver_after_s
        self.max_in_flight = max_in_flight
        self._rows = store.table("outbox")
        self._keys = store.table("outbox_keys")
        self._meta = store.table("meta")
        self._in_flight: OrderedDict[int, float] = OrderedDict()
        self._first_sent: dict[int, float] = {}  # row id -> when first published (in flight only)
        self._next_unsent = 0

    def add(self, txn, key: str, encoded_item: bytes) -> None:
        """Owe `key` downstream; adding a key that is still owed is a no-op."""
        bkey = key.encode()
        if txn.get(bkey, db=self._keys) is not None:
            return
        raw = txn.get(_NEXT_ID, db=self._meta)
        row_id = from_u64(raw) if raw else 0
        txn.put(_NEXT_ID, u64(row_id + 1), db=self._meta)
        txn.put(u64(row_id), encoded_item, db=self._rows, append=True)
        txn.put(bkey, u64(row_id), db=self._keys)

    def settle(self, txn, keys: list[str]) -> list[int]:
        """Delete the rows a downstream receipt names; returns their ids for `forget` after commit."""
        settled = []
        for key in keys:
            bkey = key.encode()
            row = txn.get(bkey, db=self._keys)
            if row is None:
                continue
            txn.delete(row, db=self._rows)
            txn.delete(bkey, db=self._keys)
            settled.append(from_u64(row))
        return settled

    def forget(self, row_ids: list[int]) -> None:
        for row_id in row_ids:
            self._in_flight.pop(row_id, None)
            self._first_sent.pop(row_id, None)

    def oldest_unreceipted_s(self) -> float | None:
        """Seconds since the oldest row still in flight was first published; None: none is."""
        if not self._first_sent:
            return None
        return round(time.monotonic() - min(self._first_sent.values()), 3)

    def pending(self) -> int:
        return self.store.count("outbox")

    def pump(self) -> int:
        """Publish overdue and new rows; returns how many records went out."""
        now = time.monotonic()
        overdue = takewhile(lambda row: now - row[1] >= self.redeliver_after_s, self._in_flight.items())
        due = [row_id for row_id, _ in overdue]  # in send order: the first one not overdue ends it
        rows = self._read(due, room=self.max_in_flight - len(self._in_flight) + len(due))
        for start in range(0, len(rows), self.batch):
            chunk = rows[start : start + self.batch]
            self._publish(self.topic, encode_envelope(self.source, [value for _, value in chunk]))
            for row_id, _ in chunk:
                self._in_flight[row_id] = now
                self._first_sent.setdefault(row_id, now)
                self._in_flight.move_to_end(row_id)
        return len(rows)

    def _read(self, due: list[int], room: int) -> list[tuple[int, bytes]]:
        """The overdue rows still owed, then as many never sent as there is room for."""
        rows: list[tuple[int, bytes]] = []
        with self.store.read() as txn:
            for row_id in due:
                value = txn.get(u64(row_id), db=self._rows)
                if value is None:
                    self._in_flight.pop(row_id, None)
                    self._first_sent.pop(row_id, None)
                else:
                    rows.append((row_id, value))
            room -= len(rows)
            cursor = txn.cursor(db=self._rows)
            if room > 0 and cursor.set_range(u64(self._next_unsent)):
                for raw_id, value in cursor:
                    rows.append((from_u64(raw_id), value))
                    self._next_unsent = from_u64(raw_id) + 1
                    room -= 1
                    if room <= 0:
                        break
        return rows
