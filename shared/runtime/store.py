"""LMDB environment of one stage: the durability boundary (the broker is only transport).

One writer per environment. Every write transaction is synced on commit, so a commit that
returned survives kill -9 and power loss; callers ack or receipt only after it returns.

The map grows at run time. A store opens with a modest map (`stage.map_size_mb`) and a cap
(`stage.map_max_mb` and its siblings, one per store class); a write that hits the map's end
(MapFullError) grows the map (`next_map_size`) and raises `MapGrown`, and the caller retries
its unit of work, which rolled back whole. At the cap the write raises `MapFullAtCap` and the
caller holds its work (a stage freezes) until the cap is raised or room is freed.
LMDB resizes a map only while this process has no transaction open (mdb_env_set_mapsize), so
every transaction passes a gate (`TxnGate`) that lets the resize wait for the other threads'
readers (sign's checkpointer, uplink's pusher) to finish and holds new ones meanwhile. A
process that only reads (`readonly=True`) sees MDB_MAP_RESIZED when the writer grew the map
past its own mapping and adopts the new size (`set_mapsize(0)`) before it reads on.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import lmdb

U64 = struct.Struct(">Q")
MIB = 1 << 20
GROW_STEP_MAX = 1 << 30  # one growth step adds at most 1 GiB of address space
GATE_WAIT_S = 10.0  # how long a resize waits for other threads' transactions before giving up


def u64(n: int) -> bytes:
    """Big-endian so LMDB's byte order is numeric order (append-only keys, ordered scans)."""
    return U64.pack(n)


def from_u64(b: bytes) -> int:
    return U64.unpack(b)[0]


def next_map_size(current: int, cap: int) -> int | None:
    """The map size after one growth step, or None at the cap.

    Doubling keeps the number of resizes (each one redoes a rolled-back batch) logarithmic;
    a step of at most GROW_STEP_MAX keeps a large store from claiming far more than it needs;
    whole MiB keep the size a multiple of every page size; never past `cap`.
    """
    if current >= cap:
        return None
    step = min(max(current, MIB), GROW_STEP_MAX)
    grown = -(-(current + step) // MIB) * MIB
    return min(grown, cap)


class StoreError(Exception):
    """The store cannot be opened or written (disk full, map full, permissions)."""


class MapGrown(lmdb.MapFullError):
    """The write hit the map's end and the map has grown since: retry the unit of work now.
    A subclass of MapFullError, so a caller that does not know it holds and retries as before."""


class MapFullAtCap(lmdb.MapFullError):
    """The write hit the map's end and the map is at its configured cap."""


class TxnGate:
    """Counts this process's open transactions of one environment, so that a resize runs only
    when there are none. A thread that already holds a transaction may open another (nested)
    one without waiting; a resize asked for by such a thread is refused (it would wait on itself)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._open = 0
        self._resizing = False
        self._local = threading.local()

    def enter(self) -> None:
        depth = getattr(self._local, "depth", 0)
        with self._cond:
            if depth == 0:
                while self._resizing:
                    self._cond.wait()
            self._open += 1
        self._local.depth = depth + 1

    def leave(self) -> None:
        self._local.depth -= 1
        with self._cond:
            self._open -= 1
            if self._open == 0:
                self._cond.notify_all()

    @contextmanager
    def txn(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def exclusive(self, action: Callable[[], None], wait_s: float = GATE_WAIT_S) -> bool:
        """Run `action` with no transaction open in this process; False if that could not be had."""
        if getattr(self._local, "depth", 0):
            return False
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            try:
                while self._open:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                action()
                return True
            finally:
                self._resizing = False
                self._cond.notify_all()


class Store:
    """Named tables in one LMDB environment under `$MRO_DATA_DIR/<stage>/`.

    `map_size_mb` is the map it opens with (an existing larger store keeps its size);
    `map_max_mb` the cap it may grow to (None: it never grows past `map_size_mb`).
    """

    def __init__(self, path: Path, tables: tuple[str, ...], *, map_size_mb: int = 4096,
                 map_max_mb: int | None = None, readonly: bool = False):
        self.path = Path(path)
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        elif not (self.path / "data.mdb").exists():
            raise StoreError(f"no store at {self.path}: has the service run with this MRO_DATA_DIR?")
        self._gate = TxnGate()
        self.max_bytes = max(map_size_mb, map_max_mb or 0) * MIB
        try:
            self.env = lmdb.open(
                str(self.path),
                map_size=map_size_mb * MIB,
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

    @property
    def map_size(self) -> int:
        """The current map size, in bytes."""
        return int(self.env.info()["map_size"])

    def used_bytes(self) -> int:
        """Bytes of the map in use (pages up to the last one written; freed pages count too)."""
        return (int(self.env.info()["last_pgno"]) + 1) * int(self.env.stat()["psize"])

    def grow(self) -> bool:
        """Take one growth step (`next_map_size`); False at the cap, or if this thread holds a
        transaction, or other threads' transactions did not end within GATE_WAIT_S."""
        target = next_map_size(self.map_size, self.max_bytes)
        if target is None:
            return False
        return self._gate.exclusive(lambda: self.env.set_mapsize(target))

    def _adopt_map_size(self) -> None:
        """Another process grew the map: map as much as the file's header says (MDB_MAP_RESIZED)."""
        if not self._gate.exclusive(lambda: self.env.set_mapsize(0)):
            raise StoreError(f"store {self.path} grew and cannot be remapped while this thread reads it")

    def _begin(self, write: bool) -> lmdb.Transaction:
        """A transaction counted by the gate (`_end` uncounts it); adopts a map another process
        grew first (MDB_MAP_RESIZED)."""
        for _ in range(3):
            self._gate.enter()
            try:
                return self.env.begin(write=write, buffers=False)
            except lmdb.MapResizedError:
                self._gate.leave()
            except BaseException:
                self._gate.leave()
                raise
            self._adopt_map_size()
        raise StoreError(f"store {self.path} keeps changing its map size")

    @contextmanager
    def _txn(self, write: bool) -> Iterator[lmdb.Transaction]:
        txn = self._begin(write)
        try:
            with txn:
                yield txn
        finally:
            self._gate.leave()

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """One atomic, synced unit of work: everything inside commits together or not at all.
        A full map rolls it back and raises MapGrown (retry) or MapFullAtCap (hold)."""
        try:
            with self._txn(write=True) as txn:
                yield txn
        except lmdb.MapFullError as exc:
            if isinstance(exc, (MapGrown, MapFullAtCap)):
                raise
            before = self.map_size
            if self.grow():
                raise MapGrown(f"store {self.path} grew from {before // MIB} to {self.map_size // MIB} MiB") from exc
            if self.map_size < self.max_bytes:
                raise  # the resize had to wait for other transactions: the retry tries again
            raise MapFullAtCap(
                f"store {self.path} is full at its cap of {self.max_bytes // MIB} MiB: raise the cap "
                "in edge.toml (see README, store growth) or free disk, then `mro-edge resume`") from exc

    def read(self) -> AbstractContextManager[lmdb.Transaction]:
        return self._txn(write=False)

    def count(self, table: str) -> int:
        with self.read() as txn:
            return txn.stat(self._tables[table])["entries"]

    def copy_to(self, path: Path) -> None:
        """A consistent, compacted copy of the whole environment into the empty directory `path`
        (one read transaction: safe beside the running writer)."""
        Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._gate.txn():
            self.env.copy(str(path), compact=True)

    def close(self) -> None:
        self.env.close()


def _table_pages(env: lmdb.Environment, txn: lmdb.Transaction) -> int:
    """Pages holding data: the main table's and every named table's (each read by its stat only)."""
    stat = env.stat()
    pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
    for name, _ in txn.cursor():
        try:
            found = txn.stat(env.open_db(bytes(name), txn=txn, create=False))
        except lmdb.Error:
            continue  # a key of the main table that is not a table
        pages += found["branch_pages"] + found["leaf_pages"] + found["overflow_pages"]
    return pages


def reusable_bytes(path: Path, store: Store | None = None) -> int | None:
    """Bytes of the environment's file that LMDB may reuse: pages up to the last one written that
    hold no table's data (freed by deletes; LMDB never shrinks its file). Read beside the running
    writer through a reader slot (`store`: this process's own open Store of `path`, since an
    environment must not be opened twice in one process); only page counts are read, never a
    table's content. None if it cannot be read now."""
    try:
        if store is not None:
            with store.read() as txn:
                return _unused(store.env, txn)
        env = lmdb.open(str(path), readonly=True, max_dbs=64, create=False)
    except lmdb.Error:
        return None
    try:
        env.reader_check()  # a reader killed mid-read (this one too, by kill -9) pins no pages for good
        with env.begin() as txn:
            return _unused(env, txn)
    except lmdb.Error:
        return None
    finally:
        env.close()


def _unused(env: lmdb.Environment, txn: lmdb.Transaction) -> int:
    psize = int(env.stat()["psize"])
    written = int(env.info()["last_pgno"]) + 1
    return max(0, written - 2 - _table_pages(env, txn)) * psize  # 2: the meta pages


_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86-64 and arm64: type, whence, start, len, pid


def store_in_use(path: Path) -> bool:
    """Whether a live process has the LMDB environment at `path` open: every such process holds
    a shared fcntl lock on byte 0 of its `lock.mdb` (mdb_env_excl_lock). Asked with F_GETLK,
    nothing is opened but the lock file, no table is read. Only for an environment this
    process does not have open itself (closing the descriptor would drop its own locks)."""
    try:
        fd = os.open(Path(path) / "lock.mdb", os.O_RDONLY)
    except OSError:
        return False
    try:
        found = fcntl.fcntl(fd, fcntl.F_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
        return _FLOCK.unpack(found)[0] != fcntl.F_UNLCK
    except OSError:
        return False
    finally:
        os.close(fd)


def table_counts(path: Path) -> dict[str, int]:
    """Entries per named table of the environment at `path`, read without a lock file (for a
    copy nobody writes: a backup). The unnamed main table lists the named ones."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=64, subdir=True)
    try:
        with env.begin() as txn:
            names = [bytes(key) for key, _ in txn.cursor()]
        counts: dict[str, int] = {}
        for name in names:
            db = env.open_db(name, create=False)
            with env.begin() as txn:
                counts[name.decode()] = int(txn.stat(db)["entries"])
        return counts
    finally:
        env.close()
