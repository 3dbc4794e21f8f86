"""Where the gateway keeps what it accepted: SQLite (embedded default) or PostgreSQL (production).

One small interface, two implementations that share their SQL: ``Storage`` hands out a
``Tx`` (one database transaction, committed before anything is acknowledged) whose methods
are the only queries the gateway runs. The backends differ only where they must:

- placeholders (``?`` for sqlite3, ``%s`` for psycopg; the shared SQL is written with ``?``),
- binary and integer column types in the DDL,
- how a writer serializes per origin: SQLite ``BEGIN IMMEDIATE`` (one writer per database),
  PostgreSQL ``SELECT ... FOR UPDATE`` on the origin's head row,
- bulk insert: ``executemany`` for SQLite, ``COPY`` for PostgreSQL,
- "value in a list": chunked ``IN (?, ...)`` for SQLite, ``= ANY(%s)`` for PostgreSQL.

Durability: SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk when
``COMMIT`` returns); PostgreSQL with its default ``synchronous_commit=on``.

URLs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``postgresql://...``
(any libpq connection URL, also ``postgres://``).
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.ledger.entry import GENESIS_PREV, KeySchedule, Rotation
from shared.ledger.timeline import Backwards

SCHEMA_VERSION = "1"

# Written once for both backends; {blob} and {bigint} are filled per backend.
_DDL = (
    """CREATE TABLE IF NOT EXISTS gateway_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    # Public keys allowed to sign entries of an origin (kid = shared.ledger.keys.key_id).
    """CREATE TABLE IF NOT EXISTS edge_keys (
        origin TEXT NOT NULL,
        kid TEXT NOT NULL,
        public_key {blob} NOT NULL,
        registered_at TEXT NOT NULL,
        PRIMARY KEY (origin, kid))""",
    # Only the SHA-256 of a bearer token is stored; each token is bound to one origin.
    """CREATE TABLE IF NOT EXISTS edge_tokens (
        token_sha256 TEXT PRIMARY KEY,
        origin TEXT NOT NULL,
        created_at TEXT NOT NULL)""",
    # The chain head per origin (seq -1 and 64 zeros before the first entry); also the row a
    # PostgreSQL writer locks so that two batches of one origin never interleave.
    """CREATE TABLE IF NOT EXISTS heads (
        origin TEXT PRIMARY KEY,
        seq {bigint} NOT NULL,
        hash TEXT NOT NULL,
        updated_at TEXT NOT NULL)""",
    # The accepted chain: exact entry bytes, their hash and signature, stored once per seq.
    # duplicate_of: the earlier seq with the same idempotency key inside the window, if any.
    """CREATE TABLE IF NOT EXISTS entries (
        origin TEXT NOT NULL,
        seq {bigint} NOT NULL,
        hash TEXT NOT NULL,
        idem TEXT NOT NULL,
        kid TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        entry {blob} NOT NULL,
        signature {blob} NOT NULL,
        duplicate_of {bigint},
        received_at TEXT NOT NULL,
        PRIMARY KEY (origin, seq))""",
    "CREATE INDEX IF NOT EXISTS entries_by_idem ON entries (origin, idem, seq)",
    # Evidence of forks: validly signed entries that contradict the held chain (a different
    # entry at a held seq, or a next entry whose prev is not the held head). Never acknowledged.
    """CREATE TABLE IF NOT EXISTS forks (
        origin TEXT NOT NULL,
        seq {bigint} NOT NULL,
        hash TEXT NOT NULL,
        reason TEXT NOT NULL,
        held_hash TEXT NOT NULL,
        kid TEXT NOT NULL,
        entry {blob} NOT NULL,
        signature {blob} NOT NULL,
        received_at TEXT NOT NULL,
        PRIMARY KEY (origin, seq, hash))""",
    # The RFC 6962 Merkle tree over each origin's entries: the hash of every complete subtree
    # (level 0 = leaf hashes), written in the transaction that stores the entries (shared.ledger.merkle).
    """CREATE TABLE IF NOT EXISTS merkle_nodes (
        origin TEXT NOT NULL,
        level INTEGER NOT NULL,
        idx {bigint} NOT NULL,
        hash {blob} NOT NULL,
        PRIMARY KEY (origin, level, idx))""",
    """CREATE TABLE IF NOT EXISTS merkle_sizes (
        origin TEXT PRIMARY KEY,
        size {bigint} NOT NULL)""",
    # Key rotations taken from accepted key_rotation entries (signed by the old key): new_kid may
    # sign from effective_seq on, old_kid no longer from then.
    """CREATE TABLE IF NOT EXISTS key_rotations (
        origin TEXT NOT NULL,
        seq {bigint} NOT NULL,
        old_kid TEXT NOT NULL,
        new_kid TEXT NOT NULL,
        new_public_key {blob} NOT NULL,
        effective_seq {bigint} NOT NULL,
        accepted_at TEXT NOT NULL,
        PRIMARY KEY (origin, seq))""",
    # Accepted signed checkpoints and the gateway's latest cosignature of each (the edge's receipt).
    """CREATE TABLE IF NOT EXISTS checkpoints (
        origin TEXT NOT NULL,
        size {bigint} NOT NULL,
        root {blob} NOT NULL,
        note TEXT NOT NULL,
        cosignature TEXT NOT NULL,
        accepted_at TEXT NOT NULL,
        PRIMARY KEY (origin, size))""",
    # Evidence: validly signed checkpoints that contradict the entries held (the edge signed
    # another history). Never cosigned.
    # Read-only auditor credentials: an auditor token may read any origin's proofs, cosigned
    # checkpoints and registered keys, and push nothing (``mro-edge gateway register-auditor``).
    """CREATE TABLE IF NOT EXISTS auditor_tokens (
        token_sha256 TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS checkpoint_forks (
        origin TEXT NOT NULL,
        size {bigint} NOT NULL,
        root {blob} NOT NULL,
        note TEXT NOT NULL,
        reason TEXT NOT NULL,
        received_at TEXT NOT NULL,
        PRIMARY KEY (origin, size, root))""",
    # Entries whose recorded_at is earlier than the entry before them (shared.ledger.timeline):
    # accepted (the chain is valid and the edge cannot rewrite it), flagged for the auditors.
    """CREATE TABLE IF NOT EXISTS time_flags (
        origin TEXT NOT NULL,
        seq {bigint} NOT NULL,
        recorded_at TEXT NOT NULL,
        previous_seq {bigint} NOT NULL,
        previous TEXT NOT NULL,
        flagged_at TEXT NOT NULL,
        PRIMARY KEY (origin, seq))""",
)

_ENTRY_COLUMNS = "origin, seq, hash, idem, kid, recorded_at, entry, signature, duplicate_of, received_at"


class StorageError(Exception):
    """The database could not be reached or refused a statement; worth retrying later (HTTP 503)."""


class StorageURLError(ValueError):
    """The database URL is not one this gateway understands; the message shows the accepted forms."""


@dataclass(frozen=True)
class HeldEntry:
    """What is stored at one seq, as far as replay detection needs it."""

    seq: int
    hash: str
    idem: str
    kid: str
    signature: bytes
    duplicate_of: int | None


@dataclass(frozen=True)
class NewEntry:
    seq: int
    hash: str
    idem: str
    kid: str
    recorded_at: str
    entry: bytes
    signature: bytes
    duplicate_of: int | None


@dataclass(frozen=True)
class AcceptedCheckpoint:
    size: int
    root: bytes
    note: str
    cosignature: str


@dataclass(frozen=True)
class ForkEvidence:
    seq: int
    hash: str
    reason: str
    held_hash: str
    kid: str
    entry: bytes
    signature: bytes


class Tx(ABC):
    """One transaction; every query the gateway runs. Backends override the few that differ."""

    def __init__(self, storage: Storage, conn: Any) -> None:
        self._s = storage
        self._conn = conn

    # -- plumbing
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        cur = self._conn.execute(self._s.sql(sql), params)
        return cur.fetchall()

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._conn.execute(self._s.sql(sql), params)

    @abstractmethod
    def _in(self, column: str, values: list[Any]) -> Iterator[tuple[str, list[Any]]]:
        """(SQL fragment, params) pairs that together test ``column`` against all ``values``."""

    # -- authentication and keys
    def origin_for_token(self, token_sha256: str) -> str | None:
        rows = self._rows("SELECT origin FROM edge_tokens WHERE token_sha256 = ?", (token_sha256,))
        return rows[0][0] if rows else None

    def auditor_for_token(self, token_sha256: str) -> str | None:
        """The name of the read-only auditor this token belongs to, if any."""
        rows = self._rows("SELECT name FROM auditor_tokens WHERE token_sha256 = ?", (token_sha256,))
        return rows[0][0] if rows else None

    def add_auditor_token(self, name: str, token_sha256: str, now: str) -> None:
        self._exec("INSERT INTO auditor_tokens (token_sha256, name, created_at) VALUES (?, ?, ?)",
                   (token_sha256, name, now))

    def revoke_auditor_tokens(self, name: str) -> int:
        before = len(self._rows("SELECT 1 FROM auditor_tokens WHERE name = ?", (name,)))
        self._exec("DELETE FROM auditor_tokens WHERE name = ?", (name,))
        return before

    def key_registry(self, origin: str) -> list[tuple[str, bytes, str]]:
        """(kid, raw public key, registered_at) of the keys registered for ``origin``, oldest first."""
        rows = self._rows("SELECT kid, public_key, registered_at FROM edge_keys WHERE origin = ? "
                          "ORDER BY registered_at, kid", (origin,))
        return [(kid, bytes(public), at) for kid, public, at in rows]

    def keys(self, origin: str) -> dict[str, bytes]:
        rows = self._rows("SELECT kid, public_key FROM edge_keys WHERE origin = ?", (origin,))
        return {kid: bytes(public) for kid, public in rows}

    def origins_of_kid(self, kid: str) -> list[str]:
        return [r[0] for r in self._rows("SELECT origin FROM edge_keys WHERE kid = ?", (kid,))]

    def add_key(self, origin: str, kid: str, public: bytes, now: str) -> None:
        self._exec(
            "INSERT INTO edge_keys (origin, kid, public_key, registered_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (origin, kid, public, now),
        )

    def add_token(self, origin: str, token_sha256: str, now: str) -> None:
        self._exec(
            "INSERT INTO edge_tokens (token_sha256, origin, created_at) VALUES (?, ?, ?)",
            (token_sha256, origin, now),
        )

    def tokens(self, origin: str | None = None) -> list[tuple[str, str, str]]:
        """(origin, token_sha256, created_at) of the valid tokens, of one origin or all, oldest first."""
        where, params = ("WHERE origin = ?", (origin,)) if origin is not None else ("", ())
        return [(o, h, at) for o, h, at in self._rows(
            f"SELECT origin, token_sha256, created_at FROM edge_tokens {where} ORDER BY created_at, origin",
            params)]

    def revoke_tokens(self, origin: str, token_sha256_prefix: str = "") -> int:
        """Delete the tokens of ``origin`` (those whose hash starts with the prefix); how many."""
        before = len(self.tokens(origin))
        self._exec("DELETE FROM edge_tokens WHERE origin = ? AND token_sha256 LIKE ?",
                   (origin, token_sha256_prefix + "%"))
        return before - len(self.tokens(origin))

    def ensure_head(self, origin: str, now: str) -> None:
        self._exec(
            "INSERT INTO heads (origin, seq, hash, updated_at) VALUES (?, -1, ?, ?) ON CONFLICT DO NOTHING",
            (origin, GENESIS_PREV, now),
        )

    # -- the chain
    def head(self, origin: str) -> tuple[int, str]:
        rows = self._rows("SELECT seq, hash FROM heads WHERE origin = ?", (origin,))
        return (int(rows[0][0]), rows[0][1]) if rows else (-1, GENESIS_PREV)

    def origin_figures(self) -> list[tuple[str, int, str | None, int]]:
        """Per origin: (origin, head seq, recorded_at of the head entry, cosigned checkpoint size)."""
        rows = self._rows(
            "SELECT h.origin, h.seq, e.recorded_at, (SELECT MAX(c.size) FROM checkpoints c WHERE c.origin = h.origin) "
            "FROM heads h LEFT JOIN entries e ON e.origin = h.origin AND e.seq = h.seq ORDER BY h.origin")
        return [(origin, int(seq), recorded, int(size or 0)) for origin, seq, recorded, size in rows]

    def lock_head(self, origin: str, now: str) -> tuple[int, str]:
        """The head, held against other writers of this origin until the transaction ends."""
        self.ensure_head(origin, now)
        return self.head(origin)

    def set_head(self, origin: str, seq: int, hash_: str, now: str) -> None:
        self._exec("UPDATE heads SET seq = ?, hash = ?, updated_at = ? WHERE origin = ?", (seq, hash_, now, origin))

    def held(self, origin: str, seqs: list[int]) -> dict[int, HeldEntry]:
        found: dict[int, HeldEntry] = {}
        for fragment, params in self._in("seq", seqs):
            for seq, hash_, idem, kid, sig, dup in self._rows(
                f"SELECT seq, hash, idem, kid, signature, duplicate_of FROM entries WHERE origin = ? AND {fragment}",
                [origin, *params],
            ):
                found[int(seq)] = HeldEntry(int(seq), hash_, idem, kid, bytes(sig), dup)
        return found

    def idem_history(self, origin: str, idems: Iterable[str]) -> dict[str, list[tuple[int, str]]]:
        """For each idempotency key already stored: its (seq, recorded_at) pairs in seq order."""
        history: dict[str, list[tuple[int, str]]] = {}
        for fragment, params in self._in("idem", sorted(set(idems))):
            for idem, seq, recorded_at in self._rows(
                f"SELECT idem, seq, recorded_at FROM entries WHERE origin = ? AND {fragment}",
                [origin, *params],
            ):
                history.setdefault(idem, []).append((int(seq), recorded_at))
        for pairs in history.values():
            pairs.sort()
        return history

    def insert_entries(self, origin: str, rows: list[NewEntry], now: str) -> None:
        self._conn.executemany(
            self._s.sql(f"INSERT INTO entries ({_ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
            [self._entry_tuple(origin, r, now) for r in rows],
        )

    @staticmethod
    def _entry_tuple(origin: str, r: NewEntry, now: str) -> tuple:
        return (origin, r.seq, r.hash, r.idem, r.kid, r.recorded_at, r.entry, r.signature, r.duplicate_of, now)

    def insert_fork(self, origin: str, f: ForkEvidence, now: str) -> None:
        self._exec(
            "INSERT INTO forks (origin, seq, hash, reason, held_hash, kid, entry, signature, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (origin, f.seq, f.hash, f.reason, f.held_hash, f.kid, f.entry, f.signature, now),
        )

    # -- key rotations
    def rotations(self, origin: str) -> list[Rotation]:
        rows = self._rows(
            "SELECT seq, old_kid, new_kid, new_public_key, effective_seq FROM key_rotations WHERE origin = ? "
            "ORDER BY seq", (origin,))
        return [Rotation(int(seq), old, new, bytes(public), int(eff)) for seq, old, new, public, eff in rows]

    def key_schedule(self, origin: str) -> KeySchedule:
        """Registered keys of ``origin``, then every accepted rotation in seq order
        (shared.ledger.entry.KeySchedule)."""
        rotations = self.rotations(origin)
        introduced = {r.new_kid for r in rotations}
        schedule = KeySchedule({kid: pub for kid, pub in self.keys(origin).items() if kid not in introduced})
        for r in rotations:
            schedule.apply(r)
        return schedule

    def add_rotation(self, origin: str, r: Rotation, now: str) -> None:
        self._exec(
            "INSERT INTO key_rotations (origin, seq, old_kid, new_kid, new_public_key, effective_seq, accepted_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (origin, r.seq, r.old_kid, r.new_kid, r.new_public, r.effective_seq, now))
        self.add_key(origin, r.new_kid, r.new_public, now)

    # -- the Merkle tree (see shared.ledger.merkle for the node layout)
    def merkle_size(self, origin: str) -> int:
        rows = self._rows("SELECT size FROM merkle_sizes WHERE origin = ?", (origin,))
        return int(rows[0][0]) if rows else 0

    def set_merkle_size(self, origin: str, size: int) -> None:
        self._exec("INSERT INTO merkle_sizes (origin, size) VALUES (?, ?) "
                   "ON CONFLICT (origin) DO UPDATE SET size = excluded.size", (origin, size))

    def merkle_node(self, origin: str, level: int, idx: int) -> bytes | None:
        rows = self._rows("SELECT hash FROM merkle_nodes WHERE origin = ? AND level = ? AND idx = ?",
                          (origin, level, idx))
        return bytes(rows[0][0]) if rows else None

    def merkle_nodes(self, origin: str, keys: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The stored hashes of several nodes (level, idx) in one query (a proof's O(log n) of them)."""
        out: dict[tuple[int, int], bytes] = {}
        for start in range(0, len(keys), 100):
            chunk = keys[start:start + 100]
            where = " OR ".join(["(level = ? AND idx = ?)"] * len(chunk))
            params: list[Any] = [origin]
            for level, idx in chunk:
                params += [level, idx]
            for level, idx, h in self._rows(f"SELECT level, idx, hash FROM merkle_nodes WHERE origin = ? AND ({where})",
                                            params):
                out[(int(level), int(idx))] = bytes(h)
        return out

    def insert_merkle_nodes(self, origin: str, nodes: list[tuple[int, int, bytes]]) -> None:
        self._conn.executemany(
            self._s.sql("INSERT INTO merkle_nodes (origin, level, idx, hash) VALUES (?, ?, ?, ?)"),
            [(origin, level, idx, h) for level, idx, h in nodes],
        )

    # -- checkpoints
    def last_checkpoint(self, origin: str) -> AcceptedCheckpoint | None:
        rows = self._rows("SELECT size, root, note, cosignature FROM checkpoints WHERE origin = ? "
                          "ORDER BY size DESC LIMIT 1", (origin,))
        if not rows:
            return None
        size, root, note, cosignature = rows[0]
        return AcceptedCheckpoint(int(size), bytes(root), note, cosignature)

    def put_checkpoint(self, origin: str, cp: AcceptedCheckpoint, now: str) -> None:
        self._exec(
            "INSERT INTO checkpoints (origin, size, root, note, cosignature, accepted_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (origin, size) DO UPDATE SET cosignature = excluded.cosignature, "
            "accepted_at = excluded.accepted_at",
            (origin, cp.size, cp.root, cp.note, cp.cosignature, now))

    def cosigned_checkpoints(self, origin: str, from_size: int, limit: int, to_size: int | None = None,
                             newest_first: bool = False) -> list[tuple[int, bytes, str, str]]:
        """(size, root, note + cosignature line, accepted_at) of the accepted checkpoints of ``origin``
        with ``from_size`` <= size <= ``to_size``, smallest (or newest) first, at most ``limit``:
        one bounded page, read through the primary key."""
        upper = to_size if to_size is not None else 2**62
        order = "DESC" if newest_first else "ASC"
        rows = self._rows("SELECT size, root, note, cosignature, accepted_at FROM checkpoints "
                          f"WHERE origin = ? AND size >= ? AND size <= ? ORDER BY size {order} LIMIT ?",
                          (origin, from_size, upper, limit))
        return [(int(size), bytes(root), note + cosignature, at) for size, root, note, cosignature, at in rows]

    def origin_known(self, origin: str) -> bool:
        return bool(self._rows("SELECT 1 FROM heads WHERE origin = ?", (origin,)))

    def entry_hash_at(self, origin: str, seq: int) -> str | None:
        """The chain hash of the entry stored at ``seq`` (what entries.jsonl calls ``hash``)."""
        rows = self._rows("SELECT hash FROM entries WHERE origin = ? AND seq = ? LIMIT 1", (origin, seq))
        return rows[0][0] if rows else None

    def insert_checkpoint_fork(self, origin: str, size: int, root: bytes, note: str, reason: str, now: str) -> None:
        self._exec(
            "INSERT INTO checkpoint_forks (origin, size, root, note, reason, received_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING", (origin, size, root, note, reason, now))

    def checkpoint_forks(self, origin: str) -> list[dict]:
        rows = self._rows("SELECT size, root, note, reason FROM checkpoint_forks WHERE origin = ? ORDER BY size",
                          (origin,))
        return [{"size": int(a), "root": bytes(b), "note": c, "reason": d} for a, b, c, d in rows]

    def recorded_at(self, origin: str, seq: int) -> str | None:
        rows = self._rows("SELECT recorded_at FROM entries WHERE origin = ? AND seq = ?", (origin, seq))
        return str(rows[0][0]) if rows else None

    def insert_time_flags(self, origin: str, flags: list[Backwards], now: str) -> None:
        for f in flags:
            self._exec("INSERT INTO time_flags (origin, seq, recorded_at, previous_seq, previous, flagged_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (origin, f.seq, f.recorded_at, f.previous_seq, f.previous, now))

    def time_flags(self, origin: str) -> list[dict]:
        rows = self._rows("SELECT seq, recorded_at, previous_seq, previous, flagged_at FROM time_flags "
                          "WHERE origin = ? ORDER BY seq", (origin,))
        return [{"seq": r[0], "recorded_at": r[1], "previous_seq": r[2], "previous": r[3], "flagged_at": r[4]}
                for r in rows]

    # -- reading back (tests, audits, the bench)
    def entries(self, origin: str, from_seq: int = 0, limit: int = 10_000) -> list[dict]:
        rows = self._rows(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE origin = ? AND seq >= ? ORDER BY seq LIMIT ?",
            (origin, from_seq, limit),
        )
        names = [c.strip() for c in _ENTRY_COLUMNS.split(",")]
        return [{k: (bytes(v) if isinstance(v, memoryview) else v) for k, v in zip(names, r, strict=True)}
                for r in rows]

    def count_entries(self, origin: str) -> int:
        return int(self._rows("SELECT COUNT(*) FROM entries WHERE origin = ?", (origin,))[0][0])

    def forks(self, origin: str) -> list[dict]:
        rows = self._rows(
            "SELECT seq, hash, reason, held_hash, kid, entry, signature FROM forks WHERE origin = ? ORDER BY seq, hash",
            (origin,),
        )
        names = ("seq", "hash", "reason", "held_hash", "kid", "entry", "signature")
        return [{k: (bytes(v) if isinstance(v, memoryview) else v) for k, v in zip(names, r, strict=True)}
                for r in rows]


class Storage(ABC):
    """A pool of connections to one database; ``transaction()`` gives a ``Tx``."""

    placeholder = "?"
    blob = "BLOB"
    bigint = "INTEGER"
    tx_class: type[Tx]

    def __init__(self, pool_size: int = 4) -> None:
        self._pool: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._closed = False

    # -- backend hooks
    @abstractmethod
    def _connect(self) -> Any:
        """A new connection of the backend."""

    @abstractmethod
    def _begin(self, conn: Any, write: bool) -> AbstractContextManager[None]:
        """The backend's transaction on `conn`."""

    @abstractmethod
    def _errors(self) -> tuple[type[BaseException], ...]:
        """The backend's exceptions that mean "storage unavailable"."""

    def _usable(self, conn: Any) -> bool:
        return True

    # -- shared
    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def ddl(self) -> list[str]:
        return [stmt.format(blob=self.blob, bigint=self.bigint) for stmt in _DDL]

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Tx]:
        """One transaction on a pooled connection: committed on normal exit, rolled back on error.

        ``write=False`` for reads (SQLite then does not take the write lock). Database failures
        surface as StorageError; the connection that saw one is discarded.
        """
        if self._closed:
            raise StorageError("the gateway storage is closed")
        self._slots.acquire()
        conn = None
        try:
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                try:
                    conn = self._connect()
                except self._errors() as exc:
                    raise StorageError(f"cannot connect to the gateway database: {exc}") from exc
            try:
                with self._begin(conn, write):
                    yield self.tx_class(self, conn)
            except self._errors() as exc:
                self._discard(conn)
                conn = None
                raise StorageError(f"gateway database error: {exc}") from exc
        finally:
            if conn is not None:
                if self._closed or not self._usable(conn):
                    self._discard(conn)
                else:
                    self._pool.put(conn)
            self._slots.release()

    def _discard(self, conn: Any) -> None:
        try:
            conn.close()
        except Exception:
            pass

    # statement that serializes concurrent first starts (CREATE TABLE IF NOT EXISTS is not
    # race-free in PostgreSQL); SQLite's write lock already does it
    schema_lock: str | None = None

    def create_schema(self) -> None:
        with self.transaction() as tx:
            if self.schema_lock:
                tx._exec(self.schema_lock)
            for stmt in self.ddl():
                tx._exec(stmt)
            tx._exec(
                "INSERT INTO gateway_meta (key, value) VALUES ('schema_version', ?) ON CONFLICT DO NOTHING",
                (SCHEMA_VERSION,),
            )
            version = tx._rows("SELECT value FROM gateway_meta WHERE key = 'schema_version'")[0][0]
        if version != SCHEMA_VERSION:
            raise StorageError(f"the gateway database has schema version {version}; "
                               f"this gateway knows {SCHEMA_VERSION}")

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._discard(self._pool.get_nowait())
            except queue.Empty:
                return


# ------------------------------------------------------------------------------------------ SQLite


class SqliteTx(Tx):
    _CHUNK = 500  # well under SQLite's bound-variable limit

    def _in(self, column: str, values: list[Any]) -> Iterator[tuple[str, list[Any]]]:
        for i in range(0, len(values), self._CHUNK):
            chunk = values[i : i + self._CHUNK]
            yield f"{column} IN ({', '.join('?' * len(chunk))})", chunk


class SqliteStorage(Storage):
    """The database file and its ``-wal``/``-shm`` are 0600 and a directory made here 0700: they
    hold record bodies. (SQLite creates the WAL and SHM files with the database file's mode; the
    chmod after connecting also tightens files an older gateway left 0644.)"""

    tx_class = SqliteTx

    def __init__(self, path: Path, pool_size: int = 4) -> None:
        super().__init__(pool_size)
        self.path = Path(path)
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.parent.chmod(0o700)
        if not self.path.exists():  # created 0600 before SQLite would create it 0644 (the usual umask)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=60000")
        self._owner_only()
        return conn

    def _owner_only(self) -> None:
        for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            try:
                if path.stat().st_mode & 0o077:
                    path.chmod(0o600)
            except FileNotFoundError:
                pass
            except PermissionError:
                pass  # another user's file (a read-only audit copy): not ours to change

    @contextmanager
    def _begin(self, conn: sqlite3.Connection, write: bool) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front: the head read at the start of a batch
        # cannot go stale before the batch commits. Readers do not wait for writers (WAL).
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def __repr__(self) -> str:
        return f"SqliteStorage({str(self.path)!r})"


# -------------------------------------------------------------------------------------- PostgreSQL


class PostgresTx(Tx):
    def _in(self, column: str, values: list[Any]) -> Iterator[tuple[str, list[Any]]]:
        if values:
            yield f"{column} = ANY(%s)", [list(values)]

    def lock_head(self, origin: str, now: str) -> tuple[int, str]:
        self.ensure_head(origin, now)
        rows = self._rows("SELECT seq, hash FROM heads WHERE origin = ? FOR UPDATE", (origin,))
        return int(rows[0][0]), rows[0][1]

    def insert_entries(self, origin: str, rows: list[NewEntry], now: str) -> None:
        with self._conn.cursor() as cur, cur.copy(f"COPY entries ({_ENTRY_COLUMNS}) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(self._entry_tuple(origin, r, now))

    def insert_merkle_nodes(self, origin: str, nodes: list[tuple[int, int, bytes]]) -> None:
        with self._conn.cursor() as cur, cur.copy("COPY merkle_nodes (origin, level, idx, hash) FROM STDIN") as copy:
            for level, idx, h in nodes:
                copy.write_row((origin, level, idx, h))


class PostgresStorage(Storage):
    schema_lock = "SELECT pg_advisory_xact_lock(7306482019)"
    placeholder = "%s"
    blob = "BYTEA"
    bigint = "BIGINT"
    tx_class = PostgresTx

    def __init__(self, url: str, pool_size: int = 4) -> None:
        super().__init__(pool_size)
        import psycopg  # imported here so that a SQLite-only gateway does not need it

        self._psycopg = psycopg
        self.url = url

    def _connect(self) -> Any:
        return self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    @contextmanager
    def _begin(self, conn: Any, write: bool) -> Iterator[None]:
        with conn.transaction():
            yield

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.Error,)

    def _usable(self, conn: Any) -> bool:
        return not conn.closed and not conn.broken

    def __repr__(self) -> str:
        return "PostgresStorage(...)"  # the URL may carry a password


def check_url(db_url: str) -> None:
    """StorageURLError unless ``db_url`` names a SQLite file or a PostgreSQL database."""
    if db_url.startswith("sqlite:///"):
        path = db_url[len("sqlite:///") :]
        if not path or path.endswith("/"):
            raise StorageURLError(f"{db_url!r}: give a file, e.g. sqlite:///./var/gateway/gateway.db")
    elif not db_url.startswith(("postgresql://", "postgres://")):
        raise StorageURLError(
            "the gateway db_url must be sqlite:///PATH (relative), sqlite:////PATH (absolute) "
            f"or postgresql://USER@HOST:PORT/DB, not {db_url.split('://')[0]!r}://..."
        )


def open_storage(db_url: str, pool_size: int = 4) -> Storage:
    """The storage named by ``db_url``, schema created if needed; StorageURLError for an unknown form."""
    check_url(db_url)
    if db_url.startswith("sqlite:///"):
        storage: Storage = SqliteStorage(Path(db_url[len("sqlite:///") :]), pool_size)
    else:
        storage = PostgresStorage(db_url, pool_size)
    try:
        storage.create_schema()
    except BaseException:
        storage.close()
        raise
    return storage
