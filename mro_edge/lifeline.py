"""Children of `mro-edge run` die with it, and tell it they are alive.

Two independent mechanisms, because a supervisor killed with -9 gets no chance to clean up:

* `die_with_parent()` (a `preexec_fn`, Linux): prctl(PR_SET_PDEATHSIG, SIGTERM) in the forked
  child before exec, so the kernel sends SIGTERM when the supervisor dies. If the supervisor
  died between fork and prctl, the child notices (getppid changed) and exits at once.
* `start()` in the child (the `mro-edge` command, when MRO_SUPERVISOR_PID is set): a thread
  that notices the parent is gone (getppid changes: the child was re-parented) and stops the
  service with SIGTERM, then for good after a grace period. The same thread pings the
  supervisor's watchdog file (shared.runtime.watchdog) once a second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from shared.runtime import watchdog

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 15.0
ORPHAN_EXIT = 70

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def _arm_pdeathsig() -> bool:
    return _prctl is not None and _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0


def die_with_parent(parent_pid: int):
    """A `preexec_fn` for subprocess.Popen: SIGTERM this child when `parent_pid` dies."""
    def preexec() -> None:
        _arm_pdeathsig()
        if os.getppid() != parent_pid:
            os._exit(ORPHAN_EXIT)

    return preexec


def start(log=None) -> None:
    """In a child of `mro-edge run` (MRO_SUPERVISOR_PID set): watch the parent, ping the watchdog."""
    supervisor = os.environ.get("MRO_SUPERVISOR_PID", "")
    if not supervisor.isdigit():
        return
    parent = int(supervisor)
    armed = _arm_pdeathsig()  # again: a child started some other way gets it too
    if os.getppid() != parent:
        print("mro-edge: the mro-edge run that started this service is gone; exiting", file=sys.stderr)
        os._exit(ORPHAN_EXIT)
    watchdog_file = os.environ.get("MRO_WATCHDOG_FILE") or None
    threading.Thread(
        target=_watch, args=(parent, armed, watchdog_file, log), name="lifeline", daemon=True
    ).start()


def _watch(parent: int, armed: bool, watchdog_file: str | None, log) -> None:
    orphaned_at: float | None = None
    while True:
        if orphaned_at is None and os.getppid() != parent:
            orphaned_at = time.monotonic()
            if log is not None:
                log.error("supervisor gone; stopping", supervisor_pid=parent, state_transition="ORPHANED")
            if not armed:
                os.kill(os.getpid(), signal.SIGTERM)
        if orphaned_at is not None and time.monotonic() - orphaned_at > STOP_GRACE_S:
            os._exit(ORPHAN_EXIT)
        if watchdog_file and orphaned_at is None:
            try:
                watchdog.ping(watchdog_file)
            except OSError:
                pass
        time.sleep(1.0)
