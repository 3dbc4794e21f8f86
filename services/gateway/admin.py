"""Operator actions on the gateway's database (wired into ``mro-edge gateway ...``)."""

from __future__ import annotations

import re
import secrets

from services.gateway.server import token_sha256
from services.gateway.storage import open_storage
from shared.ledger.keys import KeyFormatError, key_id, public_key_from_pem
from shared.runtime.clock import utc_now

_ORIGIN = re.compile(r"^[\x21-\x7e]{1,200}$")


class RegistrationError(ValueError):
    """The origin or the public key cannot be registered; the message says why and what to do."""


def register_edge(db_url: str, origin: str, pem_text: str) -> str:
    """Register ``pem_text`` (Ed25519 ``BEGIN PUBLIC KEY``) for ``origin``; return a new bearer token.

    Re-registering an origin adds the key (if new) and issues one more token; earlier tokens
    and keys stay valid, so a box can rotate its key without losing its history. Only the
    SHA-256 of the token is stored: print or hand over the returned token now, it cannot be
    recovered later. A key already registered for another origin is refused (one key signs
    one chain).
    """
    if not _ORIGIN.match(origin):
        raise RegistrationError(f"origin {origin!r} must be 1-200 printable ASCII characters without spaces "
                                "(the edge's ledger origin, e.g. mro-edge/HGR1)")
    try:
        public = public_key_from_pem(pem_text)
    except KeyFormatError as exc:
        raise RegistrationError(f"{exc}; give the edge's public key (openssl pkey -in ledger.key -pubout)") from None
    kid = key_id(public)
    token = secrets.token_urlsafe(32)
    storage = open_storage(db_url, pool_size=1)
    try:
        with storage.transaction() as tx:
            others = [o for o in tx.origins_of_kid(kid) if o != origin]
            if others:
                raise RegistrationError(f"key {kid} is already registered for origin {others[0]!r}; "
                                        "each edge signs its own chain with its own key")
            now = utc_now()
            tx.add_key(origin, kid, public, now)
            tx.add_token(origin, token_sha256(token), now)
            tx.ensure_head(origin, now)
    finally:
        storage.close()
    return token
