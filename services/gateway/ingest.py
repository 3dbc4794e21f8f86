"""Verify a batch of uplinked ledger rows and store it exactly once (one transaction per batch).

Rows are the ledger export format (``shared.ledger.entry.export_row``). They are processed in order;
the good prefix is stored and the first bad row ends the batch with an error, so the answer's
head is always where the client continues (``head.seq + 1``).

Per row, in this order:

1. the row is well formed (``malformed_row``) and ``hash`` is SHA-256 of the exact entry bytes
   (``hash_mismatch``);
2. a row whose seq is already held with the same hash, signature, idem and kid is a replay:
   acknowledged again, stored nothing (the signature was verified when it was first stored);
3. otherwise the entry bytes are checked without re-encoding them: they parse as a ledger entry
   (``malformed_entry``) of a known version (``unsupported_version``), of the token's origin
   (``wrong_origin``), agreeing with the row's seq/idem/kid (``row_mismatch``), signed by a
   key registered for the origin (``unknown_key``) with a valid signature (``bad_signature``);
4. its place in the chain: a held seq with another hash is a ``fork`` (409, evidence kept);
   seq == head + 1 whose prev is not the head's hash is a ``fork`` as well (the edge's chain
   left ours earlier; evidence kept); seq > head + 1 is a ``gap`` (409, ``expected_seq``);
   otherwise it is appended, and flagged as a business duplicate when an earlier entry of the
   origin carries the same idempotency key and was recorded inside the window before it.

Keys: a registered key may sign until a ``key_rotation`` entry it signed retires it; the new
key the rotation names is accepted from its ``effective_seq`` on (``shared.ledger.entry.KeySchedule``),
without any registration: the old key vouched for it. A key the origin never had is
``unknown_key``; a retired key, or a new key before its seq, is ``retired_key``; a rotation
entry that is malformed or contradicts the schedule is ``bad_rotation``.

The origin's Merkle tree (``tree.OriginTree``) grows in the same transaction as the entries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any

import msgspec

from services.gateway.storage import ForkEvidence, HeldEntry, NewEntry, Tx
from services.gateway.tree import OriginTree
from shared.ledger.keys import verify_digest_signature
from shared.ledger.entry import GENESIS_PREV, KEY_ROTATION, LEDGER_VERSION, MAX_SEQ, Rotation, parse_entry, parse_rotation


class Row(msgspec.Struct, forbid_unknown_fields=True):
    """One uplinked row: exactly the fields of ``shared.ledger.entry.export_row``."""

    seq: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
    idempotency_key: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    entry: str
    hash: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    signature: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{128}$")]
    kid: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]


class Batch(msgspec.Struct, forbid_unknown_fields=True):
    entries: list[msgspec.Raw]


batch_decoder = msgspec.json.Decoder(Batch)
_row_decoder = msgspec.json.Decoder(Row)


@dataclass
class BatchError:
    status: int
    code: str
    message: str
    index: int
    seq: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "index": self.index}
        if self.seq is not None:
            out["seq"] = self.seq
        out.update(self.extra)
        return out


@dataclass
class BatchResult:
    origin: str
    head_seq: int
    head_hash: str
    accepted: int = 0
    replayed: int = 0
    duplicates: list[dict[str, int]] = field(default_factory=list)
    error: BatchError | None = None
    fork: ForkEvidence | None = None

    @property
    def status(self) -> int:
        return self.error.status if self.error else 200

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "origin": self.origin,
            "head": {"seq": self.head_seq, "hash": self.head_hash},
            "accepted": self.accepted,
            "replayed": self.replayed,
            "duplicates": self.duplicates,
        }
        if self.error is not None:
            out["error"] = self.error.as_dict()
        return out


def _window_start(recorded_at: datetime, window: timedelta) -> str:
    """``recorded_at`` minus the window, in the entries' fixed-width form (so strings compare as times)."""
    try:
        start = recorded_at - window
    except OverflowError:
        return ""
    return f"{start.year:04d}-{start.month:02d}-{start.day:02d}T{start.hour:02d}:{start.minute:02d}:" \
           f"{start.second:02d}.{start.microsecond // 1000:03d}Z"


def ingest_batch(tx: Tx, origin: str, raw_rows: list[bytes], window: timedelta, now: str) -> BatchResult:
    """Check and store ``raw_rows`` for ``origin`` inside ``tx``; the caller commits, then answers."""
    head_seq, head_hash = tx.lock_head(origin, now)
    result = BatchResult(origin, head_seq, head_hash)

    rows: list[Row] = []
    decode_error: BatchError | None = None
    for index, raw in enumerate(raw_rows):
        try:
            rows.append(_row_decoder.decode(raw))
        except msgspec.DecodeError as exc:
            decode_error = BatchError(422, "malformed_row", f"row {index} is not a ledger export row: {exc}", index)
            break

    if not rows:
        result.error = decode_error
        return result

    schedule = tx.key_schedule(origin)
    rotations: list[Rotation] = []
    held = tx.held(origin, sorted({r.seq for r in rows if r.seq <= head_seq}))
    history = tx.idem_history(origin, (r.idempotency_key for r in rows))
    new: list[NewEntry] = []
    error: BatchError | None = None

    for index, row in enumerate(rows):
        seq = row.seq
        try:
            entry = row.entry.encode("utf-8")
        except UnicodeEncodeError:
            error = BatchError(422, "malformed_row", f"seq {seq}: the entry is not valid Unicode", index, seq)
            break
        digest = hashlib.sha256(entry).hexdigest()
        if digest != row.hash:
            error = BatchError(422, "hash_mismatch", f"seq {seq}: hash is not SHA-256 of the entry bytes", index, seq)
            break
        signature = bytes.fromhex(row.signature)
        stored = held.get(seq) if seq <= result.head_seq else None
        if (
            stored is not None
            and stored.hash == digest
            and stored.signature == signature
            and stored.idem == row.idempotency_key
            and stored.kid == row.kid
        ):
            result.replayed += 1
            if stored.duplicate_of is not None:
                result.duplicates.append({"seq": seq, "duplicate_of": stored.duplicate_of})
            continue

        try:
            parsed = parse_entry(entry)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            error = BatchError(422, "malformed_entry", f"seq {seq}: the entry bytes are not a ledger entry: {exc}",
                               index, seq)
            break
        if parsed.v != LEDGER_VERSION:
            error = BatchError(422, "unsupported_version",
                               f"seq {seq}: ledger version {parsed.v}; this gateway knows {LEDGER_VERSION}", index, seq)
            break
        try:
            recorded_at = datetime.fromisoformat(parsed.recorded_at)
        except ValueError:
            error = BatchError(422, "malformed_entry",
                               f"seq {seq}: recorded_at {parsed.recorded_at!r} is not a valid time", index, seq)
            break
        if parsed.origin != origin:
            error = BatchError(422, "wrong_origin",
                               f"seq {seq}: the entry belongs to origin {parsed.origin!r} but this token is bound "
                               f"to {origin!r}", index, seq)
            break
        if (parsed.seq, parsed.idem, parsed.kid) != (seq, row.idempotency_key, row.kid):
            error = BatchError(422, "row_mismatch",
                               f"seq {seq}: the entry bytes say seq={parsed.seq} idem={parsed.idem} "
                               f"kid={parsed.kid}, the row says seq={seq} idem={row.idempotency_key} "
                               f"kid={row.kid}", index, seq)
            break
        if row.kid not in schedule.keys:
            error = BatchError(422, "unknown_key",
                               f"seq {seq}: signed with key {row.kid}, which is not registered for origin "
                               f"{origin!r} (mro-edge gateway register-edge)", index, seq, {"kid": row.kid})
            break
        try:
            public = schedule.key_for(row.kid, seq)
        except ValueError as exc:
            error = BatchError(422, "retired_key", f"seq {seq}: {exc}", index, seq, {"kid": row.kid})
            break
        if not verify_digest_signature(public, entry, signature):
            error = BatchError(422, "bad_signature",
                               f"seq {seq}: the signature is not valid for key {row.kid}", index, seq,
                               {"kid": row.kid})
            break

        if seq <= result.head_seq:
            if stored is not None and stored.hash == digest:
                # Same entry, another valid signature over it: nothing new to store.
                result.replayed += 1
                if stored.duplicate_of is not None:
                    result.duplicates.append({"seq": seq, "duplicate_of": stored.duplicate_of})
                continue
            held_hash = stored.hash if stored is not None else ""
            reason = f"a different entry (hash {held_hash}) is already held at seq {seq}"
            result.fork = ForkEvidence(seq, digest, reason, held_hash, row.kid, entry, signature)
            error = BatchError(409, "fork",
                               f"FORK at seq {seq}: {reason}; received hash {digest}. The entry is kept as "
                               f"evidence and refused; this origin's chain needs investigation.", index, seq,
                               {"held_hash": held_hash, "received_hash": digest})
            break
        if seq > result.head_seq + 1:
            expected = result.head_seq + 1
            error = BatchError(409, "gap", f"seq {seq} does not follow the head: expected seq {expected}",
                               index, seq, {"expected_seq": expected})
            break
        if parsed.prev != result.head_hash:
            if seq == 0:
                error = BatchError(422, "malformed_entry", f"seq 0: prev must be {GENESIS_PREV}", index, seq)
                break
            reason = (f"prev {parsed.prev} does not link to the held entry at seq {seq - 1} "
                      f"(hash {result.head_hash})")
            result.fork = ForkEvidence(seq, digest, reason, result.head_hash, row.kid, entry, signature)
            error = BatchError(409, "fork",
                               f"FORK at seq {seq}: {reason}. The entry is kept as evidence and refused; "
                               f"this origin's chain needs investigation.", index, seq,
                               {"held_hash": result.head_hash, "received_prev": parsed.prev})
            break

        if parsed.type == KEY_ROTATION:
            try:
                rotation = parse_rotation(parsed)
                others = [o for o in tx.origins_of_kid(rotation.new_kid) if o != origin]
                if others:
                    raise ValueError(f"key {rotation.new_kid} is registered for origin {others[0]!r}")
                schedule.apply(rotation)
            except ValueError as exc:
                error = BatchError(422, "bad_rotation", f"seq {seq}: key rotation refused: {exc}", index, seq,
                                   {"kid": row.kid})
                break
            rotations.append(rotation)

        duplicate_of = None
        earlier = history.get(row.idempotency_key)
        if earlier:
            start = _window_start(recorded_at, window)
            inside = [s for s, at in earlier if at >= start]
            if inside:
                duplicate_of = inside[0]
                result.duplicates.append({"seq": seq, "duplicate_of": duplicate_of})
        history.setdefault(row.idempotency_key, []).append((seq, parsed.recorded_at))
        new.append(NewEntry(seq, digest, row.idempotency_key, row.kid, parsed.recorded_at, entry, signature,
                            duplicate_of))
        held[seq] = HeldEntry(seq, digest, row.idempotency_key, row.kid, signature, duplicate_of)
        result.head_seq, result.head_hash = seq, digest
        result.accepted += 1

    if error is None:
        error = decode_error
    result.error = error
    if new:
        tx.insert_entries(origin, new, now)
        tx.set_head(origin, result.head_seq, result.head_hash, now)
        tree = OriginTree(tx, origin)
        tree.extend([n.entry for n in new], new[0].seq)
        tree.flush()
        for rotation in rotations:
            tx.add_rotation(origin, rotation, now)
    if result.fork is not None:
        tx.insert_fork(origin, result.fork, now)
    return result
