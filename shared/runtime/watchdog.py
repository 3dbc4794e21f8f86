"""Watchdog pings from a service to the `mro-edge run` supervisor.

The supervisor gives each child a file (MRO_WATCHDOG_FILE). A thread in the child
(mro_edge.lifeline) sets the file's mtime once a second, to the time of the service's last
main-loop `beat()` if the service calls it (the stage runtime does), else to now. A process
that is stopped (SIGSTOP), wedged in a C call, or whose main loop is stuck stops moving the
mtime; the supervisor then reports it `hung`, alarms and restarts it.

`beat()` is a single assignment: cheap enough for every turn of a busy loop.
"""

from __future__ import annotations

import os
import time

_last_beat: float | None = None


def beat() -> None:
    """The main loop is turning (call it at least every few seconds once started)."""
    global _last_beat
    _last_beat = time.time()


def ping(path: str) -> None:
    """Set `path`'s mtime to the last beat (or now, if the service has no beating loop)."""
    at = _last_beat if _last_beat is not None else time.time()
    try:
        os.utime(path, (at, at))
    except FileNotFoundError:
        with open(path, "a"):
            pass
        os.utime(path, (at, at))
