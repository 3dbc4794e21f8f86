"""An edge box as the gateway tests see it: its key, its registration at a gateway and its chain.

The fixtures that build one (a gateway per database backend, an edge registered at it) are in
tests/integration/conftest.py.
"""

from __future__ import annotations

import uuid

import httpx

from services.gateway.admin import register_edge
from shared.ledger.entry import GENESIS_PREV, SignedEntry, entry_bytes, sign_entry
from shared.ledger.keys import SigningKey
from shared.ledger.verify import verify_chain
from tests.support.gateway import batch_body, gateway_reader, make_entries


class Edge:
    """One edge box: its key, origin, token and the chain it has signed so far."""

    def __init__(self, db_url: str, base_url: str, origin: str | None = None, key: SigningKey | None = None):
        self.db_url = db_url
        self.key = key or SigningKey.generate()
        self.origin = origin or f"mro-edge/T{uuid.uuid4().hex[:8]}"
        self.token = register_edge(db_url, self.origin, self.key.public_pem())
        self.http = httpx.Client(base_url=base_url, timeout=60,
                                 headers={"Authorization": f"Bearer {self.token}"})
        self.chain: list[SignedEntry] = []

    def extend(self, count: int, **kwargs) -> list[SignedEntry]:
        prev = self.chain[-1].hash if self.chain else GENESIS_PREV
        new = list(make_entries(self.key, self.origin, count, start_seq=len(self.chain), prev=prev, **kwargs))
        self.chain.extend(new)
        return new

    def post(self, entries: list[SignedEntry], token: str | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.post("/v1/entries", content=batch_body(entries), headers=headers)

    def head(self) -> dict:
        response = self.http.get("/v1/head")
        assert response.status_code == 200, response.text
        return response.json()

    def stored(self) -> list[dict]:
        with gateway_reader(self.db_url) as tx:
            return tx.entries(self.origin, 0, 1_000_000)

    def forks(self) -> list[dict]:
        with gateway_reader(self.db_url) as tx:
            return tx.forks(self.origin)

    def verify_stored(self, expect_count: int) -> None:
        """The stored chain is exactly our first ``expect_count`` entries, byte for byte, and verifies."""
        rows = self.stored()
        signed = [SignedEntry(r["seq"], r["idem"], r["entry"], r["hash"], r["signature"], r["kid"]) for r in rows]
        assert verify_chain(signed, {self.key.kid: self.key.public_bytes}, expect_count=expect_count) == expect_count
        assert [s.entry for s in signed] == [e.entry for e in self.chain[:expect_count]]

    def close(self) -> None:
        self.http.close()


def entry_with(key: SigningKey, origin: str, seq: int, prev: str, body: dict, idem: str | None = None,
               recorded_at: str = "2025-01-01T12:00:00.000Z") -> SignedEntry:
    idem = idem or uuid.uuid4().hex * 2
    data = entry_bytes(origin=origin, seq=seq, prev=prev, idem=idem, kid=key.kid, recorded_at=recorded_at,
                       type="maintenance_action", body=body)
    return sign_entry(key, data, seq, idem)
