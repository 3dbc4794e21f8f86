"""Operator actions on the gateway's database (wired into ``mro-edge gateway ...``).

Tokens: one valid token per origin. Registering (again) issues a new token and revokes the
origin's earlier ones in the same transaction, so a re-registration rotates the credential
instead of adding a second one. Only SHA-256 of a token is stored; the token itself is
returned once, at registration, and never again: listings show a token id (the first 12 hex
digits of its SHA-256), which identifies it for ``revoke-token`` but cannot be used to log in.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from services.gateway.server import token_sha256
from services.gateway.storage import open_storage
from shared.ledger.keys import KeyFormatError, key_id, public_key_from_pem
from shared.runtime.clock import utc_now

_ORIGIN = re.compile(r"^[\x21-\x7e]{1,200}$")
_TOKEN_ID = re.compile(r"^[0-9a-f]{4,64}$")
TOKEN_ID_LENGTH = 12


class RegistrationError(ValueError):
    """The origin or the public key cannot be registered; the message says why and what to do."""


@dataclass(frozen=True)
class TokenInfo:
    """A valid token as an operator may see it: no secret, not even the full hash."""

    origin: str
    token_id: str
    created_at: str


def _check_origin(origin: str) -> None:
    if not _ORIGIN.match(origin):
        raise RegistrationError(f"origin {origin!r} must be 1-200 printable ASCII characters without spaces "
                                "(the edge's ledger origin, e.g. mro-edge/HGR1)")


def register_edge(db_url: str, origin: str, pem_text: str) -> str:
    """Register ``pem_text`` (Ed25519 ``BEGIN PUBLIC KEY``) for ``origin``; return its new bearer token.

    Re-registering an origin adds the key (if new) and replaces the origin's token: the earlier
    token stops working when this one is issued. Keys stay, so a box can rotate its key without
    losing its history. A key already registered for another origin is refused (one key signs
    one chain). Print or hand over the returned token now, it cannot be recovered later.
    """
    _check_origin(origin)
    try:
        public = public_key_from_pem(pem_text)
    except KeyFormatError as exc:
        raise RegistrationError(f"{exc}; give the edge's public key (openssl pkey -in ledger.key -pubout)") from None
    kid = key_id(public)
    token = secrets.token_urlsafe(32)
    digest = token_sha256(token)
    storage = open_storage(db_url, pool_size=1)
    try:
        with storage.transaction() as tx:
            others = [o for o in tx.origins_of_kid(kid) if o != origin]
            if others:
                raise RegistrationError(f"key {kid} is already registered for origin {others[0]!r}; "
                                        "each edge signs its own chain with its own key")
            now = utc_now()
            tx.add_key(origin, kid, public, now)
            tx.revoke_tokens(origin)
            tx.add_token(origin, digest, now)
            tx.ensure_head(origin, now)
    finally:
        storage.close()
    return token


def list_tokens(db_url: str, origin: str | None = None) -> list[TokenInfo]:
    """The valid tokens (of ``origin``, or all), without secrets."""
    storage = open_storage(db_url, pool_size=1)
    try:
        with storage.transaction(write=False) as tx:
            rows = tx.tokens(origin)
    finally:
        storage.close()
    return [TokenInfo(o, digest[:TOKEN_ID_LENGTH], at) for o, digest, at in rows]


def revoke_token(db_url: str, origin: str, token_id: str = "") -> int:
    """Revoke the tokens of ``origin`` (only the one whose id is ``token_id``, if given); how many.

    The edge's requests get 401 from then on, until it is registered again. RegistrationError
    when nothing matched, so a typo does not look like a revocation.
    """
    _check_origin(origin)
    if token_id and not _TOKEN_ID.match(token_id):
        raise RegistrationError(f"token id {token_id!r} must be hex digits as `mro-edge gateway tokens` shows them")
    storage = open_storage(db_url, pool_size=1)
    try:
        with storage.transaction() as tx:
            revoked = tx.revoke_tokens(origin, token_id)
    finally:
        storage.close()
    if not revoked:
        which = f"with id {token_id} " if token_id else ""
        raise RegistrationError(f"origin {origin!r} has no valid token {which}at this gateway "
                                "(`mro-edge gateway tokens` lists them)")
    return revoked


def register_auditor(db_url: str, name: str) -> str:
    """A new read-only auditor token named ``name``: it reads every origin's proofs, cosigned
    checkpoints and registered keys, and can push nothing. Registering a name again replaces its
    token (the earlier one stops working). Print or hand over the token now; only its SHA-256 is kept."""
    _check_origin(name)
    token = secrets.token_urlsafe(32)
    storage = open_storage(db_url, pool_size=1)
    try:
        with storage.transaction() as tx:
            tx.revoke_auditor_tokens(name)
            tx.add_auditor_token(name, token_sha256(token), utc_now())
    finally:
        storage.close()
    return token


def revoke_auditor(db_url: str, name: str) -> int:
    """End the auditor token of ``name`` (its reads get 401 from then on); RegistrationError when
    there is none, so a typo does not look like a revocation."""
    _check_origin(name)
    storage = open_storage(db_url, pool_size=1)
    try:
        with storage.transaction() as tx:
            revoked = tx.revoke_auditor_tokens(name)
    finally:
        storage.close()
    if not revoked:
        raise RegistrationError(f"no auditor named {name!r} holds a token at this gateway")
    return revoked
