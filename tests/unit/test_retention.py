"""Retention on a real LMDB store: only fates the gateway holds and older than the window go.

Time moves through the one seam (`MRO_RETENTION_CLOCK_FILE`), never by sleeping.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.runtime import dlq, retention
from shared.runtime.config import RetentionConfig
from shared.runtime.delivery import run_batch
from shared.runtime.handler import Stage
from shared.runtime.logs import get_logger
from shared.runtime.messages import Fate, Outcome, Outcomes, ReceivedRecord, fate_encode, json_encode
from shared.runtime.outbox import Outbox
from shared.runtime.prune import Pruner
from shared.runtime.stage import RUNTIME_TABLES
from shared.runtime.store import Store, u64
from shared.runtime.testing import MemoryTables, MemoryUnitOfWork
from shared.runtime.topics import Topics
from shared.runtime.work import SEEN, LmdbUnitOfWork
from tests.unit.test_dlq_redrive import TOPICS, command, edge, received, torque

__all__ = ["edge"]  # the validate stage fixture of test_dlq_redrive

DAY = retention.DAY_S


class Passer(Stage[ReceivedRecord]):
    name = "validate"
    input_type = ReceivedRecord

    def judge(self, item, uow):
        raise AssertionError("no record is judged here")


@pytest.fixture
def clock(tmp_path, monkeypatch):
    """Days forward: `clock(n)` puts the retention clock n days ahead of the wall clock."""
    path = tmp_path / "clock"
    path.write_text("0")
    monkeypatch.setenv(retention.CLOCK_FILE_ENV, str(path))
    return lambda days: path.write_text(str(days * DAY))


@pytest.fixture
def store(tmp_path):
    opened = Store(tmp_path / "stage", RUNTIME_TABLES, map_size_mb=16)
    yield opened
    opened.close()


def set_fates(store: Store, fates: dict[str, Fate]) -> None:
    with store.write() as txn:
        uow = LmdbUnitOfWork(Passer(), Topics("HGR1"), store, txn, None)
        for key, fate in fates.items():
            uow.set_fate(key, fate)


def keys(store: Store) -> set[str]:
    with store.read() as txn:
        return {bytes(k).decode() for k, _ in txn.cursor(db=store.table(SEEN))}


def pruner(store: Store, holds: retention.GatewayHolds | None, batch: int = 500, **settings) -> Pruner:
    config = RetentionConfig(seen_days=30, dlq_days=30, interval_s=0, batch=batch, **settings)
    return Pruner(store, store.path, config, get_logger(stage="test"), lambda: holds)


def holds(acknowledged: int, cosigned: int) -> retention.GatewayHolds:
    return retention.GatewayHolds(acknowledged, cosigned, "2026-12-06T00:00:00.000Z")


def test_only_fates_the_gateway_acknowledged_and_cosigned_past_the_window_go(store, clock) -> None:
    recorded = {f"r{seq}": Fate("recorded", seq) for seq in range(10)}
    others = {"rej": Fate("rejected", errors=[]), "held": Fate("held"), "on": Fate("validated")}
    set_fates(store, recorded | others)
    everything = set(recorded) | set(others)

    clock(31)
    pruner(store, None).run_round()
    assert keys(store) == everything, "the gateway's holdings unknown: nothing may go"
    pruner(store, holds(10, 0)).run_round()
    assert keys(store) == everything, "acknowledged but never cosigned: nothing may go"

    clock(29)
    pruner(store, holds(10, 10)).run_round()
    assert keys(store) == everything, "inside the dedupe window: nothing may go"

    clock(31)
    done = pruner(store, holds(8, 5)).run_round()
    assert keys(store) == everything - {f"r{seq}" for seq in range(5)}  # below min(acknowledged, cosigned)
    assert done is not None and done.seen_pruned == 5 and done.seen_kept == 8
    pruner(store, holds(10, 10)).run_round()
    assert keys(store) == set(others), "rejected, held and in-flight fates are never pruned"
    assert store.count(retention.SEEN_AGE) == len(others)  # the pruned fates' age rows went too


def test_a_round_is_cut_into_short_transactions(store, clock) -> None:
    set_fates(store, {f"r{seq}": Fate("recorded", seq) for seq in range(25)})
    clock(31)
    done = pruner(store, holds(25, 25), batch=4).run_round()
    assert done is not None and done.seen_pruned == 25 and done.transactions >= 7
    assert keys(store) == set()


def test_fates_from_before_the_index_are_aged_from_the_first_round(store, clock) -> None:
    with store.write() as txn:  # as a store written before retention existed
        for seq in range(6):
            txn.put(f"old{seq}".encode(), fate_encode(Fate("recorded", seq)), db=store.table(SEEN))
    clock(100)
    first = pruner(store, holds(6, 6), batch=4).run_round()
    assert first is not None and first.indexed == 6 and first.seen_pruned == 0  # aged from now: kept
    clock(131)
    pruner(store, holds(6, 6)).run_round()
    assert keys(store) == set()


def test_exported_dlq_rows_older_than_dlq_days_go(store, clock) -> None:
    with store.write() as txn:
        uow = LmdbUnitOfWork(Passer(), Topics("HGR1"), store, txn, None)
        for i in range(4):
            report = {"stage": "validate", "received_at": f"2026-12-0{i + 1}T00:00:00.000Z",
                      "errors": [{"path": "$", "rule": "r", "expected": "", "received": ""}]}
            assert dlq.keep(uow, report, None, [], None)
    before = dlq.usage(store)
    clock(365)
    pruner(store, None).run_round()
    assert dlq.usage(store).rows == 4, "nothing exported: every row stays"
    (Path(store.path) / retention.DLQ_EXPORTED_FILE).write_text(json.dumps({"through": 2, "at": "x"}))
    done = pruner(store, None, batch=2).run_round()
    after = dlq.usage(store)
    assert done is not None and done.dlq_pruned == 3 and after.rows == 1  # row 3 was not exported
    assert 0 < after.bytes < before.bytes
    assert [row_id for row_id, _ in dlq.rows(store)] == [3]


def test_validate_learns_the_seq_of_what_it_passed_on(clock) -> None:
    uow = MemoryUnitOfWork(Passer(), MemoryTables())
    uow.set_fate("a", Fate("validated", redrive=1))
    uow.set_fate("b", Fate("rejected", errors=[]))
    uow.set_fate("c", Fate("held"))
    told = Outcomes([Outcome("a", "recorded", seq=7), Outcome("b", "recorded", seq=8), Outcome("c", "rejected")])
    retention.learn_recorded(uow, json_encode(told))
    assert uow.fate("a") == Fate("validated", 7, redrive=1)  # still validate's: sign tells `recorded`
    assert uow.fate("b") == Fate("rejected", errors=[])
    assert uow.fate("c") == Fate("held")


def test_a_redriven_record_whose_fate_was_pruned_is_never_redriven_again(edge, tmp_path, clock) -> None:
    """Validate on a real store: a rejected record is redriven into the ledger, its fate learns the
    seq and is pruned once the gateway holds it; a DLQ row of it left behind is then not
    redriven again (its key is unknown: left for a person), so it can never reach sign twice."""
    validate = edge.validate
    store = Store(tmp_path / "validate", RUNTIME_TABLES + validate.tables, map_size_mb=16)
    outbox = Outbox(store, lambda *_: None, topic=TOPICS.stage_input("sign"), source="validate", batch=10,
                    redeliver_after_s=60, max_in_flight=10)

    def in_txn(action):
        with store.write() as txn:
            uow = LmdbUnitOfWork(validate, TOPICS, store, txn, outbox)
            result = action(uow)
        return result, uow

    def redrive(command_id: str):
        def act(uow):
            validate.handle_notice(TOPICS.redrive, command({"all": True}, command_id), uow)
        _, uow = in_txn(act)
        [reply] = [json.loads(p) for t, p, _, _ in uow.outgoing if t == TOPICS.redrive_reply(command_id)]
        return reply, uow

    try:
        item = received(torque(7))
        in_txn(lambda uow: run_batch(validate, [item], uow))
        [(row_id, stale)] = dlq.rows(store)
        edge.registries.fix()
        reply, _ = redrive("c1")
        assert reply["accepted"] == 1
        in_txn(lambda uow: retention.learn_recorded(uow, json_encode(Outcomes([Outcome(item.key, "recorded", 3)]))))
        with store.write() as txn:  # a copy of the redriven row left behind
            txn.put(u64(row_id + 100), stale, db=store.table(dlq.DLQ))

        clock(31)
        pruner(store, holds(4, 4)).run_round()
        assert in_txn(lambda uow: uow.fate(item.key))[0] is None
        again, uow = redrive("c2")
        assert again["selected"] == 0 and again["accepted"] == 0
        assert outbox.pending() == 2  # only the first redrive's record and its ledger entry were owed sign
        assert [r for r, _ in dlq.rows(store)] == [row_id + 100]  # kept for a person to read
    finally:
        store.close()


def test_the_mcc_exposes_what_retention_pruned() -> None:
    import threading

    from prometheus_client.parser import text_string_to_metric_families

    from services.mcc.metrics import exposition
    from services.mcc.state import BoxState
    from shared.runtime.status import StageFigures

    state = BoxState("HGR1", ("sign",))
    state.on_status("sign", {"state": "up", **StageFigures().payload(),
                             "retention": {"seen_pruned": 7, "dlq_pruned": 2, "rounds": 3, "prunable_below": 40}},
                    1_800_000_000.0)
    text = exposition(state, threading.Lock(), lambda: 1_800_000_001.0).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("mro_stage_retention_pruned_total", (("stage", "sign"), ("table", "seen")))] == 7
    assert samples[("mro_stage_retention_pruned_total", (("stage", "sign"), ("table", "dlq")))] == 2
    assert samples[("mro_stage_retention_prunable_below_seq", (("stage", "sign"),))] == 40
