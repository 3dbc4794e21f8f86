"""Repeated reads of one tag by one reader within a window count as one read.

A fixed reader reports a tag sitting in its field many times a second; maintenance wants one
sighting. `ReadWindow.admit` lets the first read of a (reader, EPC) through and holds back the
same pair until `window_s` seconds after that emitted read; a tag still there afterwards is
emitted again, once per window, so presence keeps being reported at a bounded rate.

A caller that may process the same read again (a batch transaction that failed and is
retried) passes the read's identity as `token`: the read that was emitted is admitted again,
only other reads of the pair within the window are held back.

Memory is bounded by the window: only pairs emitted within the last `window_s` seconds are
kept, and never more than `max_entries` of them. A flood of more distinct tags per window than
`max_entries` evicts the oldest pairs early, so their next read passes again: a duplicate the
downstream idempotency absorbs, never a lost read.
"""

from __future__ import annotations

from collections import OrderedDict


class ReadWindow:
    """Pure and in-memory: the caller passes each read's time (seconds, e.g. monotonic or the
    reader's clock); a time earlier than one already seen counts as that later time, so a reader
    clock stepping back cannot reopen the window."""

    def __init__(self, window_s: float, max_entries: int = 65536):
        if window_s <= 0 or max_entries < 1:
            raise ValueError("window_s must be > 0 and max_entries >= 1")
        self.window_s = window_s
        self.max_entries = max_entries
        self._emitted: OrderedDict[tuple[str, str], tuple[float, str | None]] = OrderedDict()
        self._now = float("-inf")

    def __len__(self) -> int:
        return len(self._emitted)

    def admit(self, reader: str, epc_hex: str, at: float, token: str | None = None) -> bool:
        """True when this read is to be emitted (or is the emitted one again, same `token`);
        False when it repeats one within the window."""
        self._now = max(self._now, at)
        now = self._now
        while self._emitted:
            oldest_key, (oldest_at, _) = next(iter(self._emitted.items()))
            if now - oldest_at < self.window_s:
                break
            del self._emitted[oldest_key]
        key = (reader, epc_hex.upper())
        if key in self._emitted:
            return token is not None and self._emitted[key][1] == token
        if len(self._emitted) >= self.max_entries:
            self._emitted.popitem(last=False)
        self._emitted[key] = (now, token)
        return True
