"""LMDB maps that grow at run time (shared/runtime/store.py), on real LMDB environments: the growth
policy, a write that outgrows its map, the cap, a reader thread the resize waits for, and a
reader in another process that adopts the size the writer grew to."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.broker.spool import Spool, SpoolEntry, SpoolFull
from shared.ledger.store import LEDGER_TABLE, LedgerReader
from shared.runtime.store import GROW_STEP_MAX, MIB, MapFullAtCap, MapGrown, Store, next_map_size, u64

ROOT = Path(__file__).resolve().parents[2]


@given(st.integers(1, 1 << 40), st.integers(1, 1 << 40))
def test_one_growth_step_grows_within_the_cap_by_at_most_a_doubling_or_one_gib(current: int, cap: int) -> None:
    grown = next_map_size(current, cap)
    if current >= cap:
        assert grown is None
        return
    assert grown is not None
    assert current < grown <= cap
    assert grown == cap or grown % MIB == 0
    assert grown - current <= max(min(max(current, MIB), GROW_STEP_MAX), MIB) + MIB


def test_growth_steps_reach_the_cap_in_few_steps() -> None:
    size, steps = MIB, 0
    while (grown := next_map_size(size, 64 * 1024 * MIB)) is not None:
        size, steps = grown, steps + 1
    assert size == 64 * 1024 * MIB and steps < 80


def fill(store: Store, table: str, start: int, count: int, size: int = 900) -> None:
    """One write transaction of `count` rows, retried after each growth as a stage retries its batch."""
    while True:
        try:
            with store.write() as txn:
                for n in range(start, start + count):
                    txn.put(u64(n), os.urandom(size), db=store.table(table))
            return
        except MapGrown:
            continue


def test_a_write_that_outgrows_the_map_grows_it_and_commits_on_retry(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", ("t",), map_size_mb=1, map_max_mb=64)
    for batch in range(20):
        fill(store, "t", batch * 1000, 1000)
    assert store.count("t") == 20_000
    assert store.map_size > 16 * MIB
    store.close()
    again = Store(tmp_path / "s", ("t",), map_size_mb=1, map_max_mb=64)
    assert again.count("t") == 20_000, "an existing store reopens at the size it grew to"
    again.close()


def test_at_the_cap_a_write_rolls_back_with_map_full_at_cap_and_goes_on_once_raised(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", ("t",), map_size_mb=1, map_max_mb=2)
    with pytest.raises(MapFullAtCap, match="cap of 2 MiB"):
        for batch in range(10):
            fill(store, "t", batch * 1000, 1000)
    held = store.count("t")
    assert 0 < held < 10_000 and held % 1000 == 0, "whole batches or nothing"
    store.max_bytes = 64 * MIB
    fill(store, "t", held, 1000)
    assert store.count("t") == held + 1000
    store.close()


def test_a_resize_waits_for_a_reader_in_another_thread(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", ("t",), map_size_mb=1, map_max_mb=64)
    fill(store, "t", 0, 500)
    reading, release, seen = threading.Event(), threading.Event(), []

    def reader() -> None:
        with store.read() as txn:
            reading.set()
            release.wait(10)
            seen.append(sum(1 for _ in txn.cursor(db=store.table("t"))))

    thread = threading.Thread(target=reader)
    thread.start()
    reading.wait(10)
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    fill(store, "t", 500, 3000)
    assert time.monotonic() - started >= 0.4, "the resize waited for the open read transaction"
    thread.join(10)
    assert seen == [500], "the reader's snapshot stayed whole through the resize"
    assert store.count("t") == 3500
    store.close()


def test_a_reader_in_another_process_keeps_reading_after_the_writer_grew_the_map(tmp_path: Path) -> None:
    """The ledger's readers (uplink, validate, the CLI) open the sign store read-only in their own
    process; MDB_MAP_RESIZED after the writer grew it is answered by adopting the new size."""
    path = tmp_path / "sign"
    writer = Store(path, (LEDGER_TABLE,), map_size_mb=1, map_max_mb=256)
    fill(writer, LEDGER_TABLE, 0, 100)
    script = (
        "import sys\n"
        "from shared.ledger.store import LedgerReader, LEDGER_TABLE\n"
        "r = LedgerReader(sys.argv[1], map_size_mb=1)\n"
        "for line in sys.stdin:\n"
        "    print(r.count(LEDGER_TABLE), r.map_size, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        def ask() -> tuple[int, int]:
            assert proc.stdin and proc.stdout
            proc.stdin.write("\n")
            proc.stdin.flush()
            count, size = proc.stdout.readline().split()
            return int(count), int(size)

        assert ask() == (100, MIB)
        for batch in range(1, 40):
            fill(writer, LEDGER_TABLE, batch * 100, 100, size=4000)
        assert writer.map_size > 8 * MIB
        count, size = ask()
        assert count == 4000 and size == writer.map_size
    finally:
        proc.stdin.close() if proc.stdin else None
        proc.wait(10)
    writer.close()
    reader = LedgerReader(path, map_size_mb=1)
    assert reader.count(LEDGER_TABLE) == 4000, "a reader opened later maps what the file needs"
    reader.close()


def test_the_spool_grows_before_it_would_drop_below_its_headroom_and_is_full_only_at_its_cap(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", map_size_mb=1, map_max_mb=8)
    seqs: list[int] = []
    with pytest.raises((SpoolFull, lmdb.MapFullError)):
        while True:
            seqs += spool.commit([SpoolEntry("mro/HGR1/in/x/y", b"x" * 1000, 1.0) for _ in range(50)], [])
    assert spool.store.map_size == 8 * MIB
    assert len(seqs) > 5000, "most of the 8 MiB cap is used, less the 15 % headroom"
    spool.commit([], seqs)
    assert spool.depth == 0
    spool.close()


def test_a_spool_full_at_its_cap_takes_appends_again_once_its_cap_source_says_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.broker.spool.CAP_REREAD_S", 0.0)
    cap = [2]
    spool = Spool(tmp_path / "spool", map_size_mb=1, map_max_mb=2, cap_source=lambda: cap[0])
    entries = [SpoolEntry("mro/HGR1/in/x/y", b"x" * 1000, 1.0) for _ in range(50)]
    with pytest.raises(SpoolFull):
        while True:
            spool.commit(entries, [])
    held = spool.depth
    cap[0] = 8  # the operator raised stage.spool_map_max_mb
    spool.commit(entries, [])
    assert spool.depth == held + 50 and spool.store.map_size > 2 * MIB
    spool.close()
