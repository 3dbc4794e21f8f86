"""``POST /v1/checkpoints``: verify an edge's signed checkpoint against the entries held, cosign it.

An edge signs C2SP tlog-checkpoints (origin, tree size, RFC 6962 root) of its ledger. The
gateway accepts one when, in this order:

1. it is a well-formed signed note whose checkpoint names the token's origin (``malformed_checkpoint``,
   ``wrong_origin``: 422);
2. it carries a valid Ed25519 signature by a key of that origin that is current at its size:
   registered, or introduced by an accepted rotation, and not retired before it (``bad_signature``: 422);
3. the gateway holds at least ``size`` entries (``not_held``: 409, push the entries first);
4. its root is the root the gateway computes over its own first ``size`` entries
   (``inconsistent``: 409; the edge signed a history other than the one it sent: the note is kept
   as evidence and never cosigned);
5. it does not go back: its size is at least that of the last checkpoint accepted, and the last
   one is a prefix of it (RFC 9162 consistency proof between the two roots) (``stale_checkpoint``:
   409 for an older one; ``inconsistent`` for a contradiction).

Then the gateway appends its tlog-cosignature/v1 (Ed25519, key type 0x04) and keeps it: the
edge stores that line as its receipt. Re-posting the last accepted checkpoint is fine and
returns a fresh cosignature (new timestamp: proof the gateway saw it again at that time).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from services.gateway.storage import AcceptedCheckpoint, Tx
from services.gateway.tree import OriginTree
from shared.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    NoteError,
    cosign,
    cosignature_vkey,
    open_checkpoint,
    parse_checkpoint,
    split_note,
)
from shared.ledger.keys import SigningKey
from shared.ledger.merkle import verify_consistency

COSIGNER_KEY_NAME = "cosigner"


class CheckpointBody(msgspec.Struct, forbid_unknown_fields=True):
    checkpoint: str


checkpoint_decoder = msgspec.json.Decoder(CheckpointBody)


@dataclass(frozen=True)
class Cosigner:
    """The gateway's own Ed25519 key and name for tlog-cosignatures."""

    name: str
    key: SigningKey

    @classmethod
    def load_or_create(cls, keys_dir: Path, name: str) -> Cosigner:
        """``keys_dir/cosigner.key`` (PKCS#8 PEM, 0600 in a 0700 directory), created on first start."""
        return cls(name, SigningKey.load_or_create(Path(keys_dir), COSIGNER_KEY_NAME))

    @property
    def vkey(self) -> str:
        return cosignature_vkey(self.name, self.key.public_bytes)

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "vkey": self.vkey, "kid": self.key.kid, "public_key_pem": self.key.public_pem()}


@dataclass
class CheckpointResult:
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    log: str = "info"


def _error(status: int, code: str, message: str, **extra: Any) -> CheckpointResult:
    return CheckpointResult(status, {"error": {"code": code, "message": message, **extra}},
                            "error" if code == "inconsistent" else "warning")


def accept_checkpoint(tx: Tx, origin: str, note: str, cosigner: Cosigner, now: str,
                      timestamp: int | None = None) -> CheckpointResult:
    """Check ``note`` for ``origin`` inside ``tx`` (steps in the module doc); the caller commits."""
    try:
        text, _ = split_note(note)
        cp = parse_checkpoint(text)
    except (NoteError, CheckpointError) as exc:
        return _error(422, "malformed_checkpoint", f"not a signed C2SP checkpoint: {exc}")
    if cp.origin != origin:
        return _error(422, "wrong_origin", f"the checkpoint is for origin {cp.origin!r}, this token for {origin!r}")

    head_seq, head_hash = tx.lock_head(origin, now)
    schedule = tx.key_schedule(origin)
    signer = None
    for kid, public in schedule.keys.items():
        try:
            open_checkpoint(note, {origin: public})
        except (NoteError, CheckpointError):
            continue
        signer = kid
        break
    if signer is None:
        return _error(422, "bad_signature", f"the checkpoint carries no valid signature by a key of {origin!r}")
    if not any(_valid(schedule, signer, s) for s in (cp.size - 1, cp.size)):
        return _error(422, "bad_signature", f"the checkpoint of size {cp.size} is signed by key {signer}, which is "
                                            "not current at that size (retired by a rotation, or not yet valid)",
                      kid=signer)

    held = head_seq + 1
    head = {"seq": head_seq, "hash": head_hash}
    if cp.size > held:
        return _error(409, "not_held", f"the checkpoint covers {cp.size} entries but the gateway holds {held}: "
                                       "push the entries first", head=head, held=held)
    tree = OriginTree(tx, origin)
    tree.catch_up(held)
    tree.flush()
    root = tree.tree.root(cp.size)
    if root != cp.root:
        reason = (f"the checkpoint's root {cp.root.hex()} is not the root {root.hex()} of the {cp.size} entries the "
                  "gateway holds: the edge signed another history than the one it sent")
        tx.insert_checkpoint_fork(origin, cp.size, cp.root, note, reason, now)
        return _error(409, "inconsistent", f"FORK: {reason}. The checkpoint is kept as evidence and not cosigned.",
                      size=cp.size, held_root=_b64(root))

    last = tx.last_checkpoint(origin)
    if last is not None:
        if cp.size < last.size:
            return _error(409, "stale_checkpoint",
                          f"the checkpoint (size {cp.size}) is older than the last one accepted (size {last.size})",
                          last_size=last.size)
        if tree.tree.root(last.size) != last.root:
            return _error(409, "inconsistent", f"the last accepted checkpoint (size {last.size}) no longer matches "
                                               "the entries held: the gateway's store needs investigation")
        if 0 < last.size < cp.size:
            proof = tree.tree.consistency_proof(last.size, cp.size)
            if not verify_consistency(last.size, cp.size, last.root, cp.root, proof):
                return _error(409, "inconsistent", f"the checkpoint is not consistent with the last accepted one "
                                                   f"(size {last.size})")

    stamp = int(time.time()) if timestamp is None else timestamp
    line = cosign(text, cosigner.name, cosigner.key, stamp)
    tx.put_checkpoint(origin, AcceptedCheckpoint(cp.size, cp.root, note, line), now)
    return CheckpointResult(200, {
        "origin": origin,
        "size": cp.size,
        "root": _b64(cp.root),
        "cosigner": cosigner.name,
        "cosignature": line,
        "timestamp": stamp,
        "cosigned_checkpoint": note + line,
        "signed_by": signer,
    })


def _valid(schedule, kid: str, seq: int) -> bool:
    try:
        schedule.key_for(kid, max(seq, 0))
    except ValueError:
        return False
    return True


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


__all__ = ["Checkpoint", "CheckpointResult", "Cosigner", "accept_checkpoint", "checkpoint_decoder"]
