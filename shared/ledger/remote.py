"""What an auditor checks with the gateway's audit API (services/gateway/openapi.yaml), without the box.

The gateway serves, per origin, the checkpoints it cosigned, RFC 9162 inclusion and consistency
proofs computed from the entries it holds, and the keys registered for the origin. Nothing it
says is taken on its word: a checkpoint counts once its signature by a key of the origin (and,
for a cosigned one, the cosignature by the gateway's key) verifies here; a proof counts once it
leads from one such checkpoint's root to another's with ``shared.ledger.merkle``'s verifiers. The
roots the gateway puts beside a proof are compared, never trusted.

``GatewayAudit`` is the HTTP client (auditor or edge bearer token, the edge's TLS settings);
``check_checkpoint`` and ``check_consistency`` are the pure checks, shared by ``mro-edge audit
consistency`` and ``mro-edge audit verify``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from shared.ledger.checkpoint import (
    COSIGNATURE_TYPE,
    Checkpoint,
    CheckpointError,
    NoteError,
    open_checkpoint,
    parse_vkey,
    verified_cosignatures,
)
from shared.ledger.keys import KeyFormatError, key_id, public_key_from_pem
from shared.ledger.merkle import verify_consistency, verify_inclusion
from shared.runtime.config import LinkConfig

__all__ = ["CheckedCheckpoint", "GatewayAudit", "GatewayAuditError", "ProofError", "check_checkpoint",
           "check_consistency", "check_inclusion", "decode_proof"]

class GatewayAuditError(Exception):
    """The gateway could not be asked, or refused: the message says which request and why."""


class ProofError(Exception):
    """A checkpoint or proof does not verify; the message says which and why."""


@dataclass(frozen=True)
class CheckedCheckpoint:
    checkpoint: Checkpoint
    note: str
    signed_by: str  # kid of the origin's key that signed it
    cosigned_at: int | None  # the gateway's cosignature timestamp, when one was required


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ProofError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProofError(f"{what} is not valid base64") from None


def decode_proof(values: Any, what: str) -> list[bytes]:
    """A JSON list of base64 hashes -> bytes (ProofError when it is anything else)."""
    if not isinstance(values, list):
        raise ProofError(f"{what} is not a list")
    return [_b64(v, f"{what}[{i}]") for i, v in enumerate(values)]


def check_checkpoint(note: str | bytes, origin_keys: Mapping[str, bytes], *,
                     cosigner: tuple[str, bytes] | None = None, what: str = "checkpoint") -> CheckedCheckpoint:
    """Open ``note`` with one of the origin's keys (kid -> raw key); with ``cosigner`` (name, key),
    the gateway's cosignature must be on it and verify too. ProofError naming ``what`` otherwise."""
    text = note.decode("utf-8") if isinstance(note, bytes) else note
    error = "no key of the origin is known"
    for kid, public in origin_keys.items():
        try:
            head = text.split("\n", 1)[0]
            cp, _ = open_checkpoint(text, {head: public})
        except (NoteError, CheckpointError) as exc:
            error = str(exc)
            continue
        stamp = None
        if cosigner is not None:
            name, key = cosigner
            try:
                stamps = verified_cosignatures(text, {name: key})
            except (NoteError, CheckpointError) as exc:
                raise ProofError(f"{what} (size {cp.size}): the cosignature of {name} does not verify: {exc}") from None
            if name not in stamps:
                raise ProofError(f"{what} (size {cp.size}) carries no cosignature of {name}")
            stamp = stamps[name]
        return CheckedCheckpoint(cp, text, kid, stamp)
    raise ProofError(f"{what}: no valid signature by a key of the origin ({', '.join(sorted(origin_keys)) or 'none'}"
                     f"): {error}")


def check_consistency(old: Checkpoint, new: Checkpoint, proof: Sequence[bytes]) -> None:
    """RFC 9162 section 2.1.4.2: ``old`` is a prefix of ``new``; ProofError saying which otherwise."""
    if old.origin != new.origin:
        raise ProofError(f"the checkpoints are of two origins, {old.origin!r} and {new.origin!r}")
    if old.size > new.size:
        raise ProofError(f"the older checkpoint (size {old.size}) is larger than the newer one ({new.size})")
    if old.size == 0:
        raise ProofError("a consistency proof needs a first checkpoint of at least one entry (RFC 9162 2.1.4)")
    if not verify_consistency(old.size, new.size, old.root, new.root, proof):
        raise ProofError(f"INCONSISTENT: the proof does not show the tree of size {old.size} (root "
                         f"{old.root.hex()}) as a prefix of the tree of size {new.size} (root {new.root.hex()}): "
                         "the history was rewritten between them, or the proof is wrong")


def check_inclusion(leaf: bytes, index: int, cp: Checkpoint, proof: Sequence[bytes]) -> None:
    """RFC 9162 section 2.1.3.2 against a checked checkpoint; ProofError otherwise."""
    if not verify_inclusion(leaf, index, cp.size, proof, cp.root):
        raise ProofError(f"the inclusion proof of leaf {index} does not lead to the root of the checkpoint of "
                         f"size {cp.size}")


class GatewayAudit:
    """The gateway's read-only audit API for one origin (``GET /v1/checkpoints``, ``/v1/proofs/...``,
    ``/v1/keys``, ``/v1/cosigner-key``)."""

    def __init__(self, url: str, token: str, origin: str | None, *, ca_file: str = "", timeout_s: float = 30.0,
                 allow_token_over_plain_http: bool = False) -> None:
        from shared.runtime.gatewayhttp import gateway_http

        link = LinkConfig(gateway_url=url, ca_file=ca_file, allow_token_over_plain_http=allow_token_over_plain_http)
        self.url = url
        self.origin = origin
        self._http = gateway_http(link, timeout_s=timeout_s, token=token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayAudit:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _get(self, path: str, **params: Any) -> dict[str, Any]:
        query = {k: v for k, v in params.items() if v is not None}
        if self.origin is not None and path != "/v1/cosigner-key":
            query["origin"] = self.origin
        try:
            response = self._http.get(path, params=query)
        except httpx.HTTPError as exc:
            raise GatewayAuditError(f"GET {self.url}{path}: {type(exc).__name__}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            raise GatewayAuditError(f"GET {self.url}{path}: HTTP {response.status_code}, not JSON") from None
        if response.status_code != 200 or not isinstance(body, dict):
            error = body.get("error", body) if isinstance(body, dict) else body
            message = error.get("message", error) if isinstance(error, dict) else error
            raise GatewayAuditError(f"GET {self.url}{path}: HTTP {response.status_code}: {message}")
        return body

    def cosigner(self) -> tuple[str, bytes, str]:
        """(name, raw key, vkey) the gateway says it cosigns with (trust on first use: pin the vkey)."""
        body = self._get("/v1/cosigner-key")
        try:
            name, public = parse_vkey(str(body.get("vkey")), COSIGNATURE_TYPE)
        except ValueError as exc:
            raise GatewayAuditError(f"the gateway's cosigner key is malformed: {exc}") from None
        return name, public, str(body["vkey"])

    def registered_keys(self) -> dict[str, bytes]:
        """kid -> raw public key registered for the origin (kids recomputed, never read)."""
        body = self._get("/v1/keys")
        out: dict[str, bytes] = {}
        for row in body.get("keys") or []:
            try:
                public = public_key_from_pem(str(row.get("public_key_pem")))
            except KeyFormatError as exc:
                raise GatewayAuditError(f"the gateway's key registry holds a malformed key: {exc}") from None
            out[key_id(public)] = public
        return out

    def checkpoint_at(self, size: int) -> dict[str, Any] | None:
        """The cosigned checkpoint of exactly ``size`` entries, or None (one row read)."""
        body = self._get("/v1/checkpoints", from_size=size, limit=1)
        rows = body.get("checkpoints") or []
        return rows[0] if rows and rows[0].get("size") == size else None

    def newest_checkpoints(self, to_size: int | None = None, limit: int = 1000) -> tuple[list[dict[str, Any]], bool]:
        """(up to ``limit`` newest cosigned checkpoints of size <= ``to_size``, oldest first; whether
        older ones were left out): one bounded page, what an export bundles."""
        body = self._get("/v1/checkpoints", order="newest", to_size=to_size, limit=limit)
        rows = list(body.get("checkpoints") or [])
        rows.reverse()
        return rows, body.get("next_to_size") is not None

    def consistency(self, first: int, second: int) -> list[bytes]:
        body = self._get("/v1/proofs/consistency", first=first, second=second)
        if body.get("first") != first or body.get("second") != second:
            raise ProofError(f"the gateway answered a proof for sizes {body.get('first')}, {body.get('second')}, "
                             f"not {first}, {second}")
        return decode_proof(body.get("proof"), "the gateway's consistency proof")

    def inclusion(self, index: int, size: int) -> tuple[bytes, list[bytes], dict[str, Any]]:
        """(leaf hash, proof, the whole answer) for leaf ``index`` in the tree of ``size``."""
        body = self._get("/v1/proofs/inclusion", index=index, size=size)
        if body.get("index") != index or body.get("tree_size") != size:
            raise ProofError(f"the gateway answered a proof for leaf {body.get('index')} in size "
                             f"{body.get('tree_size')}, not {index} in {size}")
        return (_b64(body.get("leaf_hash"), "leaf_hash"), decode_proof(body.get("proof"), "the inclusion proof"),
                body)
