"""Poison isolation in the real runtime (real LMDB, no broker): a record its handler cannot process
is rejected alone and the rest of its batch commits; several in a row hold the batch instead."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest

from mro_edge.simulator.records import valid_record
from shared.contract import decode_record, idempotency_key, normalize
from shared.runtime.clock import utc_now
from shared.runtime.config import load_config
from shared.runtime.handler import Stage
from shared.runtime.hopauth import ensure_hop_keys
from shared.runtime.messages import DeviceRef, Fate, ReceivedRecord, ValidatedRecord, fate_decode
from shared.runtime.poison import FAILURES_IN_A_ROW, StageFault
from shared.runtime.stage import Batch, StageRuntime
from shared.runtime.verdicts import Accepted, Verdict
from shared.runtime.work import UnitOfWork

STATION = "HGR1"


class Fussy(Stage[ReceivedRecord]):
    """Passes every record on, except those whose event_id it was told to choke on."""

    name = "validate"
    input_type = ReceivedRecord
    downstream = "sign"

    def __init__(self) -> None:
        self.choke_on: set[str] = set()

    def judge(self, item: ReceivedRecord, uow: UnitOfWork) -> Verdict:
        if item.event_id in self.choke_on:
            raise ZeroDivisionError("a bug in the handler")
        return Accepted(ValidatedRecord(item.key, item.record, item.device))


@pytest.fixture
def runtime(tmp_path) -> Iterator[StageRuntime]:
    config = load_config(env={"MRO_DATA_DIR": str(tmp_path), "MRO_STATION": STATION,
                              "MRO_MQTT_URL": "mqtt://127.0.0.1:9"})
    ensure_hop_keys(tmp_path)
    runtime = StageRuntime(Fussy(), config)
    yield runtime
    runtime.store.close()


def records(n: int, seed: int = 1) -> list[ReceivedRecord]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        data = valid_record(rng, station=STATION, device_kind="tablet", device_id="TAB-12")
        record = decode_record(json.dumps(data).encode(), station=STATION, device_kind="tablet",
                               device_id="TAB-12")
        key = idempotency_key(normalize(record))
        out.append(ReceivedRecord(key, record, utc_now(), DeviceRef("tablet", "TAB-12")))
    return out


def table(runtime: StageRuntime, name: str) -> list[tuple[bytes, bytes]]:
    with runtime.store.read() as txn:
        return list(txn.cursor(db=runtime.store.table(name)))


def test_a_poison_record_is_rejected_alone_and_the_batch_commits(runtime):
    items = records(5)
    poison = items[2]
    runtime.stage.choke_on = {poison.event_id}
    uows = runtime.commit(Batch(inputs=items))
    assert len(table(runtime, "outbox")) == 4
    [(_, report)] = table(runtime, "dlq")
    report = json.loads(report)
    assert report["idempotency_key"] == poison.key and report["event_id"] == poison.event_id
    assert report["errors"] == [{"path": "$", "rule": "stage_error",
                                 "expected": "a record the validate stage can process",
                                 "received": "ZeroDivisionError"}]
    seen = {key.decode(): fate_decode(value) for key, value in table(runtime, "seen")}
    assert seen[poison.key].status == "rejected" and seen[items[0].key] == Fate("validated")
    messages = [(topic, json.loads(payload)) for uow in uows for topic, payload, _, _ in uow.messages()]
    receipts = [m for t, m in messages if t == runtime.topics.receipt("TAB-12")]
    assert [(r["status"], r["event_id"]) for r in receipts] == [("rejected", poison.event_id)]
    [outcomes] = [m for t, m in messages if t == runtime.topics.outcomes]
    assert [(o["key"], o["status"]) for o in outcomes["outcomes"]] == [(poison.key, "rejected")]


def test_several_failures_in_a_row_hold_the_batch(runtime):
    items = records(5, seed=2)
    runtime.stage.choke_on = {item.event_id for item in items[1:4]}
    with pytest.raises(StageFault):
        runtime.commit(Batch(inputs=items))
    # the two before the third were taken for poison; the third says the stage itself is failing
    assert len(table(runtime, "dlq")) == FAILURES_IN_A_ROW - 1
    assert len(table(runtime, "outbox")) == 1  # the record before them committed; the batch is held
