"""The intake spool on a real LMDB map of 1 MB: once its consumer has drained it, appends are
taken again, however full it was (services/broker/spool.py)."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from services.broker.spool import Spool, SpoolEntry, SpoolFull

TOPIC = "mro/HGR1/in/tablet/TAB-1"


def batch(size: int) -> list[SpoolEntry]:
    return [SpoolEntry(TOPIC, b"x" * 1000, 1.0) for _ in range(size)]


def fill(spool: Spool) -> list[int]:
    """Append groups of 50 until the spool refuses one; the seqs it took."""
    seqs: list[int] = []
    with pytest.raises((SpoolFull, lmdb.MapFullError)):
        while True:
            seqs += spool.commit(batch(50), [])
    return seqs


def test_a_drained_spool_takes_appends_again_after_one_commit_freed_the_whole_map(tmp_path: Path) -> None:
    """Ingest takes a little of a full spool, it fills up again, then ingest takes all of it: the
    commit that deleted everything freed pages LMDB reuses only after a later commit."""
    spool = Spool(tmp_path / "spool", map_size_mb=1)
    for _ in range(3):
        held = fill(spool)
        assert len(held) > 300, "a 1 MB map holds a few hundred 1 kB entries"
        spool.commit([], held[:25])
        held = held[25:] + fill(spool)
        spool.commit([], held)
        assert spool.depth == 0
        taken = spool.commit(batch(50), [])
        assert len(taken) == 50
        spool.commit([], taken)
    spool.close()


def test_seqs_keep_increasing_across_a_reopen_of_an_emptied_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", map_size_mb=1)
    seqs = fill(spool)
    spool.commit([], seqs)
    spool.commit(batch(1), [])
    last = spool.next_seq - 1
    spool.commit([], [last])
    spool.close()
    again = Spool(tmp_path / "spool", map_size_mb=1)
    assert again.depth == 0
    assert again.commit(batch(1), []) == [last + 1]
    again.close()
