"""One instance per data directory, enforced by the operating system.

`mro-edge run` holds an exclusive `flock` on `$MRO_DATA_DIR/run.lock`; every service holds one
on `$MRO_DATA_DIR/<service>/service.lock` (for a stage: in its LMDB store's directory). The
kernel drops a lock when its holder dies, kill -9 and power cuts included, so a lock is never
stale. The lock file names its holder (pid, command, start time), so a refused second instance
can say who is in the way and what to do.

LMDB itself lets several processes open one store, which is exactly why two sign services
once appended to one ledger: the lock, not the store, is the guard.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from shared.runtime.clock import utc_now

RUN_LOCK = "run.lock"
SERVICE_LOCK = "service.lock"


class InstanceBusy(Exception):
    """Another process holds the lock; the message names it and says what to do."""

    def __init__(self, message: str, holder: dict) -> None:
        super().__init__(message)
        self.holder = holder


def _read_holder(fd: int) -> dict:
    """The holder's record; it writes it right after locking, so wait a moment for it."""
    deadline = time.monotonic() + 1.0
    while True:
        raw = os.pread(fd, 4096, 0)
        try:
            holder = json.loads(raw)
            if isinstance(holder, dict) and holder.get("pid"):
                return holder
        except ValueError:
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class InstanceLock:
    """An exclusive, non-blocking flock on `path`, held until `release` or process exit."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def _open(self, create: bool = True) -> int:
        if not create:
            return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self, **details) -> InstanceLock:
        """Take the lock or raise InstanceBusy with the holder's record."""
        fd = self._open()
        deadline = time.monotonic() + 0.5  # `holder()` of another process may hold it for a moment
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = _read_holder(fd)
                os.close(fd)
                raise InstanceBusy(f"{self.path} is locked", holder) from None
        record = {"pid": os.getpid(), "what": self.what, "since": utc_now(),
                  "argv": sys.argv[1:], **details}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
        self._fd = fd
        return self

    def holder(self) -> dict | None:
        """Who holds the lock now (None if nobody), without taking it."""
        try:
            fd = self._open(create=False)
        except OSError:  # no lock file: nobody ever held it
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_holder(fd) or {"pid": None}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def run_lock(data_path: Path) -> InstanceLock:
    return InstanceLock(Path(data_path) / RUN_LOCK, "mro-edge run")


def service_lock(data_path: Path, service: str) -> InstanceLock:
    return InstanceLock(Path(data_path) / service / SERVICE_LOCK, f"mro-edge service {service}")


def describe(holder: dict) -> str:
    """'mro-edge service sign (pid 123, since ..., under mro-edge run pid 99)'."""
    pid = holder.get("pid")
    text = f"{holder.get('what', 'another process')} (pid {pid or '?'}"
    if holder.get("since"):
        text += f", since {holder['since']}"
    supervisor = holder.get("supervisor_pid")
    if supervisor:
        text += f", under mro-edge run pid {supervisor}" + (
            "" if pid_alive(supervisor) else ", which is gone"
        )
    return text + ")"


def run_busy_message(data_path: Path, holder: dict) -> str:
    pid = holder.get("pid")
    return (
        f"data directory {Path(data_path).resolve()} is in use by {describe(holder)}. Only one mro-edge run "
        f"per data directory: stop that one first (Ctrl-C in its terminal, or kill {pid or 'its pid'}), "
        "or give this one its own MRO_DATA_DIR"
    )


def services_busy_message(data_path: Path, busy: dict[str, dict]) -> str:
    lines = [f"data directory {Path(data_path).resolve()} is in use: "
             + "; ".join(f"{name} already runs as {describe(holder)}" for name, holder in busy.items())]
    in_the_way = (h.get("supervisor_pid") if pid_alive(h.get("supervisor_pid")) else h.get("pid")
                  for h in busy.values())
    pids = sorted({int(pid) for pid in in_the_way if pid})
    lines.append(
        f"stop {'them' if len(busy) > 1 else 'it'} first "
        f"(kill {' '.join(map(str, pids)) or 'the pid above'}),"
        " or give this one its own MRO_DATA_DIR"
    )
    return ". ".join(lines)


def service_busy_message(data_path: Path, service: str, holder: dict) -> str:
    pid = holder.get("supervisor_pid") if pid_alive(holder.get("supervisor_pid")) else holder.get("pid")
    return (f"the {service} service of data directory {Path(data_path).resolve()} already runs: "
            f"{describe(holder)}. One {service} per data directory: stop it first (kill {pid or 'its pid'}), "
            "or give this one its own MRO_DATA_DIR")


def hold_service_lock(data_path: Path, service: str) -> InstanceLock:
    """For `mro-edge service NAME`: this service's lock, and no `mro-edge run` of somebody else
    managing this data directory. Raises InstanceBusy with the message to print."""
    supervisor = os.environ.get("MRO_SUPERVISOR_PID")
    supervisor_pid = int(supervisor) if supervisor and supervisor.isdigit() else None
    running = run_lock(data_path).holder()
    if running is not None and running.get("pid") not in (supervisor_pid, None):
        raise InstanceBusy(
            f"data directory {Path(data_path).resolve()} is managed by {describe(running)}, "
            f"which runs its own {service}: stop that first (Ctrl-C in its terminal, "
            f"or kill {running.get('pid')}), or give this one its own MRO_DATA_DIR",
            running,
        )
    lock = service_lock(data_path, service)
    try:
        return lock.acquire(supervisor_pid=supervisor_pid)
    except InstanceBusy as exc:
        raise InstanceBusy(service_busy_message(data_path, service, exc.holder), exc.holder) from None
