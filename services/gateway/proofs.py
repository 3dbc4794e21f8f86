"""Read-only audit answers: RFC 9162 proofs, cosigned checkpoints and the key registry per origin.

An auditor at headquarters checks any record without the box: the cosigned checkpoints say
which roots the edge signed and the gateway checked; an inclusion proof (RFC 9162 section
2.1.3) ties one entry's leaf hash to such a root, a consistency proof (section 2.1.4) ties an
older root to a newer one. The auditor verifies them with their own code
(``shared.ledger.merkle.verify_inclusion`` / ``verify_consistency``, ``mro-edge audit
consistency``), never trusting the roots the gateway puts beside a proof.

Cost, bounded per request: a proof is read from the stored complete-subtree hashes
(``merkle_nodes``, the same layout as the edge's tree): at most 2 * log2(size) nodes (about 60
for a billion entries), fetched in one query of primary-key lookups; no entry is read, nothing
is held beyond the proof.
A page of checkpoints is one indexed query of at most ``MAX_CHECKPOINT_PAGE`` rows.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.gateway.storage import Tx
from services.gateway.tree import OriginTree
from shared.ledger.keys import public_key_to_pem
from shared.ledger.merkle import SIZE_KEY

_T = TypeVar("_T")
_KEY = struct.Struct(">cBQ")  # shared.ledger.merkle.node_key

MAX_CHECKPOINT_PAGE = 1000
DEFAULT_CHECKPOINT_PAGE = 100


@dataclass
class AuditAnswer:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _error(status: int, code: str, message: str, **extra: Any) -> AuditAnswer:
    return AuditAnswer(status, {"error": {"code": code, "message": message, **extra}})


class _ReadOnlyTree(OriginTree):
    """``OriginTree`` for readers: a write here would be a bug, so it raises.

    ``prefetched(work)`` reads every node ``work`` needs in one query: ``work`` runs once against
    placeholder hashes to learn which nodes it touches (the nodes a proof reads depend on the
    sizes only, never on hash values), they are fetched together, and ``work`` runs again on them.
    Nodes stay cached for the request (a proof and the roots beside it share most of them).
    """

    _PLACEHOLDER = bytes(32)

    def __init__(self, tx: Tx, origin: str) -> None:
        super().__init__(tx, origin)
        self._seen: dict[bytes, bytes | None] = {}
        self._wanted: set[bytes] | None = None

    def _get(self, key: bytes) -> bytes | None:
        if key == SIZE_KEY:
            return super()._get(key)
        if self._wanted is not None:
            self._wanted.add(key)
            return self._PLACEHOLDER
        if key not in self._seen:
            self._seen[key] = super()._get(key)
        return self._seen[key]

    def prefetched(self, work: Callable[[], _T]) -> _T:
        self._wanted = set()
        try:
            work()
        finally:
            wanted, self._wanted = self._wanted, None
        missing = [_KEY.unpack(k)[1:] for k in wanted if k not in self._seen]
        if missing:
            found = self.tx.merkle_nodes(self.origin, missing)
            for level, idx in missing:
                self._seen[_KEY.pack(b"m", level, idx)] = found.get((level, idx))
        return work()

    def _put(self, key: bytes, value: bytes) -> None:
        raise TypeError("the audit endpoints never write the tree")


def _latest_cosigned(tx: Tx, origin: str) -> int | None:
    last = tx.last_checkpoint(origin)
    return last.size if last is not None else None


def _unknown(origin: str) -> AuditAnswer:
    return _error(404, "unknown_origin", f"origin {origin!r} is not registered at this gateway")


def _held_tree(tx: Tx, origin: str, size: int | None, name: str) -> tuple[_ReadOnlyTree, int] | AuditAnswer:
    """The origin's tree and the tree size a proof is asked against (``size``, by default the newest
    cosigned checkpoint's), or the answer that says why there is none."""
    if not tx.origin_known(origin):
        return _unknown(origin)
    if size is None:
        size = _latest_cosigned(tx, origin)
        if size is None:
            return _error(404, "no_checkpoint", f"the gateway has cosigned no checkpoint of {origin!r} yet; "
                                                f"pass {name}= explicitly")
    tree = _ReadOnlyTree(tx, origin)
    if not 0 < size <= tree.size:
        return _error(409, "not_held", f"tree size {size} is outside 1..{tree.size} (the entries the gateway "
                                       "holds in its tree)", held=tree.size)
    return tree, size


def inclusion(tx: Tx, origin: str, index: int, size: int | None) -> AuditAnswer:
    """PATH(index, D[0:size]); ``size`` defaults to the newest cosigned checkpoint's."""
    held = _held_tree(tx, origin, size, "size")
    if isinstance(held, AuditAnswer):
        return held
    tree, size = held
    if not 0 <= index < size:
        return _error(400, "bad_index", f"index {index} is outside a tree of size {size} (0..{size - 1})")
    proof, leaf, root = tree.prefetched(lambda: (tree.tree.inclusion_proof(index, size), tree.tree.leaf(index),
                                                 tree.tree.root(size)))
    return AuditAnswer(200, {
        "origin": origin,
        "index": index,
        "tree_size": size,
        "leaf_hash": _b64(leaf),
        "entry_hash": tx.entry_hash_at(origin, index),
        "root": _b64(root),
        "proof": [_b64(p) for p in proof],
    })


def consistency(tx: Tx, origin: str, first: int, second: int | None) -> AuditAnswer:
    """PROOF(first, D[0:second]); ``second`` defaults to the newest cosigned checkpoint's size."""
    held = _held_tree(tx, origin, second, "second")
    if isinstance(held, AuditAnswer):
        return held
    tree, second = held
    if not 0 < first <= second:
        return _error(400, "bad_sizes", f"a consistency proof needs 0 < first <= second, got {first}, {second} "
                                        "(RFC 9162 section 2.1.4)")
    proof, first_root, second_root = tree.prefetched(lambda: (
        tree.tree.consistency_proof(first, second), tree.tree.root(first), tree.tree.root(second)))
    return AuditAnswer(200, {
        "origin": origin,
        "first": first,
        "second": second,
        "first_root": _b64(first_root),
        "second_root": _b64(second_root),
        "proof": [_b64(p) for p in proof],
    })


def checkpoints(tx: Tx, origin: str, from_size: int, to_size: int | None, limit: int, newest_first: bool,
                cosigner: str) -> AuditAnswer:
    """One page of the accepted checkpoints, each with the gateway's newest cosignature of it.

    Oldest first from ``from_size`` (the next page: ``from_size=next_from_size``), or newest first
    down from ``to_size`` (the next page: ``to_size=next_to_size``)."""
    if not tx.origin_known(origin):
        return _unknown(origin)
    rows = tx.cosigned_checkpoints(origin, from_size, limit + 1, to_size, newest_first)
    more = len(rows) > limit
    rows = rows[:limit]
    body: dict[str, Any] = {
        "origin": origin,
        "cosigner": cosigner,
        "checkpoints": [{"size": size, "root": _b64(root), "cosigned_checkpoint": note, "accepted_at": at}
                        for size, root, note, at in rows],
    }
    if newest_first:
        body["next_to_size"] = rows[-1][0] - 1 if more else None
    else:
        body["next_from_size"] = rows[-1][0] + 1 if more else None
    return AuditAnswer(200, body)


def key_registry(tx: Tx, origin: str) -> AuditAnswer:
    """The keys registered for ``origin``: an auditor's trust anchor for the first entry's key."""
    if not tx.origin_known(origin):
        return _unknown(origin)
    return AuditAnswer(200, {
        "origin": origin,
        "keys": [{"kid": kid, "public_key_pem": public_key_to_pem(public), "registered_at": at}
                 for kid, public, at in tx.key_registry(origin)],
    })
