"""The one clock of the box, and its one format: RFC 3339 UTC with milliseconds and `Z`.

Every timestamp this box writes on the wire, in status, alarms, receipts, run files and the
ledger uses the format, so operators and auditors compare times without reformatting them.

Wall time comes from one seam, `current()` (a `Clock`), never from `time.time()` or
`datetime.now()` directly, so a test can put the whole box's clock behind, ahead, or step it:

* in process: `use_clock(Clock(offset_s=-60))`, then `clock.step(+60)`;
* across processes (a stack started by a test): `MRO_CLOCK_OFFSET_FILE` names a small JSON file
  `{"offset_s": -60, "synchronised": false}` that every process re-reads at most every
  `SEAM_REFRESH_S`; rewriting it steps every service's wall clock at once. Unset in production.

A step is the wall clock moving against the boot-time clock (`elapsed`, which counts suspend
too but is never set): `StepWatch` notices one. Whether the kernel's clock is disciplined by
NTP (`clock_sync`) is read with `adjtimex(2)` (read-only, no privilege): an RTC-less box without
NTP boots at whatever time it saved last, and says so here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

OFFSET_FILE_ENV = "MRO_CLOCK_OFFSET_FILE"
SEAM_REFRESH_S = 0.2


def utc_text(moment: datetime) -> str:
    """`moment` (timezone-aware) as e.g. `2026-12-02T01:20:03.512Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _elapsed() -> float:
    """Seconds since boot, suspend included (CLOCK_BOOTTIME where there is one): never set, so
    the wall clock moving against it is a step, and a laptop's sleep is not."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


@dataclass(frozen=True)
class ClockSync:
    """Whether the wall clock is disciplined (NTP or another time source), and how well.

    `synchronised` None: unknown (no adjtimex here); `source`: what said so; `max_error_ms`:
    the kernel's bound on the clock's error, when it keeps one."""

    synchronised: bool | None
    source: str
    max_error_ms: float | None = None

    def as_dict(self) -> dict:
        out: dict = {"synchronised": self.synchronised, "source": self.source}
        if self.max_error_ms is not None:
            out["max_error_ms"] = self.max_error_ms
        return out


class Clock:
    """The box's wall clock: the system's, moved by `offset_s` (0 in production)."""

    def __init__(self, offset_s: float = 0.0, *, synchronised: bool | None = None) -> None:
        self.offset_s = offset_s
        self.forced_sync = synchronised

    def time(self) -> float:
        """Wall time, Unix seconds."""
        return time.time() + self.offset()

    def elapsed(self) -> float:
        """Boot-time seconds (`_elapsed`), the clock a step is measured against."""
        return _elapsed()

    def offset(self) -> float:
        return self.offset_s

    def step(self, seconds: float) -> None:
        """Move the wall clock by `seconds` at once (tests)."""
        self.offset_s += seconds

    def sync(self) -> ClockSync:
        if self.forced_sync is not None:
            return ClockSync(self.forced_sync, "test")
        return kernel_sync()


class SeamClock(Clock):
    """The system clock moved by what `MRO_CLOCK_OFFSET_FILE` says (see the module doc)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._read_at = -1e9
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        now = _elapsed()
        if now - self._read_at < SEAM_REFRESH_S:
            return
        with self._lock:
            self._read_at = now
            try:
                with open(self.path, "rb") as f:
                    seam = json.loads(f.read() or b"{}")
            except (OSError, ValueError):
                return  # a file being rewritten: keep what it said last
            self.offset_s = float(seam.get("offset_s", 0.0))
            sync = seam.get("synchronised")
            self.forced_sync = sync if isinstance(sync, bool) else None

    def offset(self) -> float:
        self._refresh()
        return self.offset_s

    def sync(self) -> ClockSync:
        self._refresh()
        if self.forced_sync is not None:
            return ClockSync(self.forced_sync, "seam")
        return kernel_sync()


def _from_environment() -> Clock:
    path = os.environ.get(OFFSET_FILE_ENV)
    return SeamClock(path) if path else Clock()


_clock: Clock = _from_environment()


def current() -> Clock:
    """The clock every reader of wall time on this box uses."""
    return _clock


def set_clock(clock: Clock) -> Clock:
    """Replace the box's clock (tests); returns the one it replaced."""
    global _clock
    previous, _clock = _clock, clock
    return previous


@contextmanager
def use_clock(clock: Clock) -> Iterator[Clock]:
    """`clock` as the box's clock inside the block (tests)."""
    previous = set_clock(clock)
    try:
        yield clock
    finally:
        set_clock(previous)


def now() -> datetime:
    """Now, timezone-aware UTC, from the box's clock."""
    return datetime.fromtimestamp(_clock.time(), UTC)


def utc_now() -> str:
    """Now, in the one format."""
    return utc_text(now())


def utc_from_epoch(ts: float) -> str:
    """A Unix time (e.g. when the broker delivered a message), in the one format."""
    return utc_text(datetime.fromtimestamp(ts, UTC))


def parse_utc(text: str) -> datetime:
    """The inverse of `utc_text` (also accepts `+00:00` and other RFC 3339 offsets)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- steps ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """The wall clock moved by `delta_s` against elapsed time: it said `expected` and says `found`."""

    expected: float
    found: float

    @property
    def delta_s(self) -> float:
        return self.found - self.expected

    def body(self) -> dict:
        """The `clock_step` ledger entry's body (`shared.ledger.timeline`)."""
        return {"from": utc_text(datetime.fromtimestamp(self.expected, UTC)),
                "to": utc_text(datetime.fromtimestamp(self.found, UTC)),
                "delta_ms": round(self.delta_s * 1000)}


class StepWatch:
    """Notices the wall clock stepping (backwards or forwards) by more than `threshold_s`.

    It keeps one pair (wall, elapsed) and compares the wall clock's advance since then with the
    elapsed time's: they differ only by drift (ppm) unless someone set the clock."""

    def __init__(self, threshold_s: float, clock: Clock | None = None) -> None:
        self.threshold_s = threshold_s
        self._clock = clock
        self._base: tuple[float, float] | None = None

    @property
    def clock(self) -> Clock:
        return self._clock or current()

    def check(self) -> Step | None:
        """The step since the last check, if any; the baseline moves to now either way."""
        wall, elapsed = self.clock.time(), self.clock.elapsed()
        base, self._base = self._base, (wall, elapsed)
        if base is None:
            return None
        expected = base[0] + (elapsed - base[1])
        if abs(wall - expected) > self.threshold_s:
            return Step(expected, wall)
        return None


# -- synchronisation -----------------------------------------------------------------------------

_TIME_ERROR = 5  # adjtimex's answer when the clock is not synchronised
_STA_UNSYNC = 0x0040


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
                ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("reserved", ctypes.c_int * 11)]


_adjtimex = None
_sync_cache: tuple[float, ClockSync] | None = None
SYNC_CHECK_S = 10.0


def _read_adjtimex() -> ClockSync:
    global _adjtimex
    try:
        if _adjtimex is None:
            _adjtimex = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).adjtimex
        timex = _Timex()  # modes 0: read only, needs no privilege
        state = _adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return ClockSync(None, "unknown")
    if state < 0:
        return ClockSync(None, "unknown")
    synced = state != _TIME_ERROR and not timex.status & _STA_UNSYNC
    return ClockSync(synced, "adjtimex", round(timex.maxerror / 1000, 3))


def kernel_sync() -> ClockSync:
    """The kernel's word on its clock (`adjtimex`), re-read at most every `SYNC_CHECK_S`."""
    global _sync_cache
    now_ = _elapsed()
    if _sync_cache is None or now_ - _sync_cache[0] >= SYNC_CHECK_S:
        _sync_cache = (now_, _read_adjtimex())
    return _sync_cache[1]


def clock_sync() -> ClockSync:
    """Whether the box's clock is synchronised (the seam's word in tests)."""
    return _clock.sync()
