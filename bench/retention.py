"""Retention benchmark: bytes per record per store after pruning, beside the same run before it.

``run_retention_bench(quick=False)`` fills one real LMDB store per stage the way the runtime
does (``LmdbUnitOfWork.set_fate`` in batch transactions of 1,000: ingest's fate goes
received -> recorded, validate's validated -> recorded (`retention.learn_recorded`), sign's and
the uplink's are recorded at once; validate's store also gets one rejection in 20 kept whole in
its DLQ, then exported), then moves the retention clock 31 days on and prunes with the gateway
holding everything (``shared.runtime.prune.Pruner``). Per store:

- ``before_b_per_record`` / ``after_b_per_record``: the store's compacted copy (what a backup
  holds, what the store needs) per record, before and after pruning;
- ``used_before_b_per_record`` / ``regrow_b_per_record``: pages the map uses per record for the
  first batch of records (the reference), and what the same number of new records adds once
  the pruned pages are free to be reused (near zero: the store stops growing);
- ``prune_records_per_s`` beside ``write_records_per_s`` (the same records written).

Run: ``python -m bench --quick --only retention`` (a few seconds).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.runtime import retention
from shared.runtime.config import RetentionConfig
from shared.runtime.handler import Stage
from shared.runtime.logs import get_logger
from shared.runtime.messages import Fate, Outcome, Outcomes, ReceivedRecord, json_encode
from shared.runtime.prune import Pruner
from shared.runtime.stage import RUNTIME_TABLES
from shared.runtime.store import Store
from shared.runtime.topics import Topics
from shared.runtime.work import LmdbUnitOfWork

BATCH = 1000
STAGES = ("ingest", "validate", "sign", "uplink")
REJECTED_EVERY = 20
DLQ_ROW = {"stage": "validate", "received_at": "2026-01-01T00:00:00.000Z",
           "errors": [{"path": "$.tool.serial_number", "rule": "tool_unknown", "expected": "a registered tool",
                       "received": "NORBAR-EVO-2000-77001"}],
           "record": {"padding": "x" * 900}}  # about the size of a torque event kept for a redrive


class _Stage(Stage[ReceivedRecord]):
    input_type = ReceivedRecord

    def judge(self, item, uow):
        raise AssertionError("nothing is judged in the bench")


def _key(i: int) -> str:
    return hashlib.sha256(i.to_bytes(8, "big")).hexdigest()


def _fill(store: Store, stage: str, first: int, count: int) -> None:
    topics = Topics("HGR1")
    holder = _Stage()
    for start in range(first, first + count, BATCH):
        with store.write() as txn:
            uow = LmdbUnitOfWork(holder, topics, store, txn, None)
            keys = range(start, min(start + BATCH, first + count))
            for i in keys:
                if stage == "validate" and i % REJECTED_EVERY == 0:
                    uow.set_fate(_key(i), Fate("rejected", errors=[]))
                    uow.keep_report(dict(DLQ_ROW), None, [])
                elif stage == "ingest":
                    uow.set_fate(_key(i), Fate("received"))
                elif stage == "validate":
                    uow.set_fate(_key(i), Fate("validated"))
                else:
                    uow.set_fate(_key(i), Fate("recorded", i))
            if stage in ("ingest", "validate"):
                told = Outcomes([Outcome(_key(i), "recorded", seq=i) for i in keys])
                if stage == "ingest":
                    for outcome in told.outcomes:
                        uow.set_fate(outcome.key, Fate("recorded", outcome.seq))
                else:
                    retention.learn_recorded(uow, json_encode(told))


def _compacted(store: Store, into: Path) -> int:
    store.copy_to(into)
    return (into / "data.mdb").stat().st_size


def _one(stage: str, records: int, tmp: Path, clock: Path) -> dict[str, Any]:
    clock.write_text("0")
    store = Store(tmp / stage, RUNTIME_TABLES, map_size_mb=64, map_max_mb=4096)
    try:
        empty = store.used_bytes()
        started = time.perf_counter()
        _fill(store, stage, 0, records)
        write_s = time.perf_counter() - started
        used_before = store.used_bytes() - empty
        before = _compacted(store, tmp / f"{stage}-before")
        (store.path / retention.DLQ_EXPORTED_FILE).write_text(
            json_encode(retention.ExportedMark(records, "2026-01-01T00:00:00.000Z")).decode())
        clock.write_text(str(31 * retention.DAY_S))
        holds = retention.GatewayHolds(records, records, "2026-01-01T00:00:00.000Z")
        pruner = Pruner(store, store.path, RetentionConfig(interval_s=0), get_logger(stage=stage), lambda: holds)
        started = time.perf_counter()
        done = pruner.run_round(limit_s=600)
        prune_s = time.perf_counter() - started
        after = _compacted(store, tmp / f"{stage}-after")
        clock.write_text("0")
        high_water = store.used_bytes()
        _fill(store, stage, records, records)
        regrow = store.used_bytes() - high_water
        kept = store.count("seen")
    finally:
        store.close()
    return {"records": records, "seen_pruned": done.seen_pruned if done else 0,
            "dlq_pruned": done.dlq_pruned if done else 0, "kept_after_refill": kept,
            "before_b_per_record": round(before / records, 1), "after_b_per_record": round(after / records, 1),
            "used_before_b_per_record": round(used_before / records, 1),
            "regrow_b_per_record": round(regrow / records, 1),
            "write_records_per_s": round(records / write_s), "prune_records_per_s": round(records / prune_s)}


def run_retention_bench(quick: bool = False) -> dict[str, Any]:
    records = 20_000 if quick else 100_000
    figures: dict[str, Any] = {}
    saved = os.environ.get(retention.CLOCK_FILE_ENV)
    with tempfile.TemporaryDirectory(prefix="mro-bench-retention-") as tmp_name:
        tmp = Path(tmp_name)
        clock = tmp / "clock"
        os.environ[retention.CLOCK_FILE_ENV] = str(clock)
        try:
            for stage in STAGES:
                figures[stage] = _one(stage, records, tmp, clock)
        finally:
            if saved is None:
                os.environ.pop(retention.CLOCK_FILE_ENV, None)
            else:
                os.environ[retention.CLOCK_FILE_ENV] = saved
    row = "{:<9} {:>12} {:>12} {:>14} {:>14} {:>12} {:>12}"
    print(row.format("store", "before B/rec", "after B/rec", "map used B/rec", "regrow B/rec", "write rec/s",
                     "prune rec/s"))
    for stage, f in figures.items():
        print(row.format(stage, f["before_b_per_record"], f["after_b_per_record"], f["used_before_b_per_record"],
                         f["regrow_b_per_record"], f["write_records_per_s"], f["prune_records_per_s"]))
    print(f"({records:,} records per store; before/after: compacted copy; regrow: map pages the same number of "
          "new records adds once pruned pages are free, beside map used by the first ones)")
    return figures
