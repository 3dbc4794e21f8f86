"""Dry runs: a contract version replayed over the newest device records of the signed ledger.

The ledger is read through its owner (`shared.ledger.store.open_ledger`): read-only, one LMDB
snapshot, safe beside the running sign service.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import takewhile

import lmdb
import msgspec

from shared.compliance.versions import ContractVersion, DryRunReport, dry_run
from shared.contract import RECORD_TYPES
from shared.ledger.entry import SignedEntry
from shared.ledger.store import LedgerView, open_ledger
from shared.runtime.config import Config
from shared.runtime.store import StoreError

_RECORD_TYPES = frozenset(RECORD_TYPES)
_decode = msgspec.json.decode


def ledger_bodies(config: Config, limit: int) -> Iterator[dict]:
    """The bodies of the last `limit` device records in the signed ledger, newest first.

    Entries that are not device records (schema changes) are skipped and do not count. Nothing
    is yielded while the sign service has not created its store."""
    try:
        ledger = open_ledger(config)
    except (StoreError, lmdb.Error):
        return
    with ledger, ledger.snapshot() as view:
        yield from _newest_bodies(view, limit)


def _newest_bodies(view: LedgerView, limit: int) -> Iterator[dict]:
    """Walk back from the head in windows of the records still wanted (entries stream forward only)."""
    head = view.head()
    end = head.seq + 1 if head is not None else 0
    first = view.first_seq()  # entries before it were archived (mro-edge ledger archive)
    wanted = limit
    while wanted > 0 and end > first:
        start = max(first, end - wanted)
        for signed in reversed(_window(view, start, end)):
            entry = _decode(signed.entry)
            if entry.get("type") in _RECORD_TYPES:
                yield entry["body"]
                wanted -= 1
        end = start


def _window(view: LedgerView, start: int, end: int) -> list[SignedEntry]:
    """The entries with `start <= seq < end`, oldest first."""
    return list(takewhile(lambda signed: signed.seq < end, view.entries(start)))


def drift_report(config: Config, version: ContractVersion, *, sample: int,
                 tolerance_ppm: int) -> DryRunReport:
    """`version` judged over the last `sample` ledger records, with how long it took."""
    started = time.perf_counter()
    report = dry_run(version, ledger_bodies(config, sample), tolerance_ppm=tolerance_ppm)
    report.seconds_ms = round((time.perf_counter() - started) * 1000)
    return report
