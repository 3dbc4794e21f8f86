"""One storage budget for the data directory (`[storage]`), split by class, and the disk-full policy.

Bytes are measured from the files themselves: the blocks (`st_blocks`) of every file under
`$MRO_DATA_DIR`, classed by the top directory it sits in, named after the stores the runtime
knows (`STORE_CLASS`), less the pages an LMDB store may reuse inside its file (LMDB never
shrinks a file: a spool drained after an outage keeps its size, and counting that as used would
refuse intake for good). Only page counts are read, never a table's content, so any service
(ingest, the embedded broker, `mro-edge` commands, retention or archive work) may ask
`bytes_by_class`. LMDB files are sparse: their blocks are what the disk holds, not the map.

Classes: `ledger` (sign's ledger and the uplink's progress), `intake` (the broker's spool and
the stores of records on their way to the ledger: ingest, validate), `logs`, and `other`
(keys, broker credentials, a local gateway), which counts against the whole budget only. The
DLQ class is each stage's DLQ table inside its store (`shared.runtime.dlq`): its share caps
`[stage] dlq_budget_kb` (`Config.dlq_budget_bytes`) rather than being measured here; likewise a
store's map cap never exceeds its class's share (`Config.store_cap_mb`).

The policy (`refusal`): new device input is refused when the data directory uses its whole
budget, when the intake class uses its share, or when the filesystem has less than
`reserve_mb` free (a real ENOSPC is the limit case of the last). Nothing stored is ever
evicted; intake resumes by itself once a measurement finds room again. While refusing, the
limits are a little lower (`RESUME_MARGIN`), so that intake does not flap at the edge.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from shared.runtime.config import STORAGE_CLASSES, StorageConfig
from shared.runtime.store import Store, reusable_bytes

MIB = 1 << 20
STORE_CLASS = {"sign": "ledger", "uplink": "ledger", "spool": "intake", "ingest": "intake", "validate": "intake"}
DIR_CLASS = {**STORE_CLASS, "logs": "logs"}
OTHER = "other"
MEASURED = ("ledger", "intake", "logs", OTHER)
RESUME_MARGIN = 0.02  # while refusing, room must be this fraction of the limit below it to resume
FLAT_BYTES_PER_S = 1.0  # growth slower than this is "not filling"


def store_class(store: str) -> str:
    """The class of a store by its name (an unknown pipeline stage's store is intake)."""
    return STORE_CLASS.get(store, "intake")


def is_disk_full(exc: BaseException) -> bool:
    """A real ENOSPC (or EDQUOT) from the filesystem, as LMDB or Python raise it."""
    if isinstance(exc, lmdb.DiskError):
        return True
    if isinstance(exc, lmdb.Error):
        return "No space left" in str(exc) or "Disk quota" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _blocks(path: str) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:  # removed while we walked
        return 0


def bytes_by_class(data_dir: Path, open_stores: Mapping[str, Store] | None = None) -> dict[str, int]:
    """Bytes used per class (`MEASURED`) under `data_dir`: the files' allocated blocks, less what
    the LMDB stores may reuse inside their files (`store.reusable_bytes`: LMDB never shrinks a
    file, so a drained store would otherwise count as full for good). `open_stores`: the stores
    this process has open, by directory name (an environment is never opened twice in one process)."""
    found = dict.fromkeys(MEASURED, 0)
    root = Path(data_dir)
    if not root.is_dir():
        return found
    for entry in os.scandir(root):
        storage_class = DIR_CLASS.get(entry.name, OTHER) if entry.is_dir(follow_symlinks=False) else OTHER
        if entry.is_dir(follow_symlinks=False):
            for folder, _dirs, files in os.walk(entry.path):
                found[storage_class] += sum(_blocks(os.path.join(folder, name)) for name in files)
            if entry.name in STORE_CLASS and os.path.exists(os.path.join(entry.path, "data.mdb")):
                file_bytes = _blocks(os.path.join(entry.path, "data.mdb"))
                reusable = reusable_bytes(Path(entry.path), (open_stores or {}).get(entry.name)) or 0
                found[storage_class] -= min(reusable, file_bytes)
        else:
            found[OTHER] += _blocks(entry.path)
    return found


@dataclass(frozen=True)
class Usage:
    """One measurement of the data directory against the budget."""

    at: float  # epoch seconds
    by_class: dict[str, int]
    budget: int
    class_budgets: dict[str, int]
    fs_free: int
    fs_size: int

    @property
    def total(self) -> int:
        return sum(self.by_class.values())

    @property
    def percent(self) -> float:
        return 100.0 * self.total / self.budget

    def over(self) -> list[str]:
        """The classes at or over their share, and `budget` when the whole is."""
        found = [name for name, used in self.by_class.items()
                 if name in self.class_budgets and used >= self.class_budgets[name]]
        return found + (["budget"] if self.total >= self.budget else [])

    def payload(self) -> dict[str, Any]:
        """For a status message: every figure in bytes."""
        return {"used_bytes": self.total, "budget_bytes": self.budget, "filesystem_free_bytes": self.fs_free,
                "filesystem_bytes": self.fs_size,
                "classes": {name: {"used_bytes": self.by_class.get(name, 0),
                                   "budget_bytes": self.class_budgets.get(name)} for name in MEASURED},
                # inside the stage stores: each stage reports its DLQ's bytes itself (`dlq_bytes`)
                "dlq_budget_bytes": self.class_budgets.get("dlq")}


def measure(data_dir: Path, storage: StorageConfig, now: Callable[[], float] = time.time,
            open_stores: Mapping[str, Store] | None = None) -> Usage:
    """Bytes per class under `data_dir` and the filesystem's free space (what an unprivileged
    writer may still take)."""
    by_class = bytes_by_class(data_dir, open_stores)
    try:
        fs = os.statvfs(data_dir)
        free, size = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
    except OSError:
        free, size = 0, 0
    budgets = {name: storage.class_budget(name) for name in STORAGE_CLASSES}
    return Usage(now(), by_class, storage.budget_bytes, budgets, free, size)


def refusal(usage: Usage, storage: StorageConfig, *, refusing: bool = False) -> str | None:
    """Why new device input must be refused now, or None. `refusing`: it is refused already, so
    the limits are RESUME_MARGIN lower (no flapping at the edge)."""
    keep = 1.0 - RESUME_MARGIN if refusing else 1.0
    reserve = storage.reserve_mb * MIB / keep
    if usage.fs_free < reserve or usage.fs_free == 0:
        return (f"the filesystem of the data directory has {usage.fs_free / MIB:.1f} MiB free, below "
                f"[storage] reserve_mb ({storage.reserve_mb} MiB)")
    if usage.total >= usage.budget * keep:
        return (f"the data directory uses {usage.total / MIB:.1f} MiB of its budget of {usage.budget / MIB:.1f} MiB "
                "([storage] budget_bytes)")
    intake, share = usage.by_class.get("intake", 0), usage.class_budgets.get("intake", 0)
    if intake >= share * keep:
        return (f"records waiting for the ledger (intake) use {intake / MIB:.1f} MiB of their share of "
                f"{share / MIB:.1f} MiB ([storage] intake_share)")
    return None


def level(percent: float, storage: StorageConfig) -> int:
    """The highest threshold `percent` is at: 0, warn_percent, alarm_percent or 100."""
    for threshold in (100.0, storage.alarm_percent, storage.warn_percent):
        if percent >= threshold:
            return int(threshold)
    return 0


def forecast_s(samples: Sequence[tuple[float, int]], budget: int) -> float | None:
    """Seconds until the used bytes reach `budget` at the growth rate of `samples` ((epoch s,
    bytes used), oldest first; least squares), 0 when already there; None when not filling
    (fewer than two samples, a span of no time, or growth under FLAT_BYTES_PER_S)."""
    if len(samples) < 2:
        return None
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_b = sum(b for _, b in samples) / n
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread <= 0:
        return None
    slope = sum((t - mean_t) * (b - mean_b) for t, b in samples) / spread
    last = samples[-1][1]
    if last >= budget:
        return 0.0
    if slope < FLAT_BYTES_PER_S:
        return None
    return (budget - last) / slope


@dataclass
class Thresholds:
    """Alarms when use crosses a threshold upwards, once per crossing, and one when it is back below."""

    storage: StorageConfig
    current: int = 0

    def crossed(self, usage: Usage) -> tuple[str, str] | None:
        """(alarm kind, detail) when the level changed since the last call, else None."""
        now = level(usage.percent, self.storage)
        if now == self.current:
            return None
        before, self.current = self.current, now
        figures = f"{usage.total / MIB:.1f} MiB of {usage.budget / MIB:.1f} MiB ({usage.percent:.0f} %)"
        if now > before:
            return ("storage_threshold",
                    f"the data directory uses {figures}, over {now} % of its budget; at 100 % new device "
                    "input is refused. Free space: see README, 'Storage budget and a full disk'")
        if now == 0:
            return "storage_ok", f"the data directory uses {figures}, below every threshold again"
        return "storage_threshold", f"the data directory uses {figures}, back below {before} % of its budget"


def reload_storage() -> StorageConfig | None:
    """`[storage]` as edge.toml and the environment say now (None: unreadable), so that a budget
    raised while intake is refused takes effect without a restart."""
    from shared.runtime.config import ConfigError, load_config

    try:
        return load_config().storage
    except (ConfigError, OSError):
        return None


@dataclass
class Guard:
    """Measures the data directory every `storage.check_interval_s` and says whether device input
    is refused; `disk_full()` after a real ENOSPC measures again at the next check. While it
    refuses, each measurement first reads `[storage]` again (`reload`)."""

    data_dir: Path
    storage: StorageConfig
    clock: Callable[[], float] = time.monotonic
    reload: Callable[[], StorageConfig | None] | None = None
    open_stores: Mapping[str, Store] = field(default_factory=dict)  # this process's own (`bytes_by_class`)
    usage: Usage | None = None
    reason: str | None = None
    _checked_at: float = field(default=float("-inf"))

    def check(self) -> str | None:
        """The refusal reason now (None: room), measuring first if the last measurement is due."""
        if self.clock() - self._checked_at >= self.storage.check_interval_s:
            self._checked_at = self.clock()
            if self.reason is not None and self.reload is not None:
                self.storage = self.reload() or self.storage
            self.usage = measure(self.data_dir, self.storage, open_stores=self.open_stores)
            self.reason = refusal(self.usage, self.storage, refusing=self.reason is not None)
        return self.reason

    def disk_full(self, exc: BaseException) -> None:
        """A write failed with ENOSPC: refuse until a measurement finds room."""
        self.reason = self.reason or f"the filesystem of the data directory is full ({type(exc).__name__})"
        self._checked_at = self.clock()
