"""The reference gateway for tests and benches: real signed entries, the real server in a thread.

``make_entries`` signs and chains entries exactly as the sign stage does; ``ThreadedGateway``
runs the real gateway (uvicorn + Starlette) on a free port of this process; ``scratch_postgres``
gives a fresh PostgreSQL database for one block. Nothing here is a stand-in: what the gateway
accepts from these, it would accept from a box.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from services.gateway.server import GatewaySettings, uvicorn_server
from services.gateway.storage import open_storage
from shared.ledger.canonical import canonical_json, sha256_hex
from shared.ledger.entry import GENESIS_PREV, SignedEntry, entry_bytes, export_line, sign_entry
from shared.ledger.keys import SigningKey
from tests.brokers import free_port


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


class ThreadedGateway:
    """The real gateway (uvicorn + Starlette) on a free port, in a thread of this process."""

    def __init__(self, db_url: str, duplicate_window_days: int = 30, key_dir: str | None = None,
                 **settings: Any) -> None:
        """``settings``: more ``GatewaySettings`` fields (TLS files, limits, timeouts)."""
        self.port = free_port()
        if key_dir is None and not db_url.startswith("sqlite:///"):
            self._tmp = tempfile.TemporaryDirectory(prefix="mro-gw-keys-")
            key_dir = self._tmp.name + "/keys"
        self.settings = GatewaySettings(db_url=db_url, port=self.port, key_dir=key_dir or "",
                                        duplicate_window_days=duplicate_window_days, **settings)
        self.url = f"{self.settings.scheme}://127.0.0.1:{self.port}"
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


@contextlib.contextmanager
def gateway_reader(db_url: str) -> Iterator:
    """A read-only transaction on a gateway's storage, for tests that check what it holds."""
    storage = open_storage(db_url, pool_size=1)
    try:
        with storage.transaction(write=False) as tx:
            yield tx
    finally:
        storage.close()
