"""Checkpoints of the sign stage's committed Merkle tree, signed beside the stage loop."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from shared.ledger.checkpoint import Checkpoint, sign_checkpoint
from shared.ledger.merkle import MERKLE_TABLE, lmdb_tree
from shared.ledger.store import (
    CHECKPOINTS_TABLE,
    LEDGER_TABLE,
    decode_entry,
    latest_checkpoint_path,
    ledger_view,
    write_latest_checkpoint,
)
from shared.runtime.store import u64
from shared.runtime.work import LmdbUnitOfWork

if TYPE_CHECKING:
    from services.sign.stage import Sign

CHECKPOINT_POLL_S = 0.2


class Checkpointer(threading.Thread):
    """Signs C2SP checkpoints of the committed tree, beside the stage loop.

    Whenever the tree has grown (at most every ``checkpoint_min_interval_s``) and at least every
    ``checkpoint_interval_s``: read the committed size and root, sign ``origin / size / root``
    with the key that signs the ledger's next entry, store the note in the ``checkpoints`` table
    (u64(size) -> note) and replace ``keys/checkpoint.latest``. It only ever reads committed
    state, so a checkpoint never covers an entry that could still be rolled back.
    """

    def __init__(self, stage: Sign, runtime) -> None:
        super().__init__(name="sign-checkpointer", daemon=True)
        self.stage = stage
        self.runtime = runtime
        self.store = runtime.store
        self.log = runtime.log
        self.path = latest_checkpoint_path(runtime.config)
        self.interval_s = runtime.config.ledger.checkpoint_interval_s
        self.min_interval_s = runtime.config.ledger.checkpoint_min_interval_s
        self.size = stage.checkpoint_size
        self.last_at = 0.0
        self.wake = threading.Event()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout=10)
        try:
            self.tick(final=True)
        except Exception as exc:
            self.log.error("final checkpoint failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.tick()
            except Exception as exc:
                self.log.error("checkpoint failed", error=f"{type(exc).__name__}: {str(exc)[:200]}",
                               state_transition="CHECKPOINT_FAILED")
                self._halt.wait(5.0)
            self.wake.wait(CHECKPOINT_POLL_S)
            self.wake.clear()

    def record_archival(self) -> bool:
        """Append the ``ledger_archived`` entry of a new archival (``mro-edge ledger archive``) now,
        rather than with the next record: one unit of work of the stage's own (``Sign.begin``
        appends it and forwards it to the uplink; the stage loop's outbox pump sends it)."""
        with ledger_view(self.store) as view:
            base = view.archived()
        if base is None or base.recorded_seq is not None:
            return False
        with self.store.write() as txn:
            uow = LmdbUnitOfWork(self.stage, self.runtime.topics, self.store, txn, self.runtime.outbox)
            self.stage.begin(uow)
            self.stage.finish(uow)
        for t in uow.transitions:
            self.log.info("ledger archival recorded", correlation_id=t.correlation_id, key=t.key,
                          state_transition=t.state, **t.extra)
        return True

    def tick(self, *, final: bool = False) -> bytes | None:
        """Sign a checkpoint if one is due; returns the note written, if any."""
        if not final:
            self.record_archival()
        now = time.monotonic()
        with self.store.read() as txn:
            tree = lmdb_tree(txn, self.store.table(MERKLE_TABLE), write=False)
            size = tree.size()
            if size == 0:
                return None
            cursor = txn.cursor(db=self.store.table(LEDGER_TABLE))
            cursor.last()
            head = decode_entry(cursor.value())
            root = tree.root(size)
        if head.seq != size - 1:
            raise ValueError(f"the ledger head is seq {head.seq} but the tree covers {size} entries")
        grown = size > self.size
        if not (grown and (final or now - self.last_at >= self.min_interval_s) or now - self.last_at
                >= self.interval_s):
            return None
        key = self.stage.signer(head)
        note = sign_checkpoint(Checkpoint(self.stage.origin, size, root), key).encode("utf-8")
        with self.store.write() as txn:
            db = self.store.table(CHECKPOINTS_TABLE)
            if txn.get(u64(size), db=db) != note:
                txn.put(u64(size), note, db=db)
        write_latest_checkpoint(self.path, note)
        if grown:
            self.log.info("checkpoint signed", size=size, root=root.hex(), kid=key.kid,
                          state_transition="CHECKPOINT_SIGNED")
        self.size, self.last_at = size, now
        return note
