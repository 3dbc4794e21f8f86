"""Sign: append each validated record to the hash-chained, Ed25519-signed ledger exactly once.

The dedupe check, the entry, its Merkle leaf (and the tree nodes it completes), the chain head
and the seen-key land in one transaction, so a record delivered twice (re-send, redelivery,
restart) is appended once and the tree never disagrees with the entries. Device `recorded`
receipts and outcome notices leave only after the commit; signed checkpoints are made from
committed state only (``services.sign.checkpointer.Checkpointer``).

Before the first append, ``open`` refuses to start (``guard.SignRefused``: alarm, then exit)
if the store is damaged, or behind / forked from what was already signed or acknowledged.

Key rotation (``mro-edge keys rotate`` writes ``keys/ledger.next.key``): at its next batch the
stage appends a ``key_rotation`` entry signed by the old key, naming the new key and the seq
from which it signs, and signs everything after it with the new key, all in one transaction.
Which key signs next is always derived from the committed ledger (the head entry), never from
memory, so an aborted batch or a crash between the commit and the key file's rename is
harmless: the next batch (or start) finishes the rename.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import msgspec

from services.sign.checkpointer import Checkpointer
from services.sign.guard import (
    LedgerDamagedError,
    SignRefused,
    check_acknowledged,
    check_checkpoint,
    check_tree,
    refuse,
)
from shared.contract import FieldError, error_report
from shared.ledger.canonical import canonical_json, sha256_hex
from shared.ledger.entry import (
    GENESIS_PREV,
    KEY_ROTATION,
    SignedEntry,
    entry_bytes,
    export_row,
    parse_entry,
    parse_rotation,
    rotation_body,
    sign_entry,
)
from shared.ledger.keys import KeyFileError, LedgerKeyFiles, SigningKey
from shared.ledger.merkle import MERKLE_TABLE, MerkleTree, leaf_hash, lmdb_tree
from shared.ledger.store import (
    ARCHIVED_TABLE,
    LEDGER_TABLE,
    SIGN_TABLES,
    ArchivedBase,
    decode_entry,
    encode_base,
    encode_entry,
    pending_archival,
)
from shared.ledger.timeline import CLOCK_STEP, clock_step_body
from shared.runtime.alarms import alarm_payload
from shared.runtime.clock import Step, StepWatch, clock_sync, parse_utc, utc_now
from shared.runtime.handler import Stage
from shared.runtime.messages import (
    SERVICE_KIND,
    DeviceRef,
    DlqRedrive,
    SchemaChange,
    SignedRow,
    ValidatedRecord,
    WorkSessionClosed,
    WorkSessionOpened,
    json_encode,
    record_body,
)
from shared.runtime.store import u64
from shared.runtime.verdicts import Recorded, Rejected, Verdict
from shared.runtime.work import UnitOfWork

CONTROL_PLANE = DeviceRef(SERVICE_KIND, "validate")  # services.validate.changes.CONTROL_DEVICE
SESSION_PLANE = DeviceRef(SERVICE_KIND, "ingest")  # services.ingest.sessions.SESSION_DEVICE
ENTRY_SOURCE_RULE = "entry_source"


def entry_source_error(item: ValidatedRecord) -> FieldError | None:
    """Sign signs only what the stage entitled to send it may send: a `schema_change` or a
    `dlq_redrive` only from validate's control plane, a contract record only for the fleet device
    that made it (whose receipt it answers), a work session entry only from ingest's session plane.
    Hop authentication already proves validate sent the batch; this keeps
    a record from speaking for another device or for the box itself."""
    record, device = item.record, item.device
    if isinstance(record, SchemaChange | DlqRedrive):
        if device == CONTROL_PLANE:
            return None
        expected = f"a {record.type} from {CONTROL_PLANE.kind}/{CONTROL_PLANE.id}"
    elif isinstance(record, WorkSessionOpened | WorkSessionClosed):
        if device == SESSION_PLANE:
            return None
        expected = f"a {record.type} from {SESSION_PLANE.kind}/{SESSION_PLANE.id}"
    else:
        if device.kind != SERVICE_KIND and (device.kind, device.id) == (record.device.kind, record.device.id):
            return None
        expected = f"a {record.type} sent for its own device {record.device.kind}/{record.device.id}"
    return FieldError("$.device", ENTRY_SOURCE_RULE, expected, f"{device.kind[:32]}/{device.id[:40]}")


def next_signer(head: SignedEntry | None, first_kid: str) -> str:
    """The kid that signs the entry after ``head``: the rotation's new key right after a
    ``key_rotation`` entry, otherwise the head's own key (``first_kid`` for an empty ledger)."""
    if head is None:
        return first_kid
    parsed = parse_entry(head.entry)
    if parsed.type == KEY_ROTATION:
        rotation = parse_rotation(parsed)
        if rotation.effective_seq == head.seq + 1:
            return rotation.new_kid
    return head.kid


@dataclass
class _Batch:
    """Where the batch appends: the next seq, the previous hash, the signing key, the leaves so far."""

    seq: int
    prev: str
    key: SigningKey
    tree: MerkleTree
    last_recorded_at: str = ""  # the head's: no entry is stamped earlier (shared.ledger.timeline)
    leaves: list[bytes] = field(default_factory=list)


def _row(signed: SignedEntry) -> msgspec.Raw:
    return msgspec.Raw(json_encode(export_row(signed)))


class Sign(Stage[ValidatedRecord]):
    name = "sign"
    input_type = ValidatedRecord
    downstream = "uplink"
    tables = SIGN_TABLES
    accepted_state = "SIGNED"
    refuse = staticmethod(refuse)  # alarm + log before a refusal propagates (replaceable in tests)
    run_checkpointer = True  # False: checkpoints only on demand (``Checkpointer.tick``), e.g. in tools

    def open(self, runtime) -> None:
        config = runtime.config
        self.runtime = runtime
        self.origin = config.origin
        self.log = runtime.log
        self.key_files = LedgerKeyFiles(config.data_path / "keys")
        try:
            self._open_checked(runtime)
        except SignRefused as exc:
            self.refuse(config, exc)
            raise
        self._open_steps(config.clock.step_threshold_s)
        self.checkpointer = Checkpointer(self, runtime)
        if self.run_checkpointer:
            self.checkpointer.start()

    def _open_checked(self, runtime) -> None:
        config, store = runtime.config, runtime.store
        try:
            current = self.key_files.current()
            pending = self.key_files.pending()
            publics = self.key_files.public_keys()
        except KeyFileError as exc:
            raise SignRefused("ledger_key", f"cannot load the ledger keys: {exc}") from None
        # Only the current and a pending key ever sign; a retired key is never loaded for signing.
        self._keys: dict[str, SigningKey] = {k.kid: k for k in (current, *([pending] if pending else []))}
        self._current = current
        self._key_lock = threading.Lock()
        count = check_tree(store)
        with store.read() as txn:
            cursor = txn.cursor(db=store.table(LEDGER_TABLE))
            head = decode_entry(cursor.value()) if cursor.last() else None
        try:
            key = self.signer(head)
        except (KeyFileError, ValueError) as exc:
            raise SignRefused("ledger_key", f"{exc}") from None
        with store.read() as txn:
            tree = lmdb_tree(txn, store.table(MERKLE_TABLE), write=False)
            self.checkpoint_size = check_checkpoint(config, count, tree.root, publics)
        self.acked = check_acknowledged(config, count)
        self.log.info("ledger open", entries=count, kid=key.kid, checkpoint_size=self.checkpoint_size,
                      acked=self.acked, state_transition="LEDGER_OPEN")

    # -- the clock
    def _open_steps(self, threshold_s: float) -> None:
        """Start watching for clock steps. A clock set back while sign was down shows only
        against the ledger: a head stamped later than now is such a step (from the head's time)."""
        self.steps = StepWatch(threshold_s)
        self.steps.check()
        self._pending_step: Step | None = None
        with self.runtime.store.read() as txn:
            cursor = txn.cursor(db=self.runtime.store.table(LEDGER_TABLE))
            head = decode_entry(cursor.value()) if cursor.last() else None
        if head is not None:
            stamped = parse_utc(parse_entry(head.entry).recorded_at).timestamp()
            wall = self.steps.clock.time()
            if stamped - wall > threshold_s:
                self._pending_step = Step(stamped, wall)

    def wants_turn(self) -> bool:
        """A step seen while no record arrives is recorded at once, not with the next record."""
        if self._pending_step is None:
            self._pending_step = self.steps.check()
        return self._pending_step is not None

    def _record_step(self, uow: UnitOfWork) -> None:
        """Append the step seen, if any; it stays pending until the batch finishes (`finish`), so a
        batch that fails and is retried (or isolated record by record) still records it."""
        step = self._pending_step = self._pending_step or self.steps.check()
        if step is None:
            return
        body = clock_step_body(step.body(), clock_sync().synchronised)
        idem = sha256_hex(canonical_json({CLOCK_STEP: body, "origin": self.origin}))
        seq = self._batch.seq
        signed = self._append(idem, CLOCK_STEP, body, uow)
        uow.forward(SignedRow(idem, None, seq, _row(signed)))
        uow.note(None, idem, "CLOCK_STEP_APPENDED", seq=seq, **body)
        held = "" if body["delta_ms"] > 0 else (f"; recorded_at stays at {self._batch.last_recorded_at} until "
                                                 "the clock passes it")
        detail = (f"the box's clock stepped {body['delta_ms'] / 1000:+.3f} s (from {body['from']} to "
                  f"{body['to']}), recorded as ledger entry seq {seq}{held}")
        uow.publish(uow.topics.alarm, alarm_payload(self.name, CLOCK_STEP, detail))

    # -- keys
    def signer(self, head: SignedEntry | None) -> SigningKey:
        """The key that signs the entry after ``head`` (committed state), finishing a rotation whose
        entry has committed but whose key file was not renamed yet. Called by both threads."""
        with self._key_lock:
            kid = next_signer(head, self._current.kid)
            key = self._keys.get(kid)
            if kid != self._current.kid:
                pending = self.key_files.pending()
                if pending is not None and pending.kid == kid:
                    retired = self._current.kid
                    key = self._current = self.key_files.complete_rotation(kid)
                    self._keys = {kid: key}  # the retired key is dropped: it never signs again
                    self.log.info("key rotation complete", kid=kid, retired=retired,
                                  state_transition="KEY_ROTATED")
        if key is None:
            raise KeyFileError(
                f"the ledger's next entry must be signed by key {kid} "
                f"(its head is seq {head.seq if head else '-'}), but {self.key_files.dir} does not hold "
                f"that key: restore ledger.key of {kid} from your key backup. "
                "The service never signs with a key the ledger did not introduce.")
        return key

    # -- appending
    def begin(self, uow: UnitOfWork) -> None:
        """The batch's chain head and signing key, from committed state; a staged key takes over
        with a rotation entry first."""
        last = uow.last(LEDGER_TABLE)
        head = decode_entry(last[1]) if last else None
        seq, prev = (head.seq + 1, head.hash) if head else (0, GENESIS_PREV)
        key = self.signer(head)
        tree = MerkleTree(lambda k: uow.get(MERKLE_TABLE, k), lambda k, v: uow.put(MERKLE_TABLE, k, v))
        if tree.size() != seq:
            raise LedgerDamagedError("ledger_damaged", f"the Merkle tree covers {tree.size()} entries but "
                                     f"the ledger holds {seq}: refusing to append")
        self._batch = _Batch(seq, prev, key, tree, parse_entry(head.entry).recorded_at if head else "")
        pending = self.key_files.pending()
        if pending is not None and pending.kid != key.kid:
            if pending.kid in self._retired_kids():
                raise KeyFileError(f"{self.key_files.next_path} holds key {pending.kid}, which this ledger "
                                   "used before: a retired key never signs again; stage a fresh one "
                                   "(mro-edge keys rotate)")
            self._append_rotation(key, pending, uow)
            self._batch.key = pending
            self._keys[pending.kid] = pending
        archival = pending_archival(uow.last)
        if archival is not None:
            self._append_archival(archival, uow)
        self._record_step(uow)

    def judge(self, item: ValidatedRecord, uow: UnitOfWork) -> Verdict:
        record = item.record
        error = entry_source_error(item)
        if error is not None:
            return Rejected(error_report(stage=self.name, errors=[error], received_at=utc_now(),
                                         event_id=record.event_id, idempotency_key=item.key))
        signed = self._append(item.key, record.type, record_body(record), uow)
        return Recorded(signed.seq, SignedRow(item.key, record.event_id, signed.seq, _row(signed)))

    def finish(self, uow: UnitOfWork) -> None:
        self._batch.tree.extend(self._batch.leaves)
        self._pending_step = None

    def _append(self, idem: str, entry_type: str, body: dict, uow: UnitOfWork,
                key: SigningKey | None = None) -> SignedEntry:
        batch = self._batch
        signer = key or batch.key
        recorded_at = batch.last_recorded_at = max(utc_now(), batch.last_recorded_at)  # never backwards
        entry = entry_bytes(origin=self.origin, seq=batch.seq, prev=batch.prev, idem=idem, kid=signer.kid,
                            recorded_at=recorded_at, type=entry_type, body=body)
        signed = sign_entry(signer, entry, batch.seq, idem)
        uow.put(LEDGER_TABLE, u64(batch.seq), encode_entry(signed), append=True)
        batch.leaves.append(leaf_hash(entry))
        batch.seq, batch.prev = batch.seq + 1, signed.hash
        return signed

    def _retired_kids(self) -> set[str]:
        """kids of ``keys/retired/ledger.<kid>.key`` and ``.pub.pem``: keys that never sign again."""
        return {p.name.split(".")[1] for p in (self.key_files.dir / "retired").glob("ledger.*")}

    def _append_rotation(self, old: SigningKey, new: SigningKey, uow: UnitOfWork) -> None:
        seq = self._batch.seq
        body = rotation_body(new.public_bytes, seq + 1)
        idem = sha256_hex(canonical_json({"key_rotation": body, "origin": self.origin}))
        signed = self._append(idem, KEY_ROTATION, body, uow, key=old)
        uow.forward(SignedRow(idem, None, seq, _row(signed)))
        uow.note(None, idem, "KEY_ROTATION_APPENDED", seq=seq, old_kid=old.kid, new_kid=new.kid)

    def _append_archival(self, base: ArchivedBase, uow: UnitOfWork) -> None:
        """The ledger's own record of ``mro-edge ledger archive`` (which cannot sign): what left the
        box, under which root, into which archive, by whom; stored as recorded in the same transaction."""
        from shared.ledger.archive import LEDGER_ARCHIVED, archival_body

        body = archival_body(base)
        idem = sha256_hex(canonical_json({LEDGER_ARCHIVED: body, "origin": self.origin}))
        seq = self._batch.seq
        signed = self._append(idem, LEDGER_ARCHIVED, body, uow)
        uow.forward(SignedRow(idem, None, seq, _row(signed)))
        uow.put(ARCHIVED_TABLE, u64(base.n), encode_base(msgspec.structs.replace(base, recorded_seq=seq)))
        uow.note(None, idem, "LEDGER_ARCHIVED_APPENDED", seq=seq, archived_count=base.n,
                 manifest_sha256=base.manifest_sha256)

    def status_extra(self) -> dict:
        cp = getattr(self, "checkpointer", None)
        return {"checkpoint_size": cp.size if cp else None,
                "rotation_pending": self.key_files.next_path.exists(), "clock": clock_sync().as_dict()}

    def close(self) -> None:
        cp = getattr(self, "checkpointer", None)
        if cp is not None:
            cp.stop()
