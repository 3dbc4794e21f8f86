"""The ledger entry format: bytes, hash chain, signatures and the JSON Lines export (DESIGN.md section 6).

An entry is the canonical JSON (RFC 8785) of ``{v, origin, seq, prev, idem, kid, recorded_at,
type, body}``. ``prev`` is the SHA-256 of the previous entry's bytes, so the entries form a hash
chain; each entry is signed with Ed25519 over SHA-256 of its bytes. The exact bytes are stored,
exported and verified as they are: nothing here re-serializes an entry to check it, because a
verifier that re-encodes would be checking its own encoder rather than the record.

Key rotation is itself an entry: ``type`` ``key_rotation``, body ``{new_kid, new_public_key
(base64 of the 32 raw bytes), effective_seq}``, signed by the old key. From ``effective_seq`` on
only the new key may sign; the old one is retired for good (``KeySchedule``). A verifier thus
needs only the first key out of band: the chain carries the rest of its key history.

Pure functions only; checking an entry against a chain is ``shared.ledger.verify``, storage
(LMDB) is ``shared.ledger.store``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

import msgspec

from shared.ledger.canonical import canonical_json, sha256_hex
from shared.ledger.keys import PUBLIC_KEY_BYTES, LedgerSigner, key_id

LEDGER_VERSION = 1
GENESIS_PREV = "0" * 64  # the prev of seq 0, and the hash of an empty chain's head
MAX_SEQ = 2**53 - 1
KEY_ROTATION = "key_rotation"
_ROTATION_FIELDS = {"new_kid", "new_public_key", "effective_seq"}

_HEX64 = r"^[0-9a-f]{64}\Z"
_KID = r"^[0-9a-f]{16}\Z"
_SIG_HEX = r"^[0-9a-f]{128}\Z"
_RECORDED_AT = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z\Z"

Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
Hex64 = Annotated[str, msgspec.Meta(pattern=_HEX64)]
Kid = Annotated[str, msgspec.Meta(pattern=_KID)]


class LedgerEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The decoded content of one entry's bytes; every field is required."""

    v: int
    origin: Annotated[str, msgspec.Meta(min_length=1)]
    seq: Seq
    prev: Hex64
    idem: Hex64
    kid: Kid
    recorded_at: Annotated[str, msgspec.Meta(pattern=_RECORDED_AT)]
    type: Annotated[str, msgspec.Meta(min_length=1)]
    body: dict[str, Any]


class SignedEntry(msgspec.Struct, frozen=True):
    """One stored ledger row: the exact entry bytes with their hash and signature.

    ``seq``, ``idem`` and ``kid`` repeat what the entry bytes say so that an index or a
    dedupe lookup needs no JSON decode; verification checks that the two agree.
    """

    seq: int
    idem: str
    entry: bytes
    hash: str
    signature: bytes
    kid: str


class ExportLineError(ValueError):
    """A JSON Lines export row is not well formed."""


class _ExportRow(msgspec.Struct, forbid_unknown_fields=True):
    seq: Seq
    idempotency_key: Hex64
    entry: str
    hash: Hex64
    signature: Annotated[str, msgspec.Meta(pattern=_SIG_HEX)]
    kid: Kid


_row_decoder = msgspec.json.Decoder(_ExportRow)
_entry_decoder = msgspec.json.Decoder(LedgerEntry)
_encoder = msgspec.json.Encoder()


def entry_bytes(
    *, origin: str, seq: int, prev: str, idem: str, kid: str, recorded_at: str, type: str, body: dict
) -> bytes:
    """The canonical bytes of a new entry; ValueError if a field is out of its declared form.

    ``recorded_at`` is RFC 3339 UTC with ``Z`` and milliseconds (``shared.runtime.clock.utc_now()``).
    """
    fields = {
        "v": LEDGER_VERSION,
        "origin": origin,
        "seq": seq,
        "prev": prev,
        "idem": idem,
        "kid": kid,
        "recorded_at": recorded_at,
        "type": type,
        "body": body,
    }
    try:
        msgspec.convert(fields, LedgerEntry, strict=True)
        datetime.strptime(recorded_at, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError as exc:
        raise ValueError(f"invalid ledger entry: {exc}") from exc
    return canonical_json(fields)


def parse_entry(entry: bytes) -> LedgerEntry:
    """Parse entry bytes (without re-encoding them); ValueError if they are not a well-formed entry."""
    return _entry_decoder.decode(entry)


def entry_hash(entry: bytes) -> str:
    """Hex SHA-256 of the exact entry bytes: the value the next entry's ``prev`` must carry."""
    return sha256_hex(entry)


def sign_entry(key: LedgerSigner, entry: bytes, seq: int, idem: str) -> SignedEntry:
    """Hash and sign ``entry``, refusing bytes whose own seq/idem/kid disagree with the row's.

    The check costs one JSON decode and makes it impossible to store a row that
    ``shared.ledger.verify.check_entry`` would later reject for a mismatch.
    """
    parsed = parse_entry(entry)
    if (parsed.seq, parsed.idem, parsed.kid) != (seq, idem, key.kid):
        raise ValueError(
            f"entry says seq={parsed.seq} idem={parsed.idem} kid={parsed.kid}, "
            f"but the row is seq={seq} idem={idem} and the key is {key.kid}"
        )
    return SignedEntry(
        seq=seq, idem=idem, entry=entry, hash=entry_hash(entry), signature=key.sign_digest(entry), kid=key.kid
    )


def _checked_keys(public_keys: Mapping[str, bytes]) -> dict[str, bytes]:
    for kid, public in public_keys.items():
        if key_id(public) != kid:
            raise ValueError(f"the public key listed under kid {kid} has kid {key_id(public)}")
    return dict(public_keys)


# -- key rotation -------------------------------------------------------------------------------

class Rotation(msgspec.Struct, frozen=True):
    """What a ``key_rotation`` entry says: from ``effective_seq`` on, ``new_kid`` signs instead of
    the key that signed the rotation entry itself (``old_kid``)."""

    seq: int
    old_kid: str
    new_kid: str
    new_public: bytes
    effective_seq: int


def rotation_body(new_public: bytes, effective_seq: int) -> dict[str, Any]:
    """Body of a ``key_rotation`` entry: the new key (base64 of its 32 raw bytes), its kid, and the
    first seq it signs. The entry itself is signed by the old key."""
    return {
        "new_kid": key_id(new_public),
        "new_public_key": base64.b64encode(new_public).decode("ascii"),
        "effective_seq": effective_seq,
    }


def parse_rotation(entry: LedgerEntry) -> Rotation:
    """The rotation a ``key_rotation`` entry announces; ValueError if its body is not well formed."""
    body = entry.body
    if set(body) != _ROTATION_FIELDS:
        raise ValueError(f"a key_rotation body has exactly the fields {sorted(_ROTATION_FIELDS)}")
    new_kid, encoded, effective = body["new_kid"], body["new_public_key"], body["effective_seq"]
    try:
        public = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
    except (binascii.Error, ValueError):
        public = b""
    if len(public) != PUBLIC_KEY_BYTES or base64.b64encode(public).decode("ascii") != encoded:
        raise ValueError("new_public_key is not the base64 of a 32-byte Ed25519 public key")
    if new_kid != key_id(public):
        raise ValueError(f"new_kid {new_kid!r} is not the kid of new_public_key ({key_id(public)})")
    if type(effective) is not int or not entry.seq < effective <= MAX_SEQ:
        raise ValueError(f"effective_seq must be a seq after the rotation entry's own ({entry.seq})")
    if new_kid == entry.kid:
        raise ValueError("a rotation must name a key other than the one signing it")
    return Rotation(entry.seq, entry.kid, new_kid, public, effective)


class KeySchedule:
    """Which key may sign which seq: the verifier's trusted keys, extended by rotation entries.

    A trusted key may sign any seq until a rotation it signed retires it; the rotation's new key
    may sign from its ``effective_seq`` on. So a chain needs only its first key to be trusted out
    of band: every later key is introduced by an entry the previous key signed, and a retired key
    (lost, stolen, or simply replaced) can no longer sign anything the verifier accepts.
    """

    def __init__(self, public_keys: Mapping[str, bytes]) -> None:
        self.keys = _checked_keys(public_keys)
        self.valid_from: dict[str, int] = {}
        self.retired_from: dict[str, tuple[int, int]] = {}  # kid -> (effective_seq, rotation seq)
        self.rotations: list[Rotation] = []

    def key_for(self, kid: str, seq: int) -> bytes:
        """The public key ``kid`` if it may sign ``seq``; ValueError saying why not."""
        public = self.keys.get(kid)
        if public is None:
            raise ValueError(f"signed with unknown key {kid}")
        start = self.valid_from.get(kid)
        if start is not None and seq < start:
            raise ValueError(f"signed with key {kid}, which a rotation introduced only from seq {start}")
        retired = self.retired_from.get(kid)
        if retired is not None and seq >= retired[0]:
            raise ValueError(f"signed with key {kid}, which the rotation at seq {retired[1]} retired "
                             f"from seq {retired[0]} on")
        return public

    def check(self, rotation: Rotation) -> None:
        """ValueError if ``rotation`` contradicts the schedule; nothing changes."""
        pending = [r for r in self.rotations if r.effective_seq > rotation.seq]
        if pending:
            raise ValueError(f"a rotation while the one at seq {pending[-1].seq} has not taken effect")
        if rotation.new_kid in self.retired_from:
            raise ValueError(f"the rotation names key {rotation.new_kid}, which was retired earlier")
        known = self.keys.get(rotation.new_kid)
        if known is not None and known != rotation.new_public:
            raise ValueError(f"the rotation's key {rotation.new_kid} differs from the known key of that kid")

    def apply(self, rotation: Rotation) -> None:
        """Take up a rotation whose entry verified; ValueError if it contradicts the schedule."""
        self.check(rotation)
        if rotation.new_kid not in self.keys:
            self.keys[rotation.new_kid] = rotation.new_public
            self.valid_from[rotation.new_kid] = rotation.effective_seq
        self.retired_from[rotation.old_kid] = (rotation.effective_seq, rotation.seq)
        self.rotations.append(rotation)


def export_row(e: SignedEntry) -> dict:
    """The export/uplink form of an entry: the entry as a string (its exact bytes), signature as hex."""
    return {
        "seq": e.seq,
        "idempotency_key": e.idem,
        "entry": e.entry.decode("utf-8"),
        "hash": e.hash,
        "signature": e.signature.hex(),
        "kid": e.kid,
    }


def export_line(e: SignedEntry) -> bytes:
    """One JSON Lines row for auditors (the same fields the gateway receives)."""
    return _encoder.encode(_ExportRow(**export_row(e))) + b"\n"


def parse_export_line(line: bytes) -> SignedEntry:
    """Inverse of ``export_line``; strict, so one row has exactly one valid spelling.

    Strictness (lowercase hex, no stray whitespace, no unknown fields) means any edit of an
    exported row either fails here or changes a value that ``check_entry`` then rejects.
    """
    body = line[:-1] if line.endswith(b"\n") else line
    if not (body.startswith(b"{") and body.endswith(b"}")):
        raise ExportLineError("an export row is one JSON object on one line")
    try:
        row = _row_decoder.decode(body)
        entry = row.entry.encode("utf-8")
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise ExportLineError(f"malformed export row: {exc}") from None
    return SignedEntry(
        seq=row.seq,
        idem=row.idempotency_key,
        entry=entry,
        hash=row.hash,
        signature=bytes.fromhex(row.signature),
        kid=row.kid,
    )
