"""The one check of a ledger entry against the chain so far, and the one rollback check.

``check_entry`` is used by every verifier of the project: the streaming chain check
(``verify_chain``, the audit), and the central gateway for each uplinked row. It checks, in
this order, and raises ``EntryRefused`` with a stable ``code`` at the first problem:

1. ``hash_mismatch``: the row's hash is not SHA-256 of the exact entry bytes;
2. ``malformed_entry``: the bytes do not parse as an entry (without re-encoding them), or
   ``recorded_at`` is not a real time;
3. ``unsupported_version``; 4. ``wrong_origin`` (when the chain names its origin);
5. ``row_mismatch``: the row's seq/idem/kid disagree with the entry bytes;
6. ``unknown_key`` / ``retired_key``: the key schedule (rotations included) does not let the
   named key sign this seq; 7. ``bad_signature``;
8. its place: ``gap`` (a seq after the next one), ``behind`` (a seq the chain already holds:
   a verifier holding those entries decides between a replay and a fork), ``fork`` (the next
   seq, linked to something other than the chain's head; at seq 0 not linked to the genesis
   value: ``malformed_entry``);
9. ``bad_rotation``: a ``key_rotation`` entry that is malformed or contradicts the schedule.

A checked entry advances the chain (next seq, prev hash, and the rotation taken up).

``check_length`` / ``check_roots`` compare a ledger with what it already vouched for (signed
checkpoints, the count the gateway acknowledged): the sign service's start-up guard and the
audit export refuse a store that is behind (rolled back) or holds another history (a fork).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

import msgspec

from shared.ledger.entry import (
    GENESIS_PREV,
    KEY_ROTATION,
    LEDGER_VERSION,
    KeySchedule,
    LedgerEntry,
    Rotation,
    SignedEntry,
    entry_hash,
    parse_entry,
    parse_rotation,
)
from shared.ledger.keys import verify_digest_signature

HASH_MISMATCH = "hash_mismatch"
MALFORMED_ENTRY = "malformed_entry"
UNSUPPORTED_VERSION = "unsupported_version"
WRONG_ORIGIN = "wrong_origin"
ROW_MISMATCH = "row_mismatch"
UNKNOWN_KEY = "unknown_key"
RETIRED_KEY = "retired_key"
BAD_SIGNATURE = "bad_signature"
GAP = "gap"
BEHIND = "behind"
FORK = "fork"
BAD_ROTATION = "bad_rotation"


class EntryRefused(Exception):
    """The entry at ``seq`` (the row's seq) does not continue the chain.

    ``code`` is one of the constants above (the gateway answers with it), ``reason`` says what
    was found; ``context`` holds machine-readable details (``kid``, ``expected_seq``,
    ``held_hash``, ``received_prev``).
    """

    def __init__(self, code: str, seq: int, reason: str, **context: Any) -> None:
        super().__init__(f"seq {seq}: {reason}")
        self.code = code
        self.seq = seq
        self.reason = reason
        self.context = context


class CheckedEntry(msgspec.Struct, frozen=True):
    """An entry that continues the chain: the row, what its bytes say, and the rotation it announced."""

    signed: SignedEntry
    entry: LedgerEntry
    recorded_at: datetime
    rotation: Rotation | None = None


class Chain:
    """The chain verified so far: the seq the next entry must have, the hash it must link to, and
    the key schedule (trusted keys extended by the rotations taken up). ``origin``, when set, is
    the only origin an entry may name."""

    def __init__(self, schedule: KeySchedule, *, next_seq: int = 0, prev: str = GENESIS_PREV,
                 origin: str | None = None) -> None:
        self.schedule = schedule
        self.next_seq = next_seq
        self.prev = prev
        self.origin = origin


def check_entry(chain: Chain, e: SignedEntry, *,
                vet_rotation: Callable[[Rotation], None] | None = None) -> CheckedEntry:
    """Check ``e`` against ``chain`` (steps in the module doc) and advance the chain past it.

    ``vet_rotation`` may refuse a well-formed rotation for reasons only the caller knows (the
    gateway: the new key belongs to another origin) by raising ValueError.
    """
    seq = e.seq
    if e.hash != entry_hash(e.entry):
        raise EntryRefused(HASH_MISMATCH, seq, "hash does not match SHA-256 of the entry bytes")
    parsed, recorded_at = _parse(e)
    if chain.origin is not None and parsed.origin != chain.origin:
        raise EntryRefused(WRONG_ORIGIN, seq,
                           f"the entry belongs to origin {parsed.origin!r}, the chain to {chain.origin!r}")
    _check_row(e, parsed)
    _check_signature(chain.schedule, e)
    _check_place(chain, e, parsed)
    rotation = _rotation(chain.schedule, parsed, vet_rotation) if parsed.type == KEY_ROTATION else None
    if rotation is not None:
        chain.schedule.apply(rotation)
    chain.next_seq, chain.prev = seq + 1, e.hash
    return CheckedEntry(e, parsed, recorded_at, rotation)


def _parse(e: SignedEntry) -> tuple[LedgerEntry, datetime]:
    try:
        parsed = parse_entry(e.entry)
    except ValueError as exc:
        raise EntryRefused(MALFORMED_ENTRY, e.seq,
                           f"entry bytes are not a well-formed ledger entry: {exc}") from None
    if parsed.v != LEDGER_VERSION:
        raise EntryRefused(UNSUPPORTED_VERSION, e.seq,
                           f"entry has ledger version {parsed.v}, this verifier knows {LEDGER_VERSION}")
    try:
        recorded_at = datetime.fromisoformat(parsed.recorded_at)
    except ValueError:
        raise EntryRefused(MALFORMED_ENTRY, e.seq,
                           f"recorded_at {parsed.recorded_at!r} is not a valid time") from None
    return parsed, recorded_at


def _check_row(e: SignedEntry, parsed: LedgerEntry) -> None:
    if parsed.seq != e.seq:
        raise EntryRefused(ROW_MISMATCH, e.seq, f"entry bytes say seq {parsed.seq}")
    if parsed.idem != e.idem:
        raise EntryRefused(ROW_MISMATCH, e.seq, "entry bytes carry a different idempotency key than the row")
    if parsed.kid != e.kid:
        raise EntryRefused(ROW_MISMATCH, e.seq,
                           f"entry bytes name key {parsed.kid} but the row names {e.kid}")


def _check_signature(schedule: KeySchedule, e: SignedEntry) -> None:
    if e.kid not in schedule.keys:
        raise EntryRefused(UNKNOWN_KEY, e.seq, f"signed with unknown key {e.kid}", kid=e.kid)
    try:
        public = schedule.key_for(e.kid, e.seq)
    except ValueError as exc:
        raise EntryRefused(RETIRED_KEY, e.seq, str(exc), kid=e.kid) from None
    if not verify_digest_signature(public, e.entry, e.signature):
        raise EntryRefused(BAD_SIGNATURE, e.seq, f"signature is not valid for key {e.kid}", kid=e.kid)


def _check_place(chain: Chain, e: SignedEntry, parsed: LedgerEntry) -> None:
    expected = chain.next_seq
    if e.seq != expected:
        code = GAP if e.seq > expected else BEHIND
        raise EntryRefused(code, e.seq, f"found seq {e.seq} where seq {expected} belongs (entry missing, "
                                        "duplicated, inserted or reordered)", expected_seq=expected)
    if parsed.prev != chain.prev:
        if e.seq == 0:
            raise EntryRefused(MALFORMED_ENTRY, 0, "prev is not the genesis value")
        raise EntryRefused(FORK, e.seq, f"prev does not match hash of seq {e.seq - 1}",
                           held_hash=chain.prev, received_prev=parsed.prev)


def _rotation(schedule: KeySchedule, parsed: LedgerEntry,
              vet_rotation: Callable[[Rotation], None] | None) -> Rotation:
    try:
        rotation = parse_rotation(parsed)
        schedule.check(rotation)
        if vet_rotation is not None:
            vet_rotation(rotation)
    except ValueError as exc:
        raise EntryRefused(BAD_ROTATION, parsed.seq, f"key rotation refused: {exc}", kid=parsed.kid) from None
    return rotation


# -- a whole chain ----------------------------------------------------------------------------------

class LedgerVerifyError(Exception):
    """The chain is broken at ``seq``; ``reason`` says how. Verification stops at the first break."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason


class ChainVerifier:
    """Streaming verification of a chain, one entry at a time (``check_entry`` in a loop)."""

    def __init__(self, public_keys: Mapping[str, bytes], *, expect_first_seq: int = 0,
                 prev: str = GENESIS_PREV, origin: str | None = None) -> None:
        self.chain = Chain(KeySchedule(public_keys), next_seq=expect_first_seq, prev=prev, origin=origin)

    @property
    def seq(self) -> int:
        """The seq the next entry must have."""
        return self.chain.next_seq

    @property
    def schedule(self) -> KeySchedule:
        return self.chain.schedule

    def check(self, e: SignedEntry) -> CheckedEntry:
        """``check_entry``; LedgerVerifyError naming the position in the chain where it broke."""
        position = self.chain.next_seq
        try:
            return check_entry(self.chain, e)
        except EntryRefused as refused:
            raise LedgerVerifyError(position, refused.reason) from None


def verify_chain(
    entries: Iterable[SignedEntry],
    public_keys: Mapping[str, bytes],
    *,
    expect_first_seq: int = 0,
    prev: str = GENESIS_PREV,
    expect_count: int | None = None,
) -> int:
    """Verify a run of entries in order, streaming; return how many were verified.

    ``expect_first_seq``/``prev`` let a verifier resume from a trusted point (e.g. a checkpoint)
    instead of genesis. Key rotations are honoured, so ``public_keys`` needs only the keys
    trusted at the start. A chain cut short at its tail looks valid on its own; pass
    ``expect_count`` (e.g. from a signed checkpoint) to catch that. Raises LedgerVerifyError at
    the first bad seq. ``public_keys`` maps kid -> raw 32-byte key; a kid that is not the key's
    own is a ValueError.
    """
    verifier = ChainVerifier(public_keys, expect_first_seq=expect_first_seq, prev=prev)
    for e in entries:
        if expect_count is not None and verifier.seq - expect_first_seq >= expect_count:
            raise LedgerVerifyError(verifier.seq, f"entry beyond the expected {expect_count} entries")
        verifier.check(e)
    count = verifier.seq - expect_first_seq
    if expect_count is not None and count < expect_count:
        raise LedgerVerifyError(
            verifier.seq, f"missing: the chain ends after {count} of {expect_count} expected entries"
        )
    return count


# -- rollback ---------------------------------------------------------------------------------------

LEDGER_ROLLBACK = "ledger_rollback"
LEDGER_FORK = "ledger_fork"


class HistoryClaim(msgspec.Struct, frozen=True):
    """A size this ledger already vouched for, at ``where``: a signed checkpoint (with its
    ``root``) or the count the gateway acknowledged (no root)."""

    where: str
    size: int
    root: bytes | None = None


class RolledBack(Exception):
    """The ledger of ``count`` entries is behind ``claim`` (``kind`` LEDGER_ROLLBACK) or holds
    another history than the one ``claim`` signed (LEDGER_FORK)."""

    def __init__(self, kind: str, claim: HistoryClaim, count: int) -> None:
        super().__init__(f"{kind}: {count} entries against {claim.where} (size {claim.size})")
        self.kind = kind
        self.claim = claim
        self.count = count


def check_length(count: int, claims: Iterable[HistoryClaim]) -> None:
    """RolledBack(LEDGER_ROLLBACK) for the first claim covering more than the ``count`` entries held."""
    for claim in claims:
        if claim.size > count:
            raise RolledBack(LEDGER_ROLLBACK, claim, count)


def check_roots(claims: Iterable[HistoryClaim], root_at: Callable[[int], bytes], count: int) -> None:
    """RolledBack(LEDGER_FORK) for the first signed claim whose root is not the ledger's root at its
    size (``root_at(size)``; call after ``check_length``, so every size is held)."""
    for claim in claims:
        if claim.root is not None and root_at(claim.size) != claim.root:
            raise RolledBack(LEDGER_FORK, claim, count)
