"""Gateway ingest throughput: real signed entries over real HTTP into a real database.

``bench_ingest(db_url, n)`` starts the gateway (uvicorn, in this process, on a free port),
registers a fresh origin, signs ``n`` entries (not timed), then times POSTing them in
batches and returns entries per second. Every entry's signature and chain link is checked
by the gateway and committed before the answer, exactly as in production.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx

from services.gateway.admin import register_edge
from services.gateway.server import GatewaySettings, uvicorn_server
from shared.ledger.canonical import canonical_json, sha256_hex
from shared.ledger.keys import SigningKey
from shared.ledger.entry import GENESIS_PREV, SignedEntry, entry_bytes, export_line, sign_entry


def sample_body(i: int) -> dict:
    """A record body of realistic size (about 600 bytes), different for every ``i``."""
    return {
        "schema": "mro.record/1",
        "type": "maintenance_action",
        "station": "HGR1",
        "device": {"kind": "tablet", "id": "TAB-0007"},
        "work_order_id": f"WO-{i:08d}",
        "aircraft": {"registration": "N123AB", "serial_number": "MSN4711", "type": "A320"},
        "ata": "32-41",
        "technician": {"cert_no": "A1234567", "cert_kind": "FAA-AP"},
        "action": "INSPECT",
        "description": "Inspected left main landing gear brake wear pins; within limits.",
        "data_reference": "A320 AMM 32-42-27",
        "return_to_service": True,
        "aircraft_hours": "12345.6",
        "aircraft_cycles": 8000 + i,
        "occurred_at": "2025-01-01T12:00:00Z",
    }


def make_entries(
    key: SigningKey,
    origin: str,
    count: int,
    *,
    start_seq: int = 0,
    prev: str = GENESIS_PREV,
    recorded_at: str | Callable[[int], str] = "2025-01-01T12:00:00.000Z",
    idem: Callable[[int], str] | None = None,
    body: Callable[[int], dict] = sample_body,
) -> Iterator[SignedEntry]:
    """``count`` signed, chained entries from ``start_seq`` (linking to ``prev``).

    ``idem(seq)`` gives the idempotency key (default: from the body's canonical JSON, as the
    edge does); ``recorded_at`` is a string or ``seq -> string``.
    """
    for seq in range(start_seq, start_seq + count):
        b = body(seq)
        key_ = idem(seq) if idem else sha256_hex(canonical_json(b))
        at = recorded_at(seq) if callable(recorded_at) else recorded_at
        data = entry_bytes(origin=origin, seq=seq, prev=prev, idem=key_, kid=key.kid, recorded_at=at,
                           type=b["type"], body=b)
        signed = sign_entry(key, data, seq, key_)
        prev = signed.hash
        yield signed


def batch_body(entries: list[SignedEntry]) -> bytes:
    """The POST /v1/entries body for ``entries``."""
    return b'{"entries":[' + b",".join(export_line(e).rstrip(b"\n") for e in entries) + b"]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedGateway:
    """The real gateway (uvicorn + Starlette) on a free port, in a thread of this process."""

    def __init__(self, db_url: str, duplicate_window_days: int = 30, key_dir: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if key_dir is None and not db_url.startswith("sqlite:///"):
            self._tmp = tempfile.TemporaryDirectory(prefix="mro-gw-keys-")
            key_dir = self._tmp.name + "/keys"
        self.settings = GatewaySettings(db_url=db_url, port=self.port, duplicate_window_days=duplicate_window_days,
                                        key_dir=key_dir or "")
        self.server = uvicorn_server(self.settings, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)

    def __enter__(self) -> ThreadedGateway:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start (see the log)")
            time.sleep(0.01)
        return self

    def __exit__(self, *_exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def scratch_postgres(admin_url: str = "postgresql://postgres@127.0.0.1:5432/test") -> Iterator[str]:
    """A new, uniquely named PostgreSQL database (URL of it) for the duration of the block; dropped after.

    ``admin_url`` is any database on the server the user may CREATE DATABASE from.
    """
    import psycopg

    name = f"mro_gw_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(admin_url)
    try:
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_ingest(db_url: str, n: int = 20_000, batch: int = 1000) -> float:
    """Entries per second the gateway verifies and durably stores, ``batch`` entries per request."""
    key = SigningKey.generate()
    origin = f"bench/{uuid.uuid4().hex[:12]}"
    token = register_edge(db_url, origin, key.public_pem())
    entries = list(make_entries(key, origin, n))
    bodies = [batch_body(entries[i : i + batch]) for i in range(0, n, batch)]
    with ThreadedGateway(db_url) as gw, httpx.Client(
        base_url=gw.url, timeout=120, headers={"Authorization": f"Bearer {token}",
                                               "Content-Type": "application/json"}
    ) as http:
        start = time.perf_counter()
        for body in bodies:
            response = http.post("/v1/entries", content=body)
            if response.status_code != 200:
                raise RuntimeError(f"the gateway refused a bench batch: {response.status_code} {response.text[:500]}")
        elapsed = time.perf_counter() - start
        head = http.get("/v1/head").json()
    if head["seq"] != n - 1:
        raise RuntimeError(f"the gateway holds up to seq {head['seq']}, expected {n - 1}")
    return n / elapsed


def bench_checkpoint(db_url: str, n: int = 100_000, batch: int = 2000) -> dict[str, float]:
    """Ingest ``n`` entries (Merkle tree maintained), then time ``POST /v1/checkpoints`` at size ``n``
    (signature, root over the held entries, consistency with the previous one, cosignature)."""
    from shared.ledger.checkpoint import Checkpoint, sign_checkpoint
    from shared.ledger.merkle import Frontier, leaf_hash

    key = SigningKey.generate()
    origin = f"bench/{uuid.uuid4().hex[:12]}"
    token = register_edge(db_url, origin, key.public_pem())
    entries = list(make_entries(key, origin, n))
    frontier, notes = Frontier(), {}
    for e in entries:
        frontier.append(leaf_hash(e.entry))
        if frontier.size in (n // 2, n):
            notes[frontier.size] = sign_checkpoint(Checkpoint(origin, frontier.size, frontier.root()), key)
    with ThreadedGateway(db_url) as gw, httpx.Client(
        base_url=gw.url, timeout=300, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        start = time.perf_counter()
        for i in range(0, n, batch):
            response = http.post("/v1/entries", content=batch_body(entries[i : i + batch]),
                                 headers={"Content-Type": "application/json"})
            if response.status_code != 200:
                raise RuntimeError(f"the gateway refused a bench batch: {response.status_code} {response.text[:500]}")
        ingest_s = time.perf_counter() - start
        timings = []
        for size in (n // 2, n):
            start = time.perf_counter()
            response = http.post("/v1/checkpoints", json={"checkpoint": notes[size]})
            timings.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"checkpoint refused: {response.status_code} {response.text[:500]}")
    return {"entries": n, "ingest_per_s": n / ingest_s, "first_checkpoint_ms": 1000 * timings[0],
            "next_checkpoint_ms": 1000 * timings[1]}


if __name__ == "__main__":
    import sys

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    with tempfile.TemporaryDirectory() as tmp:
        rate = bench_ingest(f"sqlite:///{tmp}/gateway.db", count, batch_size)
        print(f"sqlite     : {rate:,.0f} entries/s ({count} entries, batches of {batch_size})")
    with scratch_postgres() as url:
        rate = bench_ingest(url, count, batch_size)
        print(f"postgresql : {rate:,.0f} entries/s ({count} entries, batches of {batch_size})")
