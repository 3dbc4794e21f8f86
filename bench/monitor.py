"""What the bench watches from outside the services: memory and CPU per process (psutil) and
each stage's LMDB (read-only, MVCC: no effect on the writer) for progress and commit counts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

from shared.runtime.store import Store

SAMPLE_S = 0.1


class ProcessSampler:
    """Samples RSS of named processes every 100 ms; peaks are kept per phase.

    Besides RSS (the target's measure) it keeps the peak of anonymous memory (RSS minus the
    file-backed and shared pages): a stage's RSS also counts the pages of its LMDB map it has
    touched, which are page cache the kernel can reclaim, not heap.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peaks: dict[str, dict[str, int]] = {}
        self.anon_peaks: dict[str, dict[str, int]] = {}
        self._phase: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def rss(self) -> dict[str, int]:
        return {name: rss for name, (rss, _) in self.memory().items()}

    def memory(self) -> dict[str, tuple[int, int]]:
        """(rss, anonymous) bytes per process."""
        out = {}
        for name, proc in self.procs.items():
            try:
                info = proc.memory_info()
            except psutil.Error:
                continue
            out[name] = (info.rss, info.rss - getattr(info, "shared", 0))
        return out

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each process."""
        out = {}
        for name, proc in self.procs.items():
            try:
                times = proc.cpu_times()
                out[name] = times.user + times.system
            except psutil.Error:
                pass
        return out

    def phase(self, name: str | None) -> None:
        """Attribute samples from now on to phase `name` (None: sample nothing)."""
        with self._lock:
            self._phase = name
            if name is not None:
                self.peaks.setdefault(name, {})
                self.anon_peaks.setdefault(name, {})

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            with self._lock:
                phase = self._phase
            if phase is None:
                continue
            sample = self.memory()
            with self._lock:
                peaks, anon = self.peaks[phase], self.anon_peaks[phase]
                for name, (rss, anonymous) in sample.items():
                    peaks[name] = max(peaks.get(name, 0), rss)
                    anon[name] = max(anon.get(name, 0), anonymous)


class StageProbe:
    """Read-only views of the ingest, validate and sign stores (one LMDB env each per process)."""

    def __init__(self, data_dir: Path) -> None:
        self.stores = {
            "ingest": Store(data_dir / "ingest", ("seen", "outbox"), readonly=True),
            "validate": Store(data_dir / "validate", ("seen", "outbox"), readonly=True),
            "sign": Store(data_dir / "sign", ("seen", "outbox", "ledger"), readonly=True),
        }

    def ledger(self) -> int:
        return self.stores["sign"].count("ledger")

    def held(self) -> dict[str, int]:
        """Records each stage holds durably (its seen-key table)."""
        return {name: store.count("seen") for name, store in self.stores.items()}

    def outbox(self) -> dict[str, int]:
        return {name: store.count("outbox") for name, store in self.stores.items()}

    def txnids(self) -> dict[str, int]:
        """LMDB's last committed transaction id per stage: the difference over a run is the
        number of write transactions (one synced commit each)."""
        return {name: store.env.info()["last_txnid"] for name, store in self.stores.items()}

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def wait_progress(read, target: int, *, stall_s: float, cap_s: float, on_stall=None, interval_s: float = 0.02,
                  watch=None) -> tuple[bool, float, int]:
    """Poll `read()` until it reaches `target`. Gives up when it has not moved for `stall_s` or
    after `cap_s`. `on_stall()` is called once a second while it has not moved for 5 s (devices
    re-send then, as the contract asks of them). `watch(now)` is called every poll.
    Returns (reached, seconds, last value)."""
    start = time.perf_counter()
    last_value, last_move, last_nudge = read(), start, start
    while True:
        now = time.perf_counter()
        value = read()
        if watch:
            watch(now)
        if value >= target:
            return True, now - start, value
        if value != last_value:
            last_value, last_move = value, now
        if now - last_move > stall_s or now - start > cap_s:
            return False, now - start, value
        if on_stall and now - last_move > 5 and now - last_nudge > 1:
            last_nudge = now
            on_stall()
        time.sleep(interval_s)
