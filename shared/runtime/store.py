"""LMDB environment of one stage: the durability boundary (the broker is only transport).

One writer per environment. Every write transaction is synced on commit, so a commit that
returned survives kill -9 and power loss; callers ack or receipt only after it returns.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

U64 = struct.Struct(">Q")


def u64(n: int) -> bytes:
    """Big-endian so LMDB's byte order is numeric order (append-only keys, ordered scans)."""
    return U64.pack(n)


def from_u64(b: bytes) -> int:
    return U64.unpack(b)[0]


class StoreError(Exception):
    """The store cannot be opened or written (disk full, map full, permissions)."""


class Store:
    """Named tables in one LMDB environment under `$MRO_DATA_DIR/<stage>/`."""

    def __init__(self, path: Path, tables: tuple[str, ...], *, map_size_mb: int = 4096,
                 readonly: bool = False):
        self.path = Path(path)
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        elif not (self.path / "data.mdb").exists():
            raise StoreError(f"no store at {self.path}: has the service run with this MRO_DATA_DIR?")
        try:
            self.env = lmdb.open(
                str(self.path),
                map_size=map_size_mb * 1024 * 1024,
                max_dbs=len(tables) + 1,
                sync=True,
                metasync=True,
                readonly=readonly,
                max_readers=64,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._tables = {name: self.env.open_db(name.encode(), create=not readonly) for name in tables}

    def table(self, name: str):
        return self._tables[name]

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """One atomic, synced unit of work: everything inside commits together or not at all."""
        with self.env.begin(write=True) as txn:
            yield txn

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        with self.env.begin(buffers=False) as txn:
            yield txn

    def count(self, table: str) -> int:
        with self.env.begin() as txn:
            return txn.stat(self._tables[table])["entries"]

    def close(self) -> None:
        self.env.close()
