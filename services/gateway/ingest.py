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
   origin carries the same idempotency key and was recorded inside the window before it;
5. an appended entry whose ``recorded_at`` is earlier than the entry before it is accepted and
   flagged (``time_flags``, the answer's ``time_backwards``): its chain is valid and the edge
   cannot rewrite it, so refusing it would only stop the origin's uplink for good; the flag is
   what an auditor looks at (``shared.ledger.timeline``).

Keys: a registered key may sign until a ``key_rotation`` entry it signed retires it; the new
key the rotation names is accepted from its ``effective_seq`` on (``shared.ledger.entry.KeySchedule``),
without any registration: the old key vouched for it. A key the origin never had is
``unknown_key``; a retired key, or a new key before its seq, is ``retired_key``; a rotation
entry that is malformed or contradicts the schedule is ``bad_rotation``.

Steps 1 (the hash), 3 and 4 and the key schedule are ``shared.ledger.verify.check_entry``, the
same check the edge's audit and chain verification run; this module only maps its refusals to
the answers above and keeps the evidence. The origin's Merkle tree (``tree.OriginTree``) grows
in the same transaction as the entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any

import msgspec

from services.gateway.storage import ForkEvidence, HeldEntry, NewEntry, Tx
from services.gateway.tree import OriginTree
from shared.ledger.entry import MAX_SEQ, Rotation, SignedEntry, entry_hash
from shared.ledger.timeline import Backwards, TimeOrder
from shared.ledger.verify import (
    BEHIND,
    FORK,
    GAP,
    UNKNOWN_KEY,
    Chain,
    CheckedEntry,
    EntryRefused,
    check_entry,
)
from shared.runtime.clock import utc_text


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
    time_backwards: list[Backwards] = field(default_factory=list)
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
        if self.time_backwards:
            out["time_backwards"] = [b.as_dict() for b in self.time_backwards]
        if self.error is not None:
            out["error"] = self.error.as_dict()
        return out


class _Replay(Exception):
    """The row is an entry already held: acknowledge it again, store nothing."""


def _decode_rows(raw_rows: list[bytes]) -> tuple[list[Row], BatchError | None]:
    """The rows up to the first that is not a ledger export row, and that row's error."""
    rows: list[Row] = []
    for index, raw in enumerate(raw_rows):
        try:
            rows.append(_row_decoder.decode(raw))
        except msgspec.DecodeError as exc:
            return rows, BatchError(422, "malformed_row", f"row {index} is not a ledger export row: {exc}", index)
    return rows, None


def _signed(row: Row, index: int) -> SignedEntry:
    try:
        entry = row.entry.encode("utf-8")
    except UnicodeEncodeError:
        raise _RowRefused(BatchError(422, "malformed_row", f"seq {row.seq}: the entry is not valid Unicode",
                                     index, row.seq)) from None
    return SignedEntry(row.seq, row.idempotency_key, entry, row.hash, bytes.fromhex(row.signature), row.kid)


class _RowRefused(Exception):
    def __init__(self, error: BatchError, fork: ForkEvidence | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.fork = fork


def _same_as_held(held: HeldEntry | None, e: SignedEntry) -> bool:
    return (held is not None and held.hash == e.hash == entry_hash(e.entry) and held.signature == e.signature
            and held.idem == e.idem and held.kid == e.kid)


def _fork(seq: int, index: int, e: SignedEntry, reason: str, held_hash: str, message: str,
          **extra: str) -> _RowRefused:
    evidence = ForkEvidence(seq, e.hash, reason, held_hash, e.kid, e.entry, e.signature)
    return _RowRefused(BatchError(409, FORK, f"FORK at seq {seq}: {message}. The entry is kept as evidence and "
                                             "refused; this origin's chain needs investigation.", index, seq,
                                  {"held_hash": held_hash, **extra}), evidence)


def _refusal(refused: EntryRefused, index: int, e: SignedEntry, held: HeldEntry | None,
             origin: str) -> Exception:
    """What a refusal of ``check_entry`` means for the gateway: a replay, or the row's error."""
    seq = refused.seq
    if refused.code == BEHIND:
        if held is not None and held.hash == e.hash:
            return _Replay()  # the same entry with another valid signature over it: nothing new to store
        held_hash = held.hash if held is not None else ""
        reason = f"a different entry (hash {held_hash}) is already held at seq {seq}"
        return _fork(seq, index, e, reason, held_hash, f"{reason}; received hash {e.hash}", received_hash=e.hash)
    if refused.code == FORK:
        head_hash, prev = refused.context["held_hash"], refused.context["received_prev"]
        reason = f"prev {prev} does not link to the held entry at seq {seq - 1} (hash {head_hash})"
        return _fork(seq, index, e, reason, head_hash, reason, received_prev=prev)
    if refused.code == GAP:
        expected = refused.context["expected_seq"]
        return _RowRefused(BatchError(409, GAP, f"seq {seq} does not follow the head: expected seq {expected}",
                                      index, seq, {"expected_seq": expected}))
    message = f"seq {seq}: {refused.reason}"
    if refused.code == UNKNOWN_KEY:
        message += f", which is not registered for origin {origin!r} (mro-edge gateway register-edge)"
    extra = {"kid": refused.context["kid"]} if "kid" in refused.context else {}
    return _RowRefused(BatchError(422, refused.code, message, index, seq, extra))


def ingest_batch(tx: Tx, origin: str, raw_rows: list[bytes], window: timedelta, now: str) -> BatchResult:
    """Check and store ``raw_rows`` for ``origin`` inside ``tx``; the caller commits, then answers.

    Each row is ``shared.ledger.verify.check_entry`` against the origin's chain as held; a row
    the gateway already holds (same hash, signature, idem, kid) is a replay and is not checked again.
    """
    head_seq, head_hash = tx.lock_head(origin, now)
    result = BatchResult(origin, head_seq, head_hash)
    rows, decode_error = _decode_rows(raw_rows)
    if not rows:
        result.error = decode_error
        return result

    chain = Chain(tx.key_schedule(origin), next_seq=head_seq + 1, prev=head_hash, origin=origin)
    held = tx.held(origin, sorted({r.seq for r in rows if r.seq <= head_seq}))
    history = tx.idem_history(origin, (r.idempotency_key for r in rows))
    new: list[NewEntry] = []
    rotations: list[Rotation] = []
    time_order = TimeOrder(head_seq, tx.recorded_at(origin, head_seq)) if head_seq >= 0 else TimeOrder()

    def vet_rotation(rotation: Rotation) -> None:
        others = [o for o in tx.origins_of_kid(rotation.new_kid) if o != origin]
        if others:
            raise ValueError(f"key {rotation.new_kid} is registered for origin {others[0]!r}")

    error: BatchError | None = None
    for index, row in enumerate(rows):
        try:
            signed = _signed(row, index)
            stored = held.get(row.seq) if row.seq <= result.head_seq else None
            if _same_as_held(stored, signed):
                raise _Replay()
            try:
                checked = check_entry(chain, signed, vet_rotation=vet_rotation)
            except EntryRefused as refused:
                raise _refusal(refused, index, signed, stored, origin) from None
        except _Replay:
            _count_replay(result, held[row.seq])
            continue
        except _RowRefused as refused:
            error, result.fork = refused.error, refused.fork
            break
        if checked.rotation is not None:
            rotations.append(checked.rotation)
        added = _new_entry(checked, history, window, result)
        if (backwards := time_order.see(added.seq, added.recorded_at)) is not None:
            result.time_backwards.append(backwards)
        new.append(added)
        held[added.seq] = HeldEntry(added.seq, added.hash, added.idem, added.kid, added.signature,
                                    added.duplicate_of)
        result.head_seq, result.head_hash = added.seq, added.hash
        result.accepted += 1

    result.error = error or decode_error
    _store(tx, origin, result, new, rotations, now)
    return result


def _count_replay(result: BatchResult, stored: HeldEntry) -> None:
    result.replayed += 1
    if stored.duplicate_of is not None:
        result.duplicates.append({"seq": stored.seq, "duplicate_of": stored.duplicate_of})


def _new_entry(checked: CheckedEntry, history: dict[str, list[tuple[int, str]]], window: timedelta,
               result: BatchResult) -> NewEntry:
    """The row to store, flagged as a business duplicate of the first earlier entry of the origin with
    its idempotency key recorded inside the window before it."""
    e, recorded_at = checked.signed, checked.entry.recorded_at
    duplicate_of = None
    earlier = history.get(e.idem)
    if earlier:
        try:
            start = utc_text(checked.recorded_at - window)
        except OverflowError:
            start = ""
        inside = [s for s, at in earlier if at >= start]
        if inside:
            duplicate_of = inside[0]
            result.duplicates.append({"seq": e.seq, "duplicate_of": duplicate_of})
    history.setdefault(e.idem, []).append((e.seq, recorded_at))
    return NewEntry(e.seq, e.hash, e.idem, e.kid, recorded_at, e.entry, e.signature, duplicate_of)


def _store(tx: Tx, origin: str, result: BatchResult, new: list[NewEntry], rotations: list[Rotation],
           now: str) -> None:
    """The accepted prefix, its Merkle leaves, the new head and rotations, and any fork evidence."""
    if new:
        tx.insert_entries(origin, new, now)
        tx.set_head(origin, result.head_seq, result.head_hash, now)
        tree = OriginTree(tx, origin)
        tree.extend([n.entry for n in new], new[0].seq)
        tree.flush()
        for rotation in rotations:
            tx.add_rotation(origin, rotation, now)
        tx.insert_time_flags(origin, result.time_backwards, now)
    if result.fork is not None:
        tx.insert_fork(origin, result.fork, now)
